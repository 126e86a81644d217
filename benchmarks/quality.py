"""Held-out quality of federated LoRA against centralised and local-only training.

On non-IID splits of built-in clinical tasks (`--tasks`: Dirichlet alpha=0.3 label skew, and a
natural split by a column of each task's own, `TASKS`), for the pretrained MiniLM encoder
(classification) and the built-in tiny Llama (generation, or `tiny-llama-head`: with a classification
head), on an NF4 base, at equal local compute:

- centralised: one LoRA trained on the pooled training records, `participants x local_steps`
  steps per round (the whole federation's compute), scored on every participant's test split;
- local-only: each participant trains alone, `local_steps` per round, scored on its own split
  (reported as the mean over participants);
- federated: every `lora.mode` (fedavg, frozen-a, exact) with the FedAvg and FedAdam server
  optimisers, `local_steps` per participant per round, the global adapter scored on every split;
- personalised (`federation.personalization`), each scored by every participant on its own split
  and reported like local-only: `finetune:<local_steps>` (each round, every participant fine-tunes
  the fedavg global adapter on its own records, `participant.personal.personalise`), `local-head`
  (each participant keeps its own classification head; models with a head) and `local-b` (FedSA-LoRA:
  lora_A shared, each participant's lora_B its own), all over fedavg;
- secure (`--secure MODE`, default frozen-a, the mode every secure or private run relies on): the
  same federation through `federation.run_federation` (the real Coordinator, SecAgg+ stages and
  participant ClientApp) with `secagg.enabled=true`, once without DP and once at user-level
  epsilon 8 (delta 1e-5) with distributed DP, every round's global adapter scored like the others;
  with `finetune` in `--personal`, the sites fine-tune in those runs too and report their
  personalised scores every round (the coordinator's `participant_evaluations`), another method each;
  with `--record-level`, once more at sample-level epsilon 8: DP-SGD at every site (`record_level_noise`).

`--federated` takes settings of one method after commas (`frozen-a+fedavg,lora.frozen_a_gain=8`),
so a sweep of one mode's settings is one command; `--lr` sets every method's `train.lr`.

The in-process methods run in this one process, without Ray, through the same functions the Flower
apps call: `participant.runtime.train_round` (start, train, upload), `fedlora.aggregate.aggregate_round`
(mean, server optimiser, re-factorisation) and `fedlora.evaluate.evaluate`. Each scenario also
records the majority class and `fedlora.baseline`'s logistic regression on the pooled raw columns;
`summary` gives each method's mean and spread over seeds and a met/missed line per target of issue 28.

On `diabetes` (eight numeric fields only) centralised MiniLM + LoRA stays at the majority class after
200 steps at lr 3e-3 and 1e-2, so no method separates from another there.

    python benchmarks/quality.py --quick                # smoke run of every code path (4 min on 2 busy cores)
    python benchmarks/quality.py --models tiny-llama --tasks stress --seeds 0 1 2 --rounds 8 --local-steps 10 \
        --federated fedavg+fedavg frozen-a+fedavg exact+fedavg --personal finetune local-b   # 24 min on 2 cores
    python benchmarks/quality.py --report benchmarks/results/quality-stress-tiny-llama.json

Scenarios run in parallel processes (`--jobs`, default 2) with one torch thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.adapter import adapter_vector, load_adapter_vector  # noqa: E402
from fedlora.aggregate import Contribution, aggregate_round, aggregator_for, make_server_optimizer  # noqa: E402
from fedlora.aggregate.split import SPLITS as ADAPTER_SPLITS, local_layout  # noqa: E402
from fedlora.config import Config, load_config  # noqa: E402
from fedlora.data import answer_choices, banded, load_examples  # noqa: E402
from fedlora.evaluate import evaluate  # noqa: E402
from fedlora.model import load_model  # noqa: E402
from fedlora.partition import Shard, shard_for  # noqa: E402
from participant.personal import personalise  # noqa: E402
from participant.runtime import ParticipantRuntime, train_round  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {
    "minilm": ["model.name=builtin:minilm", "model.task=classification"],
    "tiny-llama": ["model.name=builtin:tiny-llama", "model.task=generation"],
    # the same NF4 base with a classification head (clean_cost.py's model): a site can keep its head (local-head)
    "tiny-llama-head": ["model.name=builtin:tiny-llama", "model.task=classification"],
}
# Built-in tasks (fedlora/data.py BUILTIN_TASKS) -> the column of their natural split: four tables, two and three classes.
TASKS = {"hypertension": "Age", "stress": "headache", "cardiovascular": "age", "glaucoma": "age"}
SPLITS = ["dirichlet:0.3", "natural"]  # "natural": the task's own column in TASKS
FEDERATED = [(mode, opt) for mode in ("fedavg", "frozen-a", "exact") for opt in ("fedavg", "fedadam")]
TARGET_SHARE = 0.95
PERSONAL_TAGS = {"finetune": "personalised", "local-head": "local head", "local-b": "local B"}  # federation.personalization -> name
PERSONAL_METHODS = {kind: f"fedavg + fedavg, {tag}" for kind, tag in PERSONAL_TAGS.items()}  # each scored on own splits
PERSONALISED = PERSONAL_METHODS["finetune"]  # each participant's fine-tune of the global adapter, on its own split
SETTLED_ROUNDS = 3  # verdicts use the mean of the last rounds: a single round's accuracy swings by up to 0.2
SECURE = "secure aggregation"
EPSILON = 8.0  # the private cells' epsilon at DELTA over the run: user-level (every participant in every round), and record-level
RECORD_LEVEL = "record-level"  # the DP-SGD cell's tag (--record-level)
DELTA = 1e-5
CLIP_SHARE = 0.55  # DP clip norm / median honest update norm, benchmarks/privacy.py's rule: every update is clipped
MARGIN = 0.05  # targets: 5 points above the majority class where the linear baseline is 5 points above it
PERSONAL_SHARE = 0.8  # targets: the best personalisation beats local-only on this share of participants' own splits
FROZEN_GAP = 0.03  # targets: the secure-compatible mode within 3 points of fedavg at the final round


@dataclass(frozen=True)
class Scale:
    """How much training each method gets; the same for every method of a scenario."""

    participants: int = 4
    rounds: int = 4
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 3e-3  # train.lr's default, not tuned per method
    quantization: str = "nf4"  # the QLoRA base; NF4 on CPU costs minilm 2-3x per step (`--quantization none`)
    max_examples: int = 800  # larger tables are capped to keep per-round evaluation cheap
    seed: int = 0
    dataset: str = "hypertension"


# Per model, so each gets enough steps to leave the majority class: a MiniLM step costs ~10x a tiny-Llama step.
FULL = {"minilm": Scale(rounds=10, local_steps=15), "tiny-llama": Scale(rounds=10, local_steps=40), "tiny-llama-head": Scale(rounds=10, local_steps=40)}
# The smoke run covers NF4 through tiny Llama; MiniLM's NF4 step costs 2-3x and would triple its minutes.
QUICK = {model: Scale(participants=3, rounds=2, local_steps=2, batch_size=4, max_examples=150, quantization=q)
         for model, q in (("minilm", "none"), ("tiny-llama", "nf4"), ("tiny-llama-head", "nf4"))}


def scenario_config(
    model: str, split: str, scale: Scale, mode: str = "fedavg", server: str = "fedavg", local_steps: int = 0, personalization: str = "none",
    server_lr: float = 0.0, extra: tuple[str, ...] = (),
) -> Config:
    return load_config(
        None,
        MODELS[model]
        + [
            f"data.dataset={scale.dataset}",
            f"data.partition={split}",
            f"data.max_examples={scale.max_examples}",
            f"model.quantization={scale.quantization}",
            "model.device=cpu",
            f"lora.mode={mode}",
            f"federation.participants={scale.participants}",
            f"federation.rounds={scale.rounds}",
            f"federation.seed={scale.seed}",
            f"federation.server_optimizer={server}",
            f"federation.server_lr={server_lr}",
            f"train.local_steps={local_steps or scale.local_steps}",
            f"train.batch_size={scale.batch_size}",
            f"train.lr={scale.lr}",
            f"federation.personalization={personalization}",
            *extra,
        ],
    )


def shards_for(cfg: Config) -> tuple[list[Shard], list[str]]:
    """Each participant's train/test records, exactly as `participant.runtime.local_shard` makes them (each with
    its numbers' bands among its own training records)."""
    examples = load_examples(cfg.data, cfg.federation.seed)
    n = cfg.federation.participants
    shards = [shard_for(examples, cfg.data.partition, n, p, cfg.data.test_fraction, cfg.federation.seed) for p in range(n)]
    return [Shard(*banded(s.train, s.test, cfg.data)) for s in shards], answer_choices(examples)


