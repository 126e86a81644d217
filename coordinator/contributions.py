"""`fedlora coordinator contributions RUN`: what each participant's contributions were worth.

Reads what the run wrote (config.toml, metrics.jsonl, audit.jsonl, and units/ kept under
`audit.keep_units`), values every round's units on a validation set the operator holds
(`fedlora.contributions`: Shapley values of validation gain, members' values from overlapping
buckets), and writes RUN/contributions.json, .md and .png, then appends the figures and the
report's hash to the run's audit log, so that a consortium can audit the audit.

The utility of a set S of a round's units: the validation score (accuracy when the answers are
labels, else minus the mean answer loss) of the round's starting global adapter moved by the
weighted mean of S's updates with a plain server step, minus the score of the starting adapter.
A plain step, whatever federation.server_optimizer: an adaptive optimiser's moments are the
history of all rounds, not a property of this round's contributions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.outputs import Lineage, read_metrics
from fedlora.audit import AuditLog, read_records
from fedlora.config import Config, load_config
from fedlora.contributions import (
    ALIGNMENT_THRESHOLD,
    ANOMALY_THRESHOLD,
    HARM_THRESHOLD,
    aggregate_shares,
    alignment_deficits,
    anomaly_scores,
    flagged,
    harm_scores,
    member_values,
    shapley_values,
)

if TYPE_CHECKING:
    from fedlora.data import Example

REPORT = "contributions"


@dataclass(frozen=True)
class RoundUnits:
    """One round's screened units as `coordinator.outputs.RunDirectory.save_units` kept them."""

    round: int
    members: list[tuple[str, ...]]
    weights: np.ndarray
    means: np.ndarray  # units x server length, float32
    noise_std: np.ndarray
    global_before: np.ndarray


def refusal(cfg: Config) -> str:
    """Why this run's contributions may not be valued ('' when they may)."""
    if cfg.privacy.noise_multiplier > 0 and not cfg.secagg.enabled:
        return (
            "the run used central DP (privacy.noise_multiplier > 0 without secure aggregation): the coordinator added the noise "
            "to the round's sum, so each participant's update and any value computed from it are un-noised releases about one "
            "participant, which the run's epsilon does not cover; per-participant values are refused (docs/decisions.md, "
            "\"Contribution audit\")"
        )
    return ""


def load_run(run_dir: Path) -> Config:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    if not (run_dir / "config.toml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.toml and metrics.jsonl)")
    cfg = load_config(run_dir / "config.toml")
    refused = refusal(cfg)
    if refused:
        raise ValueError(f"{run_dir}: {refused}")
    return cfg


def read_units(run_dir: Path) -> list[RoundUnits]:
    """The kept units of the head's lineage (a withdrawal's re-trained rounds, not the withdrawn ones)."""
    lineage = Lineage.load(run_dir)
    files = [p for p in sorted((run_dir / "units").glob("round-*.npz")) if p.stem == lineage.version(int(p.stem.split("-")[1]))]
    if not files:
        raise FileNotFoundError(
            f"{run_dir / 'units'} holds no kept units: the run did not keep its rounds' units; run it with audit.keep_units=true "
            "(in the [audit] section, or as an override) to value contributions"
        )
    out = []
    for path in files:
        with np.load(path) as kept:
            out.append(RoundUnits(
                int(path.stem.split("-")[1]), [tuple(m) for m in json.loads(str(kept["members"]))], kept["weights"], kept["means"],
                kept["noise_std"], kept["global_before"],
            ))
    return out


def validation_examples(cfg: Config, spec: str, label_column: str, max_examples: int, labels: list[str]) -> list[Example]:
    """The operator's validation records, verbalised as the run's data section says; refused when
    their answers are not the run's labels."""
    from fedlora.data import load_examples

    section = dataclasses.replace(cfg.data, dataset=spec, label_column=label_column or cfg.data.label_column, max_examples=max_examples)
    try:
        examples = load_examples(section, cfg.federation.seed)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ValueError(f"--validation {spec!r}: {err}") from None
    unknown = sorted({e.response for e in examples} - set(labels)) if labels else []
    if unknown:
        raise ValueError(f"--validation {spec!r}: answers {unknown[:5]} are not among the run's labels {labels}; validate on the run's task")
    return examples


