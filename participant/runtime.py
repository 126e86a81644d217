"""What a participant keeps between rounds: the loaded base model and its data shard.

Flower may call the ClientApp many times in one worker process, and in a simulation one
worker serves several virtual participants. The base model is loaded once per process
and reused (simulation users report memory growth when actors reload models each round);
only the adapter weights are overwritten for each call. With lora.participant_ranks a process
may hold one model per LoRA rank it serves (its own rank for training, lora.r for evaluating
the global adapter).

With local DP-SGD a participant also keeps its privacy accountant: the sample-level epsilon it
has spent on its records across rounds. A deployed participant keeps it in its own directory
(accountant.json, replaced atomically), so neither a restart nor Flower's one process per message
forgets it. A simulated one keeps it in its node's Flower state (`context.state`), which Flower
holds per node and run whichever worker process serves a message: kept in a worker's memory, a
site served by two workers would forget what the other charged. Only code that calls
`train_round` in one process for every participant (benchmarks, tests) passes no node state, and
then this process's memory (`_ACCOUNTANTS`) holds it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedlora.adapter import AdapterLayout, adapter_vector, check_vector, load_adapter_vector
from fedlora.aggregate import aggregator_for
from fedlora.aggregate.split import local_layout
from fedlora.atomic import read_json, write_json_atomic
from fedlora.attacks import DATA_ATTACKS, BadData, choose_adversaries, parse_bad_data
from fedlora.config import Config, ModelSection, TrainSection
from fedlora.data import Example, answer_choices, banded, load_examples
from fedlora.model import LoadedModel, load_model
from fedlora.partition import Shard, shard_for, split_holdout
from fedlora.precision import in_format, parse_site_models, parse_site_precision
from fedlora.privacy.clipping import clip
from fedlora.train import round_lr, train_local
from participant.site import refuse, site_of


if TYPE_CHECKING:  # opacus (3 s to import) is loaded only when DP-SGD is on
    from opacus.accountants import RDPAccountant


@dataclass
class ParticipantRuntime:
    loaded: LoadedModel
    layout: AdapterLayout
    shard: Shard
    partition_id: int
    rank: int  # the LoRA rank of `loaded` (lora.r, or this participant's own in lora.participant_ranks)
    site: Path | None = None  # a deployed participant's directory (participant/site.py)
    initial: np.ndarray | None = None  # the adapter as loaded, before any training: a prediction-only site's start


_MODEL: dict[tuple, tuple[LoadedModel, AdapterLayout, np.ndarray]] = {}
_SHARDS: dict[tuple, tuple[Shard, int]] = {}
# Opacus RDPAccountant state_dicts (plain data: a list of (z, q, steps)), one per participant's records,
# for callers that pass no node state (module docstring).
_ACCOUNTANTS: dict[tuple, dict] = {}
LOCAL_ACCOUNTANT = "fedlora.local_accountant"  # context.state ConfigRecord: a simulated site's accountant, as JSON
_PUBLIC: dict[tuple, list[Example]] = {}  # public prompts (distillation), per file and run


def label_names_for(cfg: Config) -> list[str]:
    """Class names (or answer choices): the run's data.label_names, else read from the whole dataset.

    A deployed run states them, so the coordinator needs no data; a simulation reads them from
    the shared dataset, so every party agrees on their order.
    """
    if cfg.data.label_names:
        return list(cfg.data.label_names)
    return answer_choices(load_examples(cfg.data, cfg.federation.seed))


def local_shard(cfg: Config, node_config: dict[str, Any]) -> tuple[Shard, int]:
    """A simulated participant's partition of the shared dataset, or a site's own whole dataset; table
    records written with their numbers' bands among its own training records (`data.numeric_bins`)."""
    examples = load_examples(cfg.data, cfg.federation.seed)
    if "partition-id" in node_config:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config.get("num-partitions", cfg.federation.participants))
        shard = shard_for(examples, cfg.data.partition, num_partitions, partition_id, cfg.data.test_fraction, cfg.federation.seed)
    else:
        shard = split_holdout(examples, cfg.data.test_fraction, cfg.federation.seed)
        partition_id = int(node_config.get("participant-id", -1))
    return Shard(*banded(shard.train, shard.test, cfg.data)), partition_id


def site_model(cfg: Config, partition_id: int, site: Path | None) -> ModelSection:
    """How this participant holds the base: a simulated one as simulation.site_precision (and site_models) name its partition.

    A deployed site's own format is already in `cfg` (participant/local_config.py `effective_config`).
    """
    if site is not None:
        return cfg.model
    own_base = parse_site_models(cfg.simulation.site_models).get(partition_id)  # prediction-only distillation only
    model = dataclasses.replace(cfg.model, name=own_base, sha256="") if own_base else cfg.model
    return in_format(model, parse_site_precision(cfg.simulation.site_precision).get(partition_id))