def score(loaded, cfg: Config, shards: list[Shard]) -> dict[str, Any]:
    """The loaded adapter on every participant's test split, and pooled (example-weighted)."""
    per = [evaluate(loaded.model, loaded.tokenizer, s.test, cfg.model.task, loaded.label_names, cfg.data.max_length, prompt_format=loaded.prompt_format) for s in shards]
    sizes = [r.examples for r in per]
    return {
        "accuracy": float(np.average([r.accuracy for r in per], weights=sizes)),
        "loss": float(np.average([r.loss for r in per], weights=sizes)),
        "per_participant_accuracy": [r.accuracy for r in per],
        "per_participant_loss": [r.loss for r in per],
    }


_LOADED: dict[tuple, tuple[Any, np.ndarray, Any]] = {}


def fresh_model(cfg: Config, labels: list[str]):
    """The model with its seeded initial adapter; loaded once per (model, lora.mode) and reset after."""
    key = (repr(cfg.model), repr(cfg.lora), tuple(labels), cfg.federation.seed)
    if key not in _LOADED:
        if any(k[0] != key[0] for k in _LOADED):
            _LOADED.clear()
        loaded = load_model(cfg.model, cfg.lora, labels, cfg.federation.seed)
        _LOADED[key] = (loaded, *adapter_vector(loaded.model))
    loaded, initial, layout = _LOADED[key]
    load_adapter_vector(loaded.model, initial, layout)
    return loaded, initial.copy(), layout


