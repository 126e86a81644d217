"""Flower ClientApp of a participant: load the global adapter, train locally, reply with the delta.

Only the adapter delta (in frozen-a mode: its lora_B part) and counts leave the participant;
the records stay in its shard.

A deployed SuperNode starts a fresh process for every message, so this module imports the model
stack (torch, transformers, peft: about 15 s on 2 cores) only in the handlers that train or
evaluate; the secure-aggregation stages run on numpy and `cryptography` alone.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedlora.config import PERSONAL_SPLITS, Config
from fedlora.privacy.ledger import Charge
from fedlora.secure_wire import content_bytes
from fedlora.wire import Instruction, read_instruction, reply_content
from participant import ledger, secure
from participant.report import answered, evaluated, trained
from participant.site import EVALUATED_EVENT, MALFORMED, REPLAY, TRAINED_EVENT, record_activity, refuse, site_config, site_of

if TYPE_CHECKING:
    from fedlora.evaluate import EvalResult

TRAINED = "fedlora.trained"  # context.state ConfigRecord: the last round this node trained in this run

app = ClientApp()
secure.register(app)  # query.secagg_<stage>: the secure-aggregation stages


def checked_instruction(msg: Message, context: Context, what: str) -> tuple[Instruction, Config]:
    """The instruction and the configuration to run it with here, or a logged refusal.

    A message that does not parse is refused as malformed; a deployed participant's own
    configuration, policy and approvals then decide (participant/site.py).
    """
    site = site_of(dict(context.node_config))
    try:
        instruction = read_instruction(msg.content)
    except (KeyError, TypeError, ValueError) as err:
        raise refuse(site, f"refused a malformed {what}: {type(err).__name__}: {err}", [MALFORMED]) from err
    evaluating = msg.metadata.message_type == MessageType.EVALUATE
    return instruction, site_config(site, instruction, context.run_id, what, evaluating)


def refuse_stale(context: Context, server_round: int) -> None:
    """A train request for a round this node already trained in this run is a replay: refused."""
    last = int(context.state[TRAINED]["round"]) if TRAINED in context.state else 0
    if server_round <= last:
        raise refuse(
            site_of(dict(context.node_config)), f"refused a train request for round {server_round}: this node already trained round {last} of this run (replay)", [REPLAY]
        )
    context.state[TRAINED] = ConfigRecord({"round": server_round})


@app.train()
@answered
def train(msg: Message, context: Context) -> Message:
    instruction, cfg = checked_instruction(msg, context, "a train request")
    if cfg.secagg.enabled:  # a replayed round is refused before any training
        secure.refuse_replay(context, instruction.config_sha256, instruction.server_round, instruction.adapter_sha256, "a train request")
    refuse_stale(context, instruction.server_round)
    from fedlora.model import weight_format
    from participant.runtime import get_runtime, train_round

    site = site_of(dict(context.node_config))
    planned = ledger_charge(cfg)
    if site is not None:  # a round the site's own ledger cannot afford is refused before training
        ledger.check_charge(site, planned, f"round {instruction.server_round}", round=instruction.server_round)
    runtime = get_runtime(cfg, dict(context.node_config), own_rank=True)
    started = time.perf_counter()
    # the site's own tensors (a split's local part; in prediction-only its whole adapter) train on from where they were
    split = cfg.federation.personalization in PERSONAL_SPLITS
    keeps_own = split or cfg.distillation.prediction_only
    if keeps_own:
        from participant import personal
    own = personal.own_part(context, runtime, cfg, msg.metadata.run_id) if keeps_own else None
    extra = {"own_part": own} if split else {}
    if cfg.distillation.enabled:  # the soft targets the instruction carried, and in prediction-only the site's own adapter
        extra |= {"soft_targets": instruction.soft_targets, "kept": own if cfg.distillation.prediction_only else None}
    upload, metrics = train_round(runtime, cfg, instruction.vector, instruction.server_round, **extra, node_state=context.state)
    if keeps_own:
        personal.keep_own_part(context, runtime, cfg, msg.metadata.run_id, instruction.server_round)
    trained(instruction.server_round, metrics, time.perf_counter() - started)
    record_activity(  # with how this site held the base (its own choice; the coordinator is not told)
        site, TRAINED_EVENT, msg.metadata.run_id, instruction.config_sha256, instruction.server_round,
        trained_from=instruction.adapter_sha256, examples=int(metrics["num-examples"]), base_weights=weight_format(cfg.model),
    )
    if cfg.privacy.noise_multiplier > 0:  # an un-noised statistic of the records: kept here under DP
        metrics.pop("train_loss", None)
        metrics.pop("distill_loss", None)
    if cfg.secagg.enabled:  # kept in context.state until masked (participant/secure.py)
        return secure.hold_update(msg, context, cfg, instruction, upload, metrics)
    content = reply_content(metrics, upload)
    if site is not None:  # charged and recorded before the update leaves; a retried message is charged once
        # the configuration too: the Flower run id is the SuperLink's, which a deviating coordinator could reuse
        key = f"run-{msg.metadata.run_id}/config-{instruction.config_sha256}/round-{instruction.server_round}"
        ledger.record_contribution(
            site, key, planned, msg.metadata.run_id, instruction.config_sha256, instruction.server_round, instruction.adapter_sha256,
            content_bytes(content),
        )
    return Message(content, reply_to=msg)


def ledger_charge(cfg: Config) -> Charge:
    """What one contribution costs as planned: against the coordinator, a plaintext update is seen as it is
    and a secure one (at best) with the full noise; participant/secure.py charges the noise it can vouch for."""
    z = cfg.privacy.noise_multiplier
    return Charge(cfg.federation.fraction, z, z if cfg.secagg.enabled else 0.0)


@app.evaluate()
@answered
def evaluate_global(msg: Message, context: Context) -> Message:
    instruction, cfg = checked_instruction(msg, context, "an evaluation request")
    from fedlora.adapter import check_vector, load_adapter_vector
    from fedlora.evaluate import evaluate
    from fedlora.model import weight_format
    from participant.runtime import get_runtime

    runtime = get_runtime(cfg, dict(context.node_config), own_rank=cfg.distillation.prediction_only)
    served = None
    if cfg.distillation.prediction_only:  # a distiller serves its own adapter (as loaded, before its first round), maybe on its own base
        from participant import personal

        served = personal.own_part(context, runtime, cfg, msg.metadata.run_id)
        if served is None:
            served = runtime.initial
    if served is None:
        served = instruction.vector
        check_vector(served, runtime.layout.size, "global adapter")
    load_adapter_vector(runtime.loaded.model, served, runtime.layout)
    result = evaluate(
        runtime.loaded.model,
        runtime.loaded.tokenizer,
        runtime.shard.test,
        cfg.model.task,
        runtime.loaded.label_names,
        cfg.data.max_length,
        prompt_format=runtime.loaded.prompt_format,
        generation=cfg.evaluation,
    )
    evaluated(instruction.server_round, result)
    record_activity(  # the adapter's hash: the version a round made, so the site can tell which hold its updates
        site_of(dict(context.node_config)), EVALUATED_EVENT, msg.metadata.run_id, instruction.config_sha256, instruction.server_round,
        adapter_sha256=instruction.adapter_sha256, examples=result.examples, base_weights=weight_format(cfg.model),
    )
    metrics = {"num-examples": result.examples, "partition_id": runtime.partition_id, **scores(result, "eval_")}
    if result.label_counts:  # per-class counts of the held-out split: the majority-class reference line
        metrics["eval_label_counts"] = result.label_counts
    if cfg.federation.personalization != "none":  # the site's personalised adapter, scored the same way
        from participant import personal
        from participant.runtime import load_local_accountant

        own = personal.own_part(context, runtime, cfg, msg.metadata.run_id) if cfg.federation.personalization in PERSONAL_SPLITS else None
        personalised = personal.personalise(runtime, cfg, instruction.vector, instruction.server_round, own, node_state=context.state)
        metrics |= scores(personalised[1] if personalised else result, "eval_personal_")  # none yet: it is the global one
        if cfg.privacy.sample_level and cfg.federation.personalization_steps:  # what the site has spent, its fine-tunes included
            metrics["local_epsilon"] = load_local_accountant(cfg, runtime, context.state).get_epsilon(delta=cfg.privacy.local_delta)
        if personalised and runtime.site is not None:
            personal.keep_latest(runtime.site, msg.metadata.run_id, instruction.server_round, personalised[0], runtime)
    return Message(reply_content(metrics), reply_to=msg)


def scores(result: EvalResult, prefix: str) -> dict[str, float]:
    """An evaluation's loss and accuracy, and its greedy-decoding scores when it decoded free-form answers."""
    out = {f"{prefix}loss": result.loss, f"{prefix}accuracy": result.accuracy}
    if result.generated:  # with how many records they cover
        out |= {f"{prefix}exact_match": result.exact_match, f"{prefix}token_f1": result.token_f1, f"{prefix}rouge_l": result.rouge_l, f"{prefix}generated": result.generated}
    return out