def get_runtime(cfg: Config, node_config: dict[str, Any], own_rank: bool = False) -> ParticipantRuntime:
    """The participant's model and shard; `own_rank` picks its training rank instead of lora.r.

    A process keeps one model per weight format and rank it serves (simulated sites in several formats).
    """
    shard_key = (repr(cfg.data), cfg.federation.seed, cfg.federation.participants, tuple(sorted(node_config.items())))
    if shard_key not in _SHARDS:
        _SHARDS[shard_key] = local_shard(cfg, node_config)
    shard, partition_id = _SHARDS[shard_key]
    site = site_of(node_config)
    rank = cfg.lora.rank_for(partition_id) if own_rank else cfg.lora.r
    lora = dataclasses.replace(cfg.lora, r=rank, participant_ranks=[])
    model = site_model(cfg, partition_id, site)
    run_key = (repr(cfg.model), repr(cfg.lora), repr(cfg.data), cfg.federation.seed)
    if any(key[0] != run_key for key in _MODEL):
        _MODEL.clear()  # one run's base models per process: a new config replaces the old ones
    key = (run_key, repr(model), rank)
    if key not in _MODEL:
        loaded = load_model(model, lora, label_names_for(cfg), cfg.federation.seed)
        initial, layout = adapter_vector(loaded.model)
        _MODEL[key] = (loaded, layout, initial)
    loaded, layout, initial = _MODEL[key]
    return ParticipantRuntime(loaded, layout, shard, partition_id, rank, site, initial)


def round_train(cfg: Config, server_round: int) -> TrainSection:
    """[train] with this round's rate under train.lr_schedule (over the planned federation.rounds)."""
    return dataclasses.replace(cfg.train, lr=round_lr(cfg.train, server_round, cfg.federation.rounds))


def local_seed(cfg: Config, server_round: int, partition_id: int) -> int:
    """The seed of one participant's local training in one round (batches, dropout)."""
    return cfg.federation.seed * 100_003 + server_round * 1_009 + partition_id


def accountant_key(cfg: Config, runtime: ParticipantRuntime) -> tuple:
    """Which records a privacy accountant covers: one participant's partition of one dataset."""
    return (repr(cfg.data), cfg.federation.seed, cfg.federation.participants, runtime.partition_id)


def load_local_accountant(cfg: Config, runtime: ParticipantRuntime, node_state: RecordDict | None = None) -> RDPAccountant:
    """This site's accountant: from its directory, else its node's Flower state, else this process (module docstring)."""
    if runtime.site:
        state = read_json(runtime.site / "accountant.json")
    elif node_state is not None:
        state = json.loads(str(node_state[LOCAL_ACCOUNTANT]["state"])) if LOCAL_ACCOUNTANT in node_state else None
    else:
        state = _ACCOUNTANTS.get(accountant_key(cfg, runtime))
    from fedlora.privacy import local_dp

    return local_dp.load_accountant(state)


def save_local_accountant(cfg: Config, runtime: ParticipantRuntime, accountant: RDPAccountant, node_state: RecordDict | None = None) -> None:
    if runtime.site:
        write_json_atomic(runtime.site / "accountant.json", accountant.state_dict())
    elif node_state is not None:
        node_state[LOCAL_ACCOUNTANT] = ConfigRecord({"state": json.dumps(accountant.state_dict())})
    else:
        _ACCOUNTANTS[accountant_key(cfg, runtime)] = accountant.state_dict()


def training_examples(cfg: Config, runtime: ParticipantRuntime) -> list[Example]:
    """The shard's training records, or bad ones if this simulated participant attacks its data
    (simulation.attack) or is given bad data (simulation.bad_data).

    A deployed site (one with a directory) always trains on its own records: the run
    configuration comes from the coordinator, which must not be able to make a hospital poison itself.
    """
    sim = cfg.simulation
    if runtime.site is not None:
        return runtime.shard.train
    bad = parse_bad_data(sim.bad_data).get(runtime.partition_id)
    if bad is None and sim.adversaries > 0 and sim.attack in DATA_ATTACKS:
        attackers = choose_adversaries(cfg.federation.participants, sim.adversaries, cfg.federation.seed)
        bad = BadData("label-flip") if runtime.partition_id in attackers else None
    if bad is None:
        return runtime.shard.train
    return bad.examples(runtime.shard.train, runtime.loaded.label_names, cfg.federation.seed + runtime.partition_id)