def run_federated(cfg: Config, shards: list[Shard], labels: list[str], start: dict[str, Any]) -> list[dict[str, Any]]:
    """R rounds of: every participant trains from the global adapter, then one aggregation step; with
    federation.personalization, each participant's fine-tune of the new global adapter on its own split too."""
    loaded, vector, layout = fresh_model(cfg, labels)
    fed = cfg.federation
    aggregator = aggregator_for(cfg)
    optimizer = make_server_optimizer(fed.server_optimizer, fed.server_lr, fed.server_beta1, fed.server_beta2, fed.server_tau)
    runtimes = [ParticipantRuntime(loaded, layout, shard, p, cfg.lora.r) for p, shard in enumerate(shards)]
    split = local_layout(layout, fed.personalization) if fed.personalization in ADAPTER_SPLITS else None
    own: list[np.ndarray | None] = [None] * len(runtimes)  # each participant's part of a split adapter
    curve = [{"round": 0, **start}]  # the seeded initial adapter: the same for every method
    for server_round in range(1, fed.rounds + 1):
        contributions = []
        for runtime in runtimes:
            upload, metrics = train_round(runtime, cfg, vector, server_round, own_part=own[runtime.partition_id])
            if split is not None:
                own[runtime.partition_id] = layout.take(adapter_vector(loaded.model)[0], split)
            contributions.append(Contribution(f"participant-{runtime.partition_id}", upload, metrics["num-examples"], runtime.rank))
        step = aggregate_round(aggregator, optimizer, vector, layout, contributions)
        vector = step.vector
        load_adapter_vector(loaded.model, vector, layout)
        row = {"round": server_round, **score(loaded, cfg, shards)}
        row["mean_cosine_to_aggregate"] = float(np.mean([u["cosine_to_aggregate"] for u in step.metrics["participant_updates"]]))
        row["update_norms"] = [float(np.linalg.norm(c.upload)) for c in contributions]  # what a DP clip norm is chosen from
        if fed.personalization != "none":
            row["personal"] = own_split_row([personalise(r, cfg, vector, server_round, own[r.partition_id])[1] for r in runtimes])
            load_adapter_vector(loaded.model, vector, layout)
        if "svd_truncation_error" in step.metrics:
            row["svd_truncation_error"] = step.metrics["svd_truncation_error"]
        curve.append(row)
    return curve


def own_split_row(results: list[Any]) -> dict[str, Any]:
    """Per-participant results, each on its own split, as a row: the mean over participants."""
    return {
        "accuracy": float(np.mean([r.accuracy for r in results])),
        "loss": float(np.mean([r.loss for r in results])),
        "per_participant_accuracy": [r.accuracy for r in results],
        "per_participant_loss": [r.loss for r in results],
    }


def run_alone(cfg: Config, shard: Shard, partition_id: int, labels: list[str], eval_shards: list[Shard], start: dict[str, Any]) -> list[dict[str, Any]]:
    """One party training by itself for R rounds (its 'global' adapter is its own), same loop as above."""
    loaded, vector, layout = fresh_model(cfg, labels)
    runtime = ParticipantRuntime(loaded, layout, shard, partition_id, cfg.lora.r)
    curve = [{"round": 0, **start}]
    for server_round in range(1, cfg.federation.rounds + 1):
        upload, _ = train_round(runtime, cfg, vector, server_round)
        vector = vector + upload
        load_adapter_vector(loaded.model, vector, layout)
        curve.append({"round": server_round, **score(loaded, cfg, eval_shards)})
    return curve


def run_coordinated(
    cfg: Config, shards: list[Shard], labels: list[str], start: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The same federation through the real Coordinator and participant ClientApp (`federation.run_federation`):
    every round's global adapter, read back from the run's checkpoints, scored like the in-process methods;
    what the coordinator reported of the run (epsilon spent, its own pooled accuracy); and its metrics rows."""
    from coordinator.checkpoint import VERSION_CHECKPOINTS, load_checkpoint
    from federation import run_federation

    loaded, _, layout = fresh_model(cfg, labels)
    with tempfile.TemporaryDirectory() as run_dir:
        rows, _ = run_federation(cfg, Path(run_dir))
        curve = [{"round": 0, **start}]
        for server_round in range(1, cfg.federation.rounds + 1):
            state = load_checkpoint(Path(run_dir) / VERSION_CHECKPOINTS / f"round-{server_round:04d}.npz")
            load_adapter_vector(loaded.model, np.asarray(state["adapter"], dtype=np.float32), layout)
            curve.append({"round": server_round, **score(loaded, cfg, shards)})
    trained = [r for r in rows[1:] if "stopped" not in r]
    reported = {
        "rounds_applied": sum(bool(r.get("applied", True)) for r in trained),
        "epsilon": trained[-1].get("epsilon", math.inf) if trained else math.inf,
        # sample-level, the largest any site reported after its last round (its last evaluation's fine-tune comes after)
        **({"local_epsilon": max(trained[-1]["local_epsilon"].values())} if trained and "local_epsilon" in trained[-1] else {}),
        "coordinator_eval_accuracy": rows[-1].get("eval_accuracy", math.nan),
    }
    return curve, reported, rows


def claimed_personal_curve(rows: list[dict[str, Any]], start: dict[str, Any]) -> list[dict[str, Any]]:
    """The personalised adapters' scores each site reported at each evaluated round (the coordinator's
    `participant_evaluations`), each on its own split, as rows like the in-process personalised methods'."""
    curve = [{"round": 0, **start}]
    for row in rows[1:]:
        sites = sorted(row.get("participant_evaluations", []), key=lambda site: int(site["participant"].rsplit("-", 1)[1]))
        if sites:
            accuracy, loss = [s["eval_personal_accuracy"] for s in sites], [s["eval_personal_loss"] for s in sites]
            curve.append({"round": row["round"], "accuracy": float(np.mean(accuracy)), "loss": float(np.mean(loss)),
                          "per_participant_accuracy": accuracy, "per_participant_loss": loss})
    return curve


