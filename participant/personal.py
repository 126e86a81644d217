"""Personalisation by local fine-tuning (`federation.personalization = 'finetune:<steps>'`).

A site evaluates the global adapter as it is and, beside it, the global adapter fine-tuned for a
few steps on its own training records: what it would actually serve its own patients. Nothing of
the personalised adapter leaves the site (only its held-out scores, like the global adapter's),
and the next round starts from the global adapter again, so the aggregate never sees it; a
deployed site keeps the latest under `personal/<run>/` in its directory, a plain PEFT adapter.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from fedlora.adapter import adapter_vector, load_adapter_vector, save_peft_dir
from fedlora.aggregate import make_aggregator
from fedlora.config import Config
from fedlora.evaluate import EvalResult, evaluate
from fedlora.train import train_local
from participant.runtime import ParticipantRuntime, local_seed, training_examples

PERSONAL = "personal"


def personalise(runtime: ParticipantRuntime, cfg: Config, global_vector: np.ndarray, server_round: int) -> tuple[np.ndarray, EvalResult]:
    """The global adapter fine-tuned on this site's records for the configured steps, and its held-out result."""
    aggregator = make_aggregator(cfg.lora.mode, cfg.lora.alpha, cfg.federation.seed, cfg.lora.frozen_a_gain)
    load_adapter_vector(runtime.loaded.model, global_vector, runtime.layout)
    steps = dataclasses.replace(cfg.train, local_steps=cfg.federation.personalization_steps)
    with aggregator.training(runtime.loaded.model):  # the mode's trainable part, as in a round (sb: R only)
        train_local(
            runtime.loaded.model, runtime.loaded.tokenizer, training_examples(cfg, runtime), steps, cfg.model.task,
            runtime.loaded.label_names, cfg.data.max_length, seed=local_seed(cfg, server_round, runtime.partition_id) + 1,
            prompt_format=runtime.loaded.prompt_format,
        )
    personal, _ = adapter_vector(runtime.loaded.model)
    result = evaluate(
        runtime.loaded.model, runtime.loaded.tokenizer, runtime.shard.test, cfg.model.task, runtime.loaded.label_names,
        cfg.data.max_length, generation=cfg.evaluation, prompt_format=runtime.loaded.prompt_format,
    )
    return personal, result


def keep_latest(site: Path, run_id: int, server_round: int, vector: np.ndarray, runtime: ParticipantRuntime) -> Path:
    """Save the personalised adapter as personal/<run>/round-NNNN under the site directory, dropping older rounds."""
    run_dir = site / PERSONAL / str(run_id)
    target = save_peft_dir(run_dir / f"round-{server_round:04d}", vector, runtime.layout, runtime.loaded.model.peft_config["default"])
    for older in run_dir.iterdir():
        if older != target and older.name.startswith("round-"):
            shutil.rmtree(older, ignore_errors=True)
    return target