def epsilon_past_budget(cfg: Config, accountant: RDPAccountant, records: int, steps: int) -> float | None:
    """The sample-level epsilon this site would have spent after `steps` more DP-SGD steps over `records`, when
    that passes privacy.local_epsilon_budget; None when it does not (or there is no budget)."""
    from fedlora.privacy import local_dp

    budget = cfg.privacy.local_epsilon_budget
    planned = local_dp.epsilon_after(accountant, cfg.privacy, local_dp.sample_rate(cfg.train.batch_size, records), steps)
    return planned if budget > 0 and planned > budget else None


def site_privacy(cfg: Config, runtime: ParticipantRuntime) -> Config:
    """`cfg` with this site's own DP-SGD noise when the run sets privacy.local_epsilon_target: the multiplier at which
    the run's planned steps on this site's records (every round's local steps and every evaluation's fine-tune, as
    if it took part in every round) spend the target, which is also its budget (the lower one if the run or the
    site set a budget too). Unchanged otherwise."""
    privacy = cfg.privacy
    if privacy.local_epsilon_target <= 0:
        return cfg
    from fedlora.privacy import local_dp

    fed = cfg.federation
    steps = fed.rounds * cfg.train.local_steps + fed.evaluated_rounds() * fed.personalization_steps
    rate = local_dp.sample_rate(cfg.train.batch_size, len(training_examples(cfg, runtime)))
    noise = local_dp.noise_for_target(privacy.local_epsilon_target, privacy.local_delta, rate, steps)
    budget = min(b for b in (privacy.local_epsilon_target, privacy.local_epsilon_budget) if b > 0)
    own = dataclasses.replace(privacy, local_noise_multiplier=noise, local_epsilon_target=0.0, local_epsilon_budget=budget)
    return dataclasses.replace(cfg, privacy=own)


def refuse_past_budget(cfg: Config, accountant: RDPAccountant, records: int, runtime: ParticipantRuntime, server_round: int) -> None:
    """Raise before training when this round's DP-SGD steps would take epsilon past the local budget."""
    budget = cfg.privacy.local_epsilon_budget
    planned = epsilon_past_budget(cfg, accountant, records, cfg.train.local_steps)
    if planned is not None:
        spent = accountant.get_epsilon(delta=cfg.privacy.local_delta)
        raise refuse(
            runtime.site,
            f"participant {runtime.partition_id} refuses to train round {server_round}: it has spent sample-level epsilon "
            f"{spent:.4g} (delta {cfg.privacy.local_delta:g}) on its records, and this round's {cfg.train.local_steps} "
            f"DP-SGD steps would bring it to {planned:.4g}, past privacy.local_epsilon_budget={budget:g}",
            ["privacy.local_epsilon_budget"],
        )


def public_prompts_for(cfg: Config, runtime: ParticipantRuntime, server_round: int) -> list[Example]:
    """The run's public prompts from this site's own copy, or a refusal when its hash is not the one the run names."""
    from fedlora.distill import load_public_prompts, public_data_problem

    problem = public_data_problem(cfg.distillation)
    if problem:
        raise refuse(
            runtime.site, f"participant {runtime.partition_id} refuses round {server_round}: {problem}", ["distillation.public_sha256"]
        )
    key = (cfg.distillation.public_data, cfg.distillation.public_sha256, cfg.distillation.max_prompts, repr(cfg.data), runtime.partition_id)
    if key not in _PUBLIC:  # a table's numbers in this site's own bands, as its records are (data.numeric_bins)
        _PUBLIC[key] = banded(runtime.shard.train, load_public_prompts(cfg), cfg.data)[1]
    return _PUBLIC[key]


def checked_soft_targets(targets: np.ndarray | None, prompts: int, classes: int) -> np.ndarray | None:
    """Soft targets as an instruction carried them: P x C rows of probabilities, or ValueError."""
    if targets is None:
        return None
    targets = np.asarray(targets, dtype=np.float32)
    if targets.shape != (prompts, classes) or not np.all(np.isfinite(targets)) or targets.min() < 0 or not np.allclose(targets.sum(1), 1, atol=1e-3):
        raise ValueError(f"the instruction's soft targets are not {prompts} x {classes} rows of probabilities (shape {targets.shape})")
    return targets