def record_level_noise(shards: list[Shard], scale: Scale, fine_tune_steps: int) -> dict[str, Any]:
    """DP-SGD's noise multiplier giving every site sample-level epsilon EPSILON at DELTA over the whole run: each
    round's local steps and, with a fine-tune, one fine-tune per evaluation (rounds + 1: round 0 is evaluated too),
    at the smallest site's sampling rate, whose epsilon is the largest (`noise_for_target`, the search a site runs
    for privacy.local_epsilon_target over its own rate)."""
    from fedlora.privacy.local_dp import noise_for_target, sample_rate

    rate = max(sample_rate(scale.batch_size, len(s.train)) for s in shards)
    steps = scale.rounds * scale.local_steps + (scale.rounds + 1) * fine_tune_steps
    noise = noise_for_target(EPSILON, DELTA, rate, steps)
    return {"epsilon": EPSILON, "delta": DELTA, "sample_rate": rate, "steps": steps, "noise_multiplier": round(float(noise), 4)}


def secure_cells(model: str, split: str, scale: Scale, modes: list[str], shards: list[Shard], labels: list[str], start: dict[str, Any],
                 methods: dict[str, list[dict[str, Any]]], personal: list[str], record_level: bool = False) -> dict[str, Any]:
    """Each mode under secure aggregation (one secure sum per round, default clip norm) and then at epsilon 8;
    with `finetune` in `personal`, the same runs also fine-tune at every site and evaluate every round, and each
    site's personalised score on its own split, as it reported it, is a method of its own. (The fine-tune
    starts from the global adapter a site receives, so it never changes what is masked or noised.)

    DP is distributed (secagg.enabled=true): each participant adds its share of the noise before masking, so
    nobody sees an un-noised sum, the deployment a consortium would run. Every participant takes part in every
    round (q = 1, no amplification); the noise multiplier is `noise_for_budget`'s for epsilon 8 over the rounds,
    the clip norm CLIP_SHARE times the median honest update norm of the same mode's in-process run here (as
    benchmarks/privacy.py chooses it from no-DP runs): chosen from the data, so it is a benchmark's choice, not a
    private one.

    With `record_level`, also at sample-level epsilon 8 (`record_level_noise`): each site trains (and fine-tunes) with
    DP-SGD under secure aggregation, so what is protected is each patient's record rather than each site's whole
    table, the unit a consortium of a few hospitals can afford (with four sites, user-level noise of std z C swamps
    a sum of four updates of norm at most C). Each site also enforces the budget itself (privacy.local_epsilon_budget)."""
    from fedlora.privacy.accountant import noise_for_budget

    fine_tune = f"finetune:{scale.local_steps}" if "finetune" in personal else "none"
    secure = ("secagg.enabled=true", "secagg.bucket_size=0", f"federation.eval_every={1 if fine_tune != 'none' else scale.rounds}")
    noise = noise_for_budget(1.0, scale.rounds, DELTA, EPSILON)
    settings: dict[str, Any] = {"dp": "distributed", "epsilon": EPSILON, "delta": DELTA, "sample_rate": 1.0, "noise_multiplier": noise, "clip_norms": {}}
    for mode in modes:
        honest = methods.get(f"{mode} + fedavg")
        if honest is None:
            raise ValueError(f"--secure {mode}: the DP clip norm is chosen from the in-process {mode}+fedavg run; add it to --federated")
        clip_norm = round(CLIP_SHARE * float(np.median([n for row in honest[1:] for n in row["update_norms"]])), 4)
        settings["clip_norms"][mode] = clip_norm
        private = (*secure, f"robust.clip_norm={clip_norm}", f"privacy.noise_multiplier={noise}", f"privacy.delta={DELTA}")
        cells = [(f"{mode} + fedavg, {SECURE}", secure), (f"{mode} + fedavg, {SECURE}, epsilon {EPSILON:g}", private)]
        if record_level:
            sgd = settings["record_level"] = record_level_noise(shards, scale, scale.local_steps if fine_tune != "none" else 0)
            cells.append((f"{mode} + fedavg, {SECURE}, {RECORD_LEVEL} epsilon {EPSILON:g}", (
                *secure, f"privacy.local_noise_multiplier={sgd['noise_multiplier']}", f"privacy.local_delta={DELTA}",
                f"privacy.local_epsilon_budget={EPSILON}",
            )))
        for name, extra in cells:
            cfg = scenario_config(model, split, scale, mode, personalization=fine_tune, extra=extra)
            curve, reported, rows = run_coordinated(cfg, shards, labels, start)
            curve[-1]["coordinator"] = reported
            methods[name] = curve
            print(f"  {model} {split} {name}: accuracy {curve[-1]['accuracy']:.3f}", flush=True)
            if fine_tune != "none":
                personal_name = f"{mode} + fedavg, {PERSONAL_TAGS['finetune']}, {name.split(', ', 1)[1]}"
                own_start = {k: v for k, v in methods["local-only"][0].items() if k != "round"}
                methods[personal_name] = claimed_personal_curve(rows, own_start)
                print(f"  {model} {split} {personal_name}: accuracy {methods[personal_name][-1]['accuracy']:.3f}", flush=True)
    return settings