class Scorer:
    """The run's model, loaded once, and the validation score of an adapter vector."""

    def __init__(self, cfg: Config, examples: list[Example], labels: list[str], metric: str) -> None:
        from fedlora.adapter import adapter_vector
        from fedlora.aggregate import aggregator_for, make_server_optimizer
        from fedlora.model import load_model

        self.cfg, self.examples, self.labels = cfg, examples, labels
        self.loaded = load_model(cfg.model, cfg.lora, labels, cfg.federation.seed)
        _, self.layout = adapter_vector(self.loaded.model)
        self.aggregator = aggregator_for(cfg)
        fed = cfg.federation
        self.step = make_server_optimizer("fedavg", fed.server_lr if fed.server_optimizer == "fedavg" else 0.0)
        self.metric = metric if metric != "auto" else ("accuracy" if labels or cfg.model.task == "classification" else "loss")
        self.evaluations = 0

    def score(self, vector: np.ndarray) -> float:
        from fedlora.adapter import load_adapter_vector
        from fedlora.evaluate import evaluate

        load_adapter_vector(self.loaded.model, vector, self.layout)
        result = evaluate(self.loaded.model, self.loaded.tokenizer, self.examples, self.cfg.model.task, self.labels, self.cfg.data.max_length, 64, prompt_format=self.loaded.prompt_format)
        self.evaluations += 1
        return result.accuracy if self.metric == "accuracy" else -result.loss

    def utility(self, kept: RoundUnits) -> Callable[[frozenset[int]], float]:
        """U(S) for this round's units, cached: the gain of moving by S's weighted mean."""
        from fedlora.aggregate import apply_mean

        base = self.score(kept.global_before)
        cache: dict[frozenset[int], float] = {frozenset(): 0.0}

        def gain(subset: frozenset[int]) -> float:
            if subset not in cache:
                chosen = sorted(subset)
                weights = kept.weights[chosen]
                mean = (weights[:, None] * kept.means[chosen].astype(np.float64)).sum(axis=0) / weights.sum()
                moved = apply_mean(self.aggregator, self.step, kept.global_before, self.layout, mean).vector
                cache[subset] = self.score(moved) - base
            return cache[subset]

        return gain


