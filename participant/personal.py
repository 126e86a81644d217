"""Personalised adapters (`federation.personalization`): what each site serves its own patients.

- `finetune:<steps>`: the global adapter fine-tuned for a few steps on the site's own training
  records at evaluation time; the next round starts from the global adapter again. Under sample-level
  DP-SGD (privacy.local_noise_multiplier) the fine-tune is DP-SGD too, charged to the site's own
  accountant like a round's steps: its adapter stays here, but its scores leave, and they depend on
  the records it fine-tuned on. A fine-tune that would pass privacy.local_epsilon_budget is skipped.
- `local-head` / `local-b`: a split adapter (fedlora/aggregate/split.py). The site's own tensors
  (the head, or lora_B) train in every round and never leave: they are kept in `context.state`
  between the messages of a run and, at a deployed site, in its latest personalised adapter,
  from which a restarted node picks them up. The personalised adapter is the global (shared)
  adapter with the site's own tensors put in.
- Prediction-only distillation (`[distillation]`, fedlora/distill.py) keeps the same way a site's
  whole adapter, which only ever leaves as predictions (`kept_layout`).

Either way each evaluated site scores its personalised adapter beside the global one (only the
held-out scores leave), and a deployed site keeps the latest under `personal/<run>/` in its
directory, a plain PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedlora.adapter import AdapterLayout, adapter_vector, check_vector, load_adapter_vector, load_peft_dir, save_peft_dir
from fedlora.aggregate import aggregator_for
from fedlora.aggregate.split import SPLITS, local_layout
from fedlora.config import Config
from fedlora.evaluate import EvalResult, evaluate
from fedlora.train import train_local
from participant.runtime import (
    ParticipantRuntime, epsilon_past_budget, load_local_accountant, local_seed, round_train, save_local_accountant, site_privacy,
    training_examples,
)

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

log = logging.getLogger("fedlora.participant")

PERSONAL = "personal"
OWN_PART = "fedlora.own_part"  # context.state ArrayRecord: this site's own tensors (a split's local part, a distiller's adapter)


def kept_layout(layout: AdapterLayout, cfg: Config) -> AdapterLayout:
    """What of the adapter this site keeps as its own: all of it in prediction-only distillation,
    else the tensors its split adapter keeps (`federation.personalization`)."""
    return layout if cfg.distillation.prediction_only else local_layout(layout, cfg.federation.personalization)


def personalise(
    runtime: ParticipantRuntime, cfg: Config, global_vector: np.ndarray, server_round: int, own: np.ndarray | None = None,
    node_state: RecordDict | None = None,
) -> tuple[np.ndarray, EvalResult] | None:
    """This site's personalised adapter for `global_vector` and its held-out result: the global adapter
    fine-tuned (finetune:<steps>) or with the site's own tensors `own` put in (a split adapter); None for
    a split adapter before the site first trained, or a fine-tune past the DP-SGD budget (its personalised
    adapter is then the global one). `node_state`: where a simulated site keeps its accountant (`train_round`)."""
    if cfg.federation.personalization in SPLITS:
        if own is None:
            return None
        personal = runtime.layout.put(global_vector, local_layout(runtime.layout, cfg.federation.personalization), own)
        load_adapter_vector(runtime.loaded.model, personal, runtime.layout)
    else:
        cfg = site_privacy(cfg, runtime)  # under a target epsilon, DP-SGD at this site's own noise, as in its rounds
        steps = dataclasses.replace(round_train(cfg, server_round), local_steps=cfg.federation.personalization_steps)
        examples = training_examples(cfg, runtime)
        accountant = load_local_accountant(cfg, runtime, node_state) if cfg.privacy.local_noise_multiplier > 0 else None
        if accountant is not None and fine_tune_past_budget(cfg, accountant, len(examples), steps.local_steps, runtime.partition_id):
            return None
        load_adapter_vector(runtime.loaded.model, global_vector, runtime.layout)
        try:
            with aggregator_for(cfg).training(runtime.loaded.model):  # the mode's trainable part, as in a round (sb: R only)
                train_local(
                    runtime.loaded.model, runtime.loaded.tokenizer, examples, steps, cfg.model.task,
                    runtime.loaded.label_names, cfg.data.max_length, seed=local_seed(cfg, server_round, runtime.partition_id) + 1,
                    privacy=cfg.privacy, accountant=accountant, prompt_format=runtime.loaded.prompt_format,
                )
        finally:  # steps taken count even if the fine-tune then fails
            if accountant is not None:
                save_local_accountant(cfg, runtime, accountant, node_state)
        personal, _ = adapter_vector(runtime.loaded.model)
    result = evaluate(
        runtime.loaded.model, runtime.loaded.tokenizer, runtime.shard.test, cfg.model.task, runtime.loaded.label_names,
        cfg.data.max_length, generation=cfg.evaluation, prompt_format=runtime.loaded.prompt_format,
    )
    return personal, result


def fine_tune_past_budget(cfg: Config, accountant: RDPAccountant, records: int, steps: int, partition_id: int) -> bool:
    """Whether the fine-tune's DP-SGD steps would take the site past privacy.local_epsilon_budget: then it is
    skipped (the site's personalised adapter is the global one), so that budget stays for the rounds' training."""
    planned = epsilon_past_budget(cfg, accountant, records, steps)
    if planned is not None:
        log.warning(
            "participant %d skips its personal fine-tune: its %d DP-SGD steps would bring sample-level epsilon to %.4g, "
            "past privacy.local_epsilon_budget=%g; its personalised adapter is the global one",
            partition_id, steps, planned, cfg.privacy.local_epsilon_budget,
        )
    return planned is not None


def own_part(context: Context, runtime: ParticipantRuntime, cfg: Config, run_id: int) -> np.ndarray | None:
    """This site's own tensors (`kept_layout`): from `context.state`, else (a node restarted within the
    run) from its latest kept personalised adapter; None before it first trained."""
    local = kept_layout(runtime.layout, cfg)
    if OWN_PART in context.state:
        part = context.state[OWN_PART]["part"].numpy()
        check_vector(part, local.size, "the site's own part of the adapter")
        return part
    latest = sorted((runtime.site / PERSONAL / str(run_id)).glob("round-*")) if runtime.site is not None else []
    return runtime.layout.take(load_peft_dir(latest[-1], runtime.layout), local) if latest else None


def keep_own_part(context: Context, runtime: ParticipantRuntime, cfg: Config, run_id: int, server_round: int) -> None:
    """After `train_round`: keep the site's own tensors as they trained, in `context.state` and, at a
    deployed site, with the adapter it trained (its personalised adapter until the next evaluation)."""
    trained, _ = adapter_vector(runtime.loaded.model)
    context.state[OWN_PART] = ArrayRecord({"part": Array(runtime.layout.take(trained, kept_layout(runtime.layout, cfg)))})
    if runtime.site is not None:
        keep_latest(runtime.site, run_id, server_round, trained, runtime)


def keep_latest(site: Path, run_id: int, server_round: int, vector: np.ndarray, runtime: ParticipantRuntime) -> Path:
    """Save the personalised adapter as personal/<run>/round-NNNN under the site directory, dropping older rounds."""
    run_dir = site / PERSONAL / str(run_id)
    target = save_peft_dir(run_dir / f"round-{server_round:04d}", vector, runtime.layout, runtime.loaded.model.peft_config["default"])
    for older in run_dir.iterdir():
        if older != target and older.name.startswith("round-"):
            shutil.rmtree(older, ignore_errors=True)
    return target