def reference_points(cfg: Config, shards: list[Shard]) -> dict[str, float]:
    """The majority class (the commonest answer over every test split, as the coordinator reports it) and the
    linear baseline on the pooled raw columns (simulation only), on exactly these shards."""
    from fedlora.baseline import linear_baseline
    from fedlora.data import label_column

    tests = [e.response for s in shards for e in s.test]
    baseline = linear_baseline([e for s in shards for e in s.train], [e for s in shards for e in s.test], label_column(cfg.data))
    return {"majority": Counter(tests).most_common(1)[0][1] / len(tests), "linear_baseline": baseline.accuracy}


def run_scenario(model: str, split: str, scale: Scale, federated: list[str], personal: list[str], secure: list[str],
                 record_level: bool = False) -> dict[str, Any]:
    started = time.monotonic()
    base = scenario_config(model, split, scale)
    shards, labels = shards_for(base)
    methods: dict[str, list[dict[str, Any]]] = {}
    references = reference_points(base, shards)

    start = score(fresh_model(base, labels)[0], base, shards)
    pooled = Shard(*banded([e for s in shards for e in s.train], [e for s in shards for e in s.test], base.data))  # pooled bands
    central_cfg = scenario_config(model, split, scale, local_steps=scale.participants * scale.local_steps)
    central_view = [Shard(s.train, banded(pooled.train, s.test, base.data)[1]) for s in shards]  # each split in the pooled bands
    methods["centralised"] = run_alone(central_cfg, pooled, -1, labels, central_view, start)

    own_start = [
        {"accuracy": a, "loss": l, "per_participant_accuracy": [a], "per_participant_loss": [l]}
        for a, l in zip(start["per_participant_accuracy"], start["per_participant_loss"])
    ]
    local_curves = [run_alone(base, shard, p, labels, [shard], own_start[p]) for p, shard in enumerate(shards)]
    methods["local-only"] = [
        {
            "round": rows[0]["round"],
            "accuracy": float(np.mean([r["accuracy"] for r in rows])),  # mean over participants, each on its own split
            "loss": float(np.mean([r["loss"] for r in rows])),
            "per_participant_accuracy": [r["accuracy"] for r in rows],
            "per_participant_loss": [r["loss"] for r in rows],
        }
        for rows in zip(*local_curves)
    ]
    for spec in federated:
        mode, server, settings = method_parts(spec)
        optimiser, _, server_lr = server.partition("@")
        cfg = scenario_config(model, split, scale, mode, optimiser, server_lr=float(server_lr or 0), extra=settings)
        name = method_name(spec)
        methods[name] = run_federated(cfg, shards, labels, start)
        print(f"  {model} {split} {name}: accuracy {methods[name][-1]['accuracy']:.3f}", flush=True)
    for kind, name in PERSONAL_METHODS.items():
        if kind not in personal or (kind == "local-head" and MODELS[model][1] != "model.task=classification"):
            continue  # a generation model has no head of its own
        personalization = f"finetune:{scale.local_steps}" if kind == "finetune" else kind
        curve = run_federated(scenario_config(model, split, scale, personalization=personalization), shards, labels, start)
        methods[name] = [{"round": 0, **methods["local-only"][0]}] + [{"round": row["round"], **row["personal"]} for row in curve[1:]]
        print(f"  {model} {split} {name}: accuracy {methods[name][-1]['accuracy']:.3f}", flush=True)
    private = secure_cells(model, split, scale, secure, shards, labels, start, methods, personal, record_level) if secure else None

    return {
        "model": model,
        "dataset": scale.dataset,
        "split": split,
        "scale": asdict(scale),
        "participants": [
            {"train": len(s.train), "test": len(s.test), "labels": {name: sum(e.response == name for e in s.train) for name in labels}}
            for s in shards
        ],
        **references,
        "secure_settings": private,
        "methods": methods,
        "verdict": verdict(methods),
        "seconds": round(time.monotonic() - started, 1),
    }


def method_parts(spec: str) -> tuple[str, str, tuple[str, ...]]:
    """'MODE+SERVER[@LR][,key=value...]' -> (mode, server[@lr], config overrides of this method alone)."""
    head, *settings = spec.split(",")
    mode, plus, server = head.partition("+")
    if not plus or not mode or not server or any("=" not in s for s in settings):
        raise ValueError(f"--federated {spec!r}: expected MODE+SERVER[@LR][,key=value...], e.g. frozen-a+fedavg,train.lr=0.01")
    return mode, server, tuple(settings)


def method_name(spec: str) -> str:
    """The method's name in results: 'frozen-a + fedavg' or 'frozen-a + fedavg, train.lr=0.01'."""
    mode, server, settings = method_parts(spec)
    return ", ".join([f"{mode} + {server}", *settings])


def scenario_job(job: tuple[str, str, Scale, int, list[str], list[str], list[str], bool]) -> dict[str, Any]:
    """One scenario in a worker process with its own torch thread count."""
    import torch

    model, split, scale, threads, federated, personal, secure, record_level = job
    torch.set_num_threads(threads)
    print(f"{model} / {scale.dataset} / {split} / seed {scale.seed} ...", flush=True)
    return run_scenario(model, split, scale, federated, personal, secure, record_level)