def participation(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per participant, from the audit log and metrics: rounds sampled, answered (its update
    arrived: kept in the round's units, screened out or blamed), screened out, blamed (a protocol
    violation the secure server proved), and the round it was quarantined in (0: never)."""
    counts: dict[str, dict[str, int]] = {}

    def entry(name: str) -> dict[str, int]:
        return counts.setdefault(name, {"sampled": 0, "answered": 0, "screened_out": 0, "blamed": 0, "quarantined_in": 0})

    for record in (r for r in records if r.get("event") == "round"):
        for name in record.get("sampled", []):
            entry(name)["sampled"] += 1
        for name in record.get("answered", []):  # the members whose updates are in the round's units
            entry(name)["answered"] += 1
        for skipped in record.get("skipped", []):
            kind = "screened_out" if skipped["reason"].startswith("screened out") else "blamed" if "protocol violation" in skipped["reason"] else ""
            if kind:
                entry(skipped["participant"])[kind] += 1
                entry(skipped["participant"])["answered"] += 1
    for row in rows:
        for name in row.get("quarantined", {}):
            entry(name)["quarantined_in"] = row["round"]
    return counts


def diagnostics(rows: list[dict[str, Any]]) -> tuple[dict[str, list[list[float]]], list[dict[str, Any]]]:
    """Per participant [round, norm, cosine] (plaintext rounds), and per bucket the same (secure rounds)."""
    people: dict[str, list[list[float]]] = {}
    buckets: list[dict[str, Any]] = []
    for row in rows:
        for unit in row.get("participant_updates", []):
            people.setdefault(unit["participant"], []).append([row["round"], unit["update_norm"], unit["cosine_to_aggregate"]])
        for unit in row.get("bucket_updates", []):
            buckets.append({"round": row["round"], "members": unit["members"], "update_norm": unit["update_norm"], "cosine_to_aggregate": unit["cosine_to_aggregate"]})
    return people, buckets


def finite(value: float) -> float | None:
    """A float for JSON: NaN and infinities as null."""
    return float(value) if math.isfinite(value) else None


def value_contributions(
    run_dir: Path, validation: str, label_column: str = "", max_examples: int = 200, metric: str = "auto",
    permutations: int = 20, tolerance: float = 0.01, threshold: float = ANOMALY_THRESHOLD, harm_threshold: float = HARM_THRESHOLD,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole report as plain data (written by `write_report`)."""
    from participant.runtime import label_names_for

    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    kept = read_units(run_dir)
    labels = label_names_for(cfg)
    scorer = Scorer(cfg, validation_examples(cfg, validation, label_column, max_examples, labels), labels, metric)
    rng = np.random.default_rng(seed)
    units: list[tuple[tuple[str, ...], float]] = []
    unit_rows: list[dict[str, Any]] = []
    for round_units in kept:
        values = shapley_values(len(round_units.members), scorer.utility(round_units), rng, permutations, tolerance)
        for members, value, weight, noise in zip(round_units.members, values, round_units.weights, round_units.noise_std):
            units.append((members, float(value)))
            unit_rows.append({"round": round_units.round, "members": list(members), "weight": float(weight), "value": float(value), "noise_std": float(noise)})
    estimate = member_values(units)
    shares = member_values([(members, float(share)) for u in kept for members, share in zip(u.members, aggregate_shares(u.weights, u.means))])
    share = [float(shares.value[shares.names.index(name)]) if name in shares.names else math.nan for name in estimate.names]
    share_se = [float(shares.stderr[shares.names.index(name)]) if name in shares.names else math.nan for name in estimate.names]
    deficit = alignment_deficits(share, share_se)
    rows, records = read_metrics(run_dir), read_records(run_dir / "audit.jsonl")
    people, bucket_trajectories = diagnostics(rows)
    secure = any(len(members) > 1 for members, _ in units)
    # A member's cosine to the aggregate: its mean in plaintext, estimated from its buckets' cosines under secure aggregation.
    cosines = [((p,), c) for p, trajectory in people.items() for _, _, c in trajectory] + [(tuple(b["members"]), b["cosine_to_aggregate"]) for b in bucket_trajectories]
    aligned = member_values(cosines, average=True) if cosines else None
    cosine = [float(aligned.value[aligned.names.index(name)]) if aligned and name in aligned.names else math.nan for name in estimate.names]
    floor = 1.0 / len(scorer.examples) if scorer.metric == "accuracy" else 0.0  # one validation record's worth
    scores = anomaly_scores(estimate.value, cosine, floor)
    harm = harm_scores(estimate.value, estimate.stderr)
    flags = flagged(scores, threshold) | flagged(harm, harm_threshold) | flagged(deficit, ALIGNMENT_THRESHOLD)
    order = sorted(range(len(estimate.names)), key=lambda k: -estimate.value[k] if math.isfinite(estimate.value[k]) else math.inf)
    rank = {k: position + 1 for position, k in enumerate(order)}
    counts = participation(records, rows)
    participants = []
    for k, name in enumerate(estimate.names):
        trajectory = people.get(name, [])
        participants.append({
            "participant": name,
            "rank": rank[k],
            "value": finite(estimate.value[k]),
            "stderr": finite(estimate.stderr[k]),
            "identifiable": bool(estimate.identifiable[k]),
            "units_valued": sum(name in members for members, _ in units),
            **counts.get(name, {}),
            "mean_update_norm": finite(float(np.mean([p[1] for p in trajectory]))) if trajectory else None,
            "mean_cosine": finite(cosine[k]),
            "anomaly_score": finite(scores[k]),
            "harm_score": finite(harm[k]),
            "aggregate_share": finite(share[k]),
            "aggregate_share_stderr": finite(share_se[k]),
            "alignment_deficit": finite(deficit[k]),
            "flagged": bool(flags[k]),
            "trajectory": trajectory,  # [round, norm, cosine to the aggregate] per plaintext round
        })
    participants.sort(key=lambda p: p["rank"])
    noise = max((u["noise_std"] for u in unit_rows), default=0.0)
    return {
        "run": str(run_dir),
        "mode": "secure buckets" if secure else "plaintext",
        "config_sha256": hashlib.sha256(cfg.to_toml().encode()).hexdigest(),
        "validation": {"data": validation, "records": len(scorer.examples), "metric": scorer.metric},
        "utility": f"validation {scorer.metric if scorer.metric == 'accuracy' else 'minus loss'} of the round's global adapter moved by "
                   "the weighted mean of a set of units (plain step), minus that of the global adapter before the round",
        "estimator": {
            "per_round": f"exact Shapley when 2^units <= {permutations} x units, else GTG-Shapley ({permutations} guided permutations, "
                         f"within-round truncation at {tolerance:g} of the round's gain)",
            "members": "least squares of unit values on membership over all rounds (a unit's value = sum of its members' per-round values)",
            "units": estimate.equations, "rank": estimate.rank, "residual_std": finite(estimate.residual_std),
            "evaluations": scorer.evaluations,
        },
        "anomaly": {"score": "min of the robust z-scores (median, 1.4826 MAD) of value and of mean cosine to the aggregate"
                    + (" (a member's estimated from its buckets' cosines by least squares)" if secure else ""),
                    "threshold": -threshold, "value_scale_floor": floor,
                    "harm": "value / its standard error", "harm_threshold": -harm_threshold,
                    "aggregate_share": "a member's share of each round's aggregate along its direction, w <mean, g> / (W |g|^2), "
                                       "least squares over its units like the value",
                    "alignment_deficit": "(share - median member's share) / its standard error", "alignment_threshold": -ALIGNMENT_THRESHOLD,
                    "flagged": "anomaly score, harm or alignment deficit below its threshold"},
        "privacy": privacy_note(cfg, noise),
        "rounds": [u.round for u in kept],
        "participants": participants,
        "units": unit_rows,
        "bucket_updates": bucket_trajectories,
    }


def privacy_note(cfg: Config, noise_std: float) -> str:
    """What DP the values were computed under (central DP is refused before this)."""
    notes = []
    if cfg.privacy.noise_multiplier > 0:
        notes.append(
            f"distributed DP: every unit is a noisy bucket sum (noise std per coordinate up to {noise_std:.3g} in the sum), so the values "
            "are post-processing of what the run already released to the coordinator and spend no further epsilon; the noise is in them"
        )
    if cfg.privacy.sample_level:
        notes.append("local DP-SGD: each update is sample-level private, and values computed from it are post-processing")
    return "; ".join(notes) or "no DP"


def markdown(report: dict[str, Any]) -> str:
    """The report's table, one row per participant, most valuable first."""
    est = report["estimator"]
    lines = [
        f"# Contributions: {report['run']} ({report['mode']})",
        "",
        (
            f"Value: {report['utility']}; validation {report['validation']['data']} ({report['validation']['records']} records). "
            f"Per round: {est['per_round']}. Members: {est['members']} ({est['units']} units, rank {est['rank']}, residual std "
            f"{_number(est['residual_std'])}). Anomaly: {report['anomaly']['score']}, flagged below {report['anomaly']['threshold']:g}; "
            f"harm: value / std err, flagged below {report['anomaly']['harm_threshold']:g}. "
            f"Privacy: {report['privacy']}."
        ),
        "",
        "| rank | participant | value / round | std err | sampled | answered | screened out | blamed | quarantined in | mean norm | mean cosine | share of aggregate | anomaly | harm | alignment | flagged |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in report["participants"]:
        lines.append(
            f"| {p['rank']} | {p['participant']} | {_number(p['value'])} | {_number(p['stderr'])} | {p.get('sampled', 0)} | {p.get('answered', 0)} | "
            f"{p.get('screened_out', 0)} | {p.get('blamed', 0)} | {p.get('quarantined_in') or '-'} | {_number(p['mean_update_norm'])} | "
            f"{_number(p['mean_cosine'])} | {_number(p['aggregate_share'])} | {_number(p['anomaly_score'])} | {_number(p['harm_score'])} | "
            f"{_number(p['alignment_deficit'])} | {'FLAGGED' if p['flagged'] else ''} |"
        )
    if report["mode"] == "secure buckets":  # the units themselves: what the coordinator saw
        seen = {(b["round"], tuple(b["members"])): b for b in report["bucket_updates"]}
        lines += ["", "| round | bucket | value | norm | cosine | noise std |", "|---:|---|---:|---:|---:|---:|"]
        for unit in report["units"]:
            bucket = seen.get((unit["round"], tuple(unit["members"])), {})
            lines.append(
                f"| {unit['round']} | {', '.join(unit['members'])} | {_number(unit['value'])} | {_number(bucket.get('update_norm'))} | "
                f"{_number(bucket.get('cosine_to_aggregate'))} | {_number(unit['noise_std'])} |"
            )
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot(report: dict[str, Any], out: Path) -> Path:
    """Values with their error bars (flagged in red), and each participant's or bucket's cosine to the aggregate over rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    people = report["participants"]
    figure, (values, cosines) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = ["tab:red" if p["flagged"] else "tab:blue" for p in people]
    heights = [p["value"] if p["value"] is not None else 0.0 for p in people]
    errors = [p["stderr"] if p["stderr"] is not None else 0.0 for p in people]
    values.bar([p["participant"] for p in people], heights, yerr=errors, color=colours, capsize=3)
    values.axhline(0, color="black", linewidth=0.8)
    values.set(title=f"value per round ({report['mode']}; red: flagged)", ylabel=f"validation {report['validation']['metric']} gain")
    values.tick_params(axis="x", rotation=60, labelsize=7)
    for p in people:
        if p["trajectory"]:
            rounds, _, cos = zip(*p["trajectory"])
            cosines.plot(rounds, cos, marker="o", color="tab:red" if p["flagged"] else "tab:gray", label=p["participant"] if p["flagged"] else None)
    for bucket in report["bucket_updates"]:
        cosines.scatter(bucket["round"], bucket["cosine_to_aggregate"], color="tab:gray", s=12)
    cosines.set(title="cosine of each update to the aggregate", xlabel="round", ylabel="cosine")
    if any(p["flagged"] and p["trajectory"] for p in people):
        cosines.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def write_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """contributions.json, .md and .png in the run directory, and the audit record (returned)."""
    run_dir = Path(run_dir)
    body = (json.dumps(report, indent=2) + "\n").encode()
    (run_dir / f"{REPORT}.json").write_bytes(body)
    (run_dir / f"{REPORT}.md").write_text(markdown(report))
    plot(report, run_dir / f"{REPORT}.png")
    people = report["participants"]
    return AuditLog(run_dir / "audit.jsonl").append({
        "event": "contributions",
        "report_sha256": hashlib.sha256(body).hexdigest(),
        "validation": report["validation"],
        "mode": report["mode"],
        "rounds": report["rounds"],
        "values": {p["participant"]: p["value"] for p in people},
        "stderr": {p["participant"]: p["stderr"] for p in people},
        "anomaly_scores": {p["participant"]: p["anomaly_score"] for p in people},
        "harm_scores": {p["participant"]: p["harm_score"] for p in people},
        "alignment_deficits": {p["participant"]: p["alignment_deficit"] for p in people},
        "threshold": report["anomaly"]["threshold"],
        "harm_threshold": report["anomaly"]["harm_threshold"],
        "flagged": [p["participant"] for p in people if p["flagged"]],
    })