def train_round(
    runtime: ParticipantRuntime, cfg: Config, global_vector: np.ndarray, server_round: int,
    own_part: np.ndarray | None = None, soft_targets: np.ndarray | None = None, kept: np.ndarray | None = None,
    node_state: RecordDict | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One round on this participant: start from the global adapter, train, return (upload, metrics).

    The start is the global adapter as the aggregation mode defines it at this participant's
    rank, with the site's `own_part` of a split adapter put in (participant/personal.py); the
    upload is the delta of what the mode shares (in frozen-a: lora_B and heads only), clipped to
    robust.clip_norm when the configuration relies on bounded updates.

    With [distillation] the upload ends with the prediction block on the public prompts (fedlora/distill.py),
    and training adds the distillation term towards `soft_targets` (none in round 1). In the prediction-only
    variant the site starts from its own adapter `kept` (the global one the first time) and sends the block alone.
    `node_state` (the node's `context.state`) holds a simulated site's DP-SGD accountant (module docstring).
    """
    from fedlora.distill import PublicTargets, adapter_clip, encode_block, predict

    cfg = site_privacy(cfg, runtime)  # under a target epsilon, DP-SGD at this site's own noise
    distill = cfg.distillation
    prompts = public_prompts_for(cfg, runtime, server_round) if distill.enabled else []
    targets = checked_soft_targets(soft_targets, len(prompts), len(runtime.loaded.label_names)) if distill.enabled else None
    aggregator = aggregator_for(cfg)
    global_layout = runtime.layout.with_rank(cfg.lora.r)
    if distill.prediction_only:  # this site's own adapter, trained on across rounds, on a base that may be its own
        own = kept if kept is not None else runtime.initial if runtime.initial is not None else global_vector
        check_vector(own, runtime.layout.size, "this site's own adapter")
        start = np.array(own, dtype=np.float32, copy=True)
    else:
        check_vector(global_vector, global_layout.size, "global adapter")
        start = aggregator.start(global_vector, global_layout, runtime.rank)
    if own_part is not None:
        start = runtime.layout.put(start, local_layout(runtime.layout, cfg.federation.personalization), own_part)
    load_adapter_vector(runtime.loaded.model, start, runtime.layout)
    examples = training_examples(cfg, runtime)
    accountant = None
    if cfg.privacy.local_noise_multiplier > 0:
        accountant = load_local_accountant(cfg, runtime, node_state)
        refuse_past_budget(cfg, accountant, len(examples), runtime, server_round)
    public = PublicTargets(prompts, targets, distill.weight, distill.temperature) if targets is not None and distill.weight > 0 else None
    try:
        with aggregator.training(runtime.loaded.model):  # in sb mode: only R between the fixed factors trains
            result = train_local(
                runtime.loaded.model,
                runtime.loaded.tokenizer,
                examples,
                round_train(cfg, server_round),
                cfg.model.task,
                runtime.loaded.label_names,
                cfg.data.max_length,
                seed=local_seed(cfg, server_round, runtime.partition_id),
                privacy=cfg.privacy,
                accountant=accountant,
                prompt_format=runtime.loaded.prompt_format,
                distill=public,
            )
    finally:  # steps taken count even if the round then fails
        if accountant is not None:
            save_local_accountant(cfg, runtime, accountant, node_state)
    trained, _ = adapter_vector(runtime.loaded.model)
    if distill.prediction_only:  # no parameters leave the site
        upload = np.zeros(0, dtype=np.float32)
    else:
        upload = aggregator.encode_upload(trained - start, runtime.layout, global_layout, runtime.rank)
        if cfg.clips_updates:  # bounded before it leaves: the rule, the secure encoding and DP rely on it
            bound = adapter_clip(cfg.robust.clip_norm, distill.prediction_clip) if distill.enabled else cfg.robust.clip_norm
            upload = clip(upload, bound).astype(np.float32)
    metrics = {
        "num-examples": len(runtime.shard.train),
        "train_loss": result.mean_loss,
        "partition_id": runtime.partition_id,
        "lora_r": runtime.rank,
    }
    if distill.enabled:  # appended after the adapter part: one vector, clipped, masked and noised as one
        loaded = runtime.loaded
        probabilities = predict(
            loaded.model, loaded.tokenizer, prompts, cfg.model.task, loaded.label_names, cfg.data.max_length, distill.temperature,
            prompt_format=loaded.prompt_format,
        )
        block = encode_block(probabilities, distill.prediction_clip)
        upload = np.concatenate([upload.astype(np.float32), block])
        if cfg.clips_updates:  # a no-op by construction (the two parts' bounds add up to clip_norm), kept as the guard
            upload = clip(upload, cfg.robust.clip_norm).astype(np.float32)
        metrics |= {"distill_prompts": len(prompts), "distill_block": int(block.size)}
        if result.distill_loss is not None:
            metrics["distill_loss"] = result.distill_loss
    if accountant is not None:
        metrics.update({"local_epsilon": result.local_epsilon, "local_delta": cfg.privacy.local_delta})
    return upload, metrics