def settled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and loss (pooled and per participant) averaged over the last `SETTLED_ROUNDS` rounds."""
    last = rows[-SETTLED_ROUNDS:]
    keys = ("accuracy", "loss", "per_participant_accuracy", "per_participant_loss")
    return {key: np.mean([r[key] for r in last], axis=0).tolist() for key in keys}


def verdict(methods: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Best federated method against centralised and local-only training, on settled accuracy."""
    final = {name: settled(rows) for name, rows in methods.items()}
    federated = {name: row for name, row in final.items() if name != "centralised" and not own_split(name)}
    best = max(federated, key=lambda name: federated[name]["accuracy"])
    central = final["centralised"]["accuracy"]
    local = final["local-only"]["per_participant_accuracy"]
    ours = federated[best]["per_participant_accuracy"]
    return {
        "settled_over_last_rounds": SETTLED_ROUNDS,
        "best_federated": best,
        "best_federated_accuracy": federated[best]["accuracy"],
        "centralised_accuracy": central,
        "local_only_accuracy": final["local-only"]["accuracy"],
        "share_of_centralised": federated[best]["accuracy"] / central if central > 0 else math.nan,
        "reaches_95_percent_of_centralised": federated[best]["accuracy"] >= TARGET_SHARE * central,
        "participants_better_than_local_only": int(sum(o > l for o, l in zip(ours, local))),
        "participants_tied_with_local_only": int(sum(o == l for o, l in zip(ours, local))),
        "participants": len(local),
        "beats_local_only_on_every_split": all(o > l for o, l in zip(ours, local)),
        **personalised_verdict(final, local),
    }


def personalised_verdict(final: dict[str, dict[str, Any]], local: list[float]) -> dict[str, Any]:
    """For each personalised method run: its accuracy, and on how many participants' own splits it beats training alone."""
    out: dict[str, Any] = {}
    for name in final:
        if own_split(name) and name != "local-only":
            personal = final[name]["per_participant_accuracy"]
            out[name] = {
                "accuracy": final[name]["accuracy"],
                "better_than_local_only": int(sum(p > l for p, l in zip(personal, local))),
                "tied_with_local_only": int(sum(p == l for p, l in zip(personal, local))),
                "beats_local_only_on_every_split": all(p > l for p, l in zip(personal, local)),
            }
    return {"personalised": out} if out else {}


def own_split(name: str) -> bool:
    """Whether a method is scored by each participant on its own split only: local-only and every personalisation."""
    return name == "local-only" or any(tag in name.split(", ") for tag in PERSONAL_TAGS.values())


def spread(values: list[float]) -> float:
    """The sample standard deviation over seeds (n - 1); 0 for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, task, split): every method's settled accuracy per seed with its mean and spread (own-split
    methods example-weighted over the participants' test splits), and the issue's targets, each met or missed."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for scenario in results:
        groups.setdefault((scenario["model"], scenario["dataset"], scenario["split"]), []).append(scenario)
    out = []
    for (model, task, split), scenarios in groups.items():
        scenarios.sort(key=lambda sc: sc["scale"]["seed"])
        names = [n for n in scenarios[0]["methods"] if all(n in sc["methods"] for sc in scenarios)]
        methods = {}
        for name in names:
            per_seed = []
            for sc in scenarios:
                mean = settled(sc["methods"][name])
                sizes = [p["test"] for p in sc["participants"]]
                local = settled(sc["methods"]["local-only"])["per_participant_accuracy"]
                own = mean["per_participant_accuracy"]
                per_seed.append({
                    "accuracy": float(np.average(own, weights=sizes)) if own_split(name) else mean["accuracy"],
                    "final_round": sc["methods"][name][-1]["accuracy"],
                    "against_local_only": [int(np.sign(o - lo)) for o, lo in zip(own, local)] if name != "centralised" else [],
                })
            accuracies = [r["accuracy"] for r in per_seed]
            methods[name] = {
                "seeds": per_seed,
                "mean": float(np.mean(accuracies)),
                "spread": spread(accuracies),
                "final_round_mean": float(np.mean([r["final_round"] for r in per_seed])),
            }
        group: dict[str, Any] = {"model": model, "task": task, "split": split, "seeds": [sc["scale"]["seed"] for sc in scenarios]}
        for reference in ("majority", "linear_baseline"):  # absent from runs before issue 28's grid
            group[f"{reference}_by_seed"] = [sc.get(reference, math.nan) for sc in scenarios]
            group[reference] = float(np.mean(group[f"{reference}_by_seed"]))
        group["methods"] = methods
        group["targets"] = targets(group)
        out.append(group)
    return out


def targets(group: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 28's targets on one (model, task, split), over seeds: each a dict with `met` and the numbers behind it."""
    methods, majority = group["methods"], group["majority"]
    global_names = [n for n in methods if n != "centralised" and not own_split(n)]
    out = []
    if group["linear_baseline"] - majority >= MARGIN:
        below = [n for n in global_names if methods[n]["mean"] < majority + MARGIN]
        out.append({
            "target": f"every federated mode >= majority + {MARGIN:g} (linear baseline {group['linear_baseline']:.3f}, majority {majority:.3f})",
            "met": not below, "detail": "below: " + ", ".join(f"{n} {methods[n]['mean']:.3f}" for n in below) if below else "all above",
        })
    else:
        why = (f"the linear baseline ({group['linear_baseline']:.3f}) is not {MARGIN:g} above the majority ({majority:.3f})"
               if math.isfinite(group["linear_baseline"] - majority) else "the run recorded no majority class or linear baseline")
        out.append({"target": f"every federated mode >= majority + {MARGIN:g}", "met": None, "detail": f"not applicable: {why}"})
    personal = [n for n in methods if own_split(n) and n != "local-only"]
    if personal and "local-only" in methods:
        best = max(personal, key=lambda n: methods[n]["mean"])
        signs = [s for seed in methods[best]["seeds"] for s in seed["against_local_only"]]
        gaps = [b["accuracy"] - lo["accuracy"] for b, lo in zip(methods[best]["seeds"], methods["local-only"]["seeds"])]
        share, gap, gap_spread = sum(s > 0 for s in signs) / len(signs), float(np.mean(gaps)), spread(gaps)
        out.append({
            "target": f"best personalisation beats local-only on >= {PERSONAL_SHARE:.0%} of own splits and on the weighted mean by more than the seed spread",
            "met": share >= PERSONAL_SHARE and gap > gap_spread,
            "detail": f"{best}: better on {sum(s > 0 for s in signs)}, tied on {signs.count(0)}, worse on {sum(s < 0 for s in signs)} "
                      f"of {len(signs)} ({share:.0%}); weighted mean {gap:+.3f} against a seed spread of the difference of {gap_spread:.3f}",
        })
    if global_names and "centralised" in methods:
        best = max(global_names, key=lambda n: methods[n]["mean"])
        share = methods[best]["mean"] / methods["centralised"]["mean"]
        out.append({"target": f"best global adapter >= {TARGET_SHARE:.0%} of centralised", "met": share >= TARGET_SHARE,
                    "detail": f"{best} {methods[best]['mean']:.3f} = {share:.1%} of centralised {methods['centralised']['mean']:.3f}"})
    frozen, fedavg = methods.get("frozen-a + fedavg"), methods.get("fedavg + fedavg")
    if frozen and fedavg:
        gap = frozen["final_round_mean"] - fedavg["final_round_mean"]
        out.append({"target": f"frozen-a within {FROZEN_GAP * 100:g} points of fedavg at the final round (or above it)", "met": gap >= -FROZEN_GAP,
                    "detail": f"frozen-a {frozen['final_round_mean']:.3f}, fedavg {fedavg['final_round_mean']:.3f} ({gap:+.3f})"})
    return out


def summary_markdown(groups: list[dict[str, Any]]) -> str:
    """Per (model, task, split): a row per method with each seed's settled accuracy, mean (sd) and, against
    local-only on the participants' own splits, better / tied / worse; then a line per target."""
    lines = []
    for g in groups:
        seeds = g["seeds"]
        lines += [
            f"**{g['model']}, {g['task']}, {g['split']}**: majority class {g['majority']:.3f}, linear baseline {g['linear_baseline']:.3f} "
            f"(means over seeds {', '.join(map(str, seeds))})",
            "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean (sd) | final round | better / tied / worse than local-only |",
            "|---|" + "---:|" * len(seeds) + "---:|---:|---|",
            *(
                f"| {label} | " + " | ".join(f"{a:.3f}" for a in g[f"{key}_by_seed"])
                + f" | {g[key]:.3f} ({spread(g[f'{key}_by_seed']):.3f}) | — | — |"
                for label, key in (("majority class", "majority"), ("linear baseline (pooled raw columns)", "linear_baseline"))
            ),
        ]
        for name, m in g["methods"].items():
            signs = [s for seed in m["seeds"] for s in seed["against_local_only"]]
            against = "—" if name in ("centralised", "local-only") else f"{signs.count(1)} / {signs.count(0)} / {signs.count(-1)}"
            lines.append(
                f"| {name} | " + " | ".join(f"{r['accuracy']:.3f}" for r in m["seeds"])
                + f" | {m['mean']:.3f} ({m['spread']:.3f}) | {m['final_round_mean']:.3f} | {against} |"
            )
        lines.append("")
        for t in g["targets"]:
            verdict_word = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            lines.append(f"- {verdict_word}: {t['target']}: {t['detail']}")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(12, 3.6 * len(results)), squeeze=False)
    for (acc_axis, loss_axis), scenario in zip(axes, results):
        for name, rows in scenario["methods"].items():
            style = {"centralised": dict(color="black", linestyle="--"), "local-only": dict(color="grey", linestyle=":")}.get(name, {})
            rounds = [r["round"] for r in rows]
            acc_axis.plot(rounds, [r["accuracy"] for r in rows], marker="o", markersize=3, label=name, **style)
            loss_axis.plot(rounds, [r["loss"] for r in rows], marker="o", markersize=3, label=name, **style)
        title = f"{scenario['model']}, {scenario['dataset']}, {scenario['split']}"
        acc_axis.set(title=f"{title}: held-out accuracy", xlabel="round", ylabel="accuracy")
        loss_axis.set(title=f"{title}: held-out loss", xlabel="round", ylabel="loss")
    axes[0][1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for scenario in results:
        v = scenario["verdict"]
        lines += [
            f"**{scenario['model']}, {scenario['dataset']}, {scenario['split']}, seed {scenario['scale']['seed']}**: "
            f"{scenario['scale']['rounds']} rounds x "
            f"{scenario['scale']['local_steps']} local steps ({scenario['seconds']:.0f} s)",
            f"Accuracy, loss and per-participant accuracy: mean of the last {SETTLED_ROUNDS} rounds.",
            "",
            "| method | accuracy | loss | per-participant accuracy | final-round accuracy | best round (accuracy) |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for name, rows in scenario["methods"].items():
            mean = settled(rows)
            per = ", ".join(f"{a:.2f}" for a in mean["per_participant_accuracy"])
            extra = f" (SVD error {rows[-1]['svd_truncation_error']:.3f})" if "svd_truncation_error" in rows[-1] else ""
            best = max(rows, key=lambda r: r["accuracy"])
            lines.append(
                f"| {name}{extra} | {mean['accuracy']:.3f} | {mean['loss']:.3f} | {per} | {rows[-1]['accuracy']:.3f} "
                f"| {best['round']} ({best['accuracy']:.3f}) |"
            )
        lines += [
            "",
            f"Best federated: {v['best_federated']} at {v['share_of_centralised']:.1%} of centralised "
            f"({'meets' if v['reaches_95_percent_of_centralised'] else 'misses'} the 95% target); better than local-only "
            f"on {v['participants_better_than_local_only']} of {v['participants']} participants' splits"
            f" ({v['participants_tied_with_local_only']} tied).",
            *(
                f"{name}: better than local-only on {p['better_than_local_only']} of {v['participants']} participants' own "
                f"splits ({p['tied_with_local_only']} tied)."
                for name, p in v.get("personalised", {}).items()
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every method (not for the docs)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--splits", nargs="+", default=SPLITS, help="partitions; 'natural' is each task's own column (TASKS)")
    parser.add_argument("--tasks", nargs="+", default=["hypertension"], choices=list(TASKS),
                        help="built-in tasks (default hypertension); results go to quality-<tasks>[-<models>].json")
    parser.add_argument("--quantization", choices=["none", "nf4", "int8"], help="base weights (default: nf4)")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 10)")
    parser.add_argument("--local-steps", type=int, help="steps per participant per round (default minilm 15, tiny-llama 40)")
    parser.add_argument("--lr", type=float, help=f"train.lr of every method, centralised and local-only included (default {Scale.lr:g})")
    parser.add_argument("--federated", nargs="+", default=[f"{m}+{o}" for m, o in FEDERATED], metavar="MODE+SERVER[@LR][,KEY=VALUE...]",
                        help="global-adapter methods to run, e.g. fedavg+fedadam@0.01 for a fixed server rate, frozen-a+fedavg,train.lr=0.01 "
                        "for settings of that method alone (default: every mode with fedavg and fedadam at their default rates)")
    parser.add_argument("--personal", nargs="*", default=list(PERSONAL_METHODS), choices=list(PERSONAL_METHODS),
                        help="personalised methods to run (default all; none: --personal with no value)")
    parser.add_argument("--secure", nargs="*", default=["frozen-a"], choices=["frozen-a", "fedavg"], metavar="MODE",
                        help=f"lora modes also run through the real Coordinator under secure aggregation, and at epsilon {EPSILON:g} "
                        "(default frozen-a; each needs MODE+fedavg in --federated; none: --secure with no value)")
    parser.add_argument("--record-level", action="store_true",
                        help=f"each --secure mode also at sample-level epsilon {EPSILON:g}: DP-SGD at every site under secure aggregation")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="federation seeds: one scenario each (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel processes (default 2, one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: with several "
                        "processes, or other load, 2+ threads spin-wait and each step gets 3x slower)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/quality-<dataset>[-<model>][-quick].json)")
    parser.add_argument("--report", type=Path, metavar="JSON", help="re-derive verdicts, plot and table from a finished run")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    overrides = {"quantization": args.quantization, "rounds": args.rounds, "local_steps": args.local_steps, "lr": args.lr}
    scales = {
        model: replace((QUICK if args.quick else FULL)[model], **{k: v for k, v in overrides.items() if v})
        for model in args.models
    }
    name = "quality-" + "-".join(args.tasks) + ("" if len(args.models) == len(MODELS) else "-" + "-".join(args.models))
    out = args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    federated = list(args.federated)
    for spec in federated:
        method_parts(spec)  # a malformed spec fails before any scenario runs
    jobs = [
        (model, f"natural:{TASKS[task]}" if split == "natural" else split, replace(scales[model], seed=seed, dataset=task),
         args.threads, federated, args.personal, args.secure, args.record_level)
        for seed in args.seeds for task in args.tasks for model in args.models for split in args.splits
    ]
    results: list[dict[str, Any]] = []  # each scenario records its own scale
    payload = {"processes": max(1, args.jobs), "torch_threads_per_process": args.threads, "cpu_count": os.cpu_count()}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        for result in pool.map(scenario_job, jobs):  # written as each finishes, so a crash keeps finished scenarios
            results.append(result)
            payload |= {"seconds": round(time.monotonic() - started, 1), "complete": len(results) == len(jobs), "scenarios": results,
                        "summary": summary(results)}
            out.write_text(json.dumps(payload, indent=2) + "\n")
            plot(results, out.with_suffix(".png"))
    print(markdown(results))
    print(summary_markdown(payload["summary"]))
    print(f"wrote {out} and {out.with_suffix('.png')} in {payload['seconds']:.0f} s")


def report(path: Path) -> None:
    """Re-derive verdicts, plot and table from a run's per-round rows, so a change of verdict needs no rerun."""
    payload = json.loads(path.read_text())
    for scenario in payload["scenarios"]:
        scenario["verdict"] = verdict(scenario["methods"])
    payload["summary"] = summary(payload["scenarios"])
    path.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload["scenarios"], path.with_suffix(".png"))
    print(markdown(payload["scenarios"]))
    print(summary_markdown(payload["summary"]))


if __name__ == "__main__":
    main()
