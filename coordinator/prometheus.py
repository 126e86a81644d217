"""The coordinator's Prometheus metrics, read from its directory at each scrape.

A custom collector over `coordinator.observe`: every value is computed from metrics.jsonl, the
audit log, the participant book and the SuperLink's state when Prometheus asks, so a scrape
always agrees with the files and the exporter holds no state that a restart could lose.
Label values are bounded: run and participant names, a stage, and a reason *category*
(`observe.REASON_CATEGORIES`), never a free-text reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.observe import observe
from coordinator.outputs import GENERATION_LABELS

PREFIX = "fedlora_coordinator_"


def gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=list(labels))


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, labels=list(labels))


def run_metrics(snapshot: dict) -> list[Metric]:
    """Per run: rounds, answers and skips by reason, epsilon, bytes, stage seconds, accuracy, checks."""
    rounds = counter("rounds", "rounds run, by whether the global adapter moved", ("run", "outcome"))
    planned = gauge("rounds_planned", "rounds the run's configuration plans", ("run",))
    last = gauge("last_round", "the last round with a metrics row (0 = the untrained adapter)", ("run",))
    answered = counter("answers", "participant updates included in a round", ("run",))
    sampled = counter("sampled", "participants sampled for a round", ("run",))
    skipped = counter("skipped", "participants left out of a round, by reason category", ("run", "reason"))
    epsilon = gauge("epsilon", "epsilon spent so far (view: consumers of the adapter, or the coordinator)", ("run", "view"))
    budget = gauge("epsilon_budget", "privacy.epsilon_budget (0 = no budget)", ("run",))
    transferred = counter("bytes", "bytes of updates and adapters sent, by direction as the coordinator sees it", ("run", "direction"))
    stages = counter("stage_seconds", "wall-clock seconds spent per round stage", ("run", "stage"))
    accuracy = gauge("eval_accuracy", "held-out accuracy of the last evaluated round", ("run",))
    majority = gauge("majority_accuracy", "held-out accuracy of always answering the majority class", ("run",))
    loss = gauge("eval_loss", "held-out loss of the last evaluated round", ("run",))
    generation = gauge("eval_generation", "greedy-decoding score of the last evaluated round on free-form answers", ("run", "score"))
    audit = gauge("audit_intact", "1 if the run's audit chain verifies", ("run",))
    head = gauge("head_verifies", "1 if the head adapter version's signature and hashes verify", ("run",))
    for name, run in snapshot["runs"].items():
        entries = [entry for entry in run["rounds"] if entry["round"] > 0]
        applied = sum(bool(entry.get("applied")) for entry in entries)
        rounds.add_metric([name, "applied"], applied)
        rounds.add_metric([name, "skipped"], len(entries) - applied)
        if run.get("rounds_planned") is not None:
            planned.add_metric([name], run["rounds_planned"])
        if run["last_round"] is not None:
            last.add_metric([name], run["last_round"])
        answered.add_metric([name], sum(entry.get("participants", 0) for entry in entries))
        sampled.add_metric([name], sum(entry.get("sampled", 0) for entry in entries))
        categories: dict[str, int] = {}
        for entry in entries:
            for skip in entry["skipped"]:
                categories[skip["category"]] = categories.get(skip["category"], 0) + 1
        for category, count in sorted(categories.items()):
            skipped.add_metric([name, category], count)
        for view, key in (("consumers", "epsilon"), ("coordinator", "epsilon_coordinator")):
            if run.get(key) is not None:
                epsilon.add_metric([name, view], run[key])
        budget.add_metric([name], run["epsilon_budget"])
        transferred.add_metric([name, "up"], run["bytes_up_total"])
        transferred.add_metric([name, "down"], run["bytes_down_total"])
        for stage, seconds in sorted(run["stage_seconds_total"].items()):
            stages.add_metric([name, stage], seconds)
        evaluated = [entry for entry in run["rounds"] if "eval_loss" in entry]  # free-form tasks have no accuracy
        if evaluated:
            loss.add_metric([name], evaluated[-1]["eval_loss"])
            if "eval_accuracy" in evaluated[-1]:
                accuracy.add_metric([name], evaluated[-1]["eval_accuracy"])
            if "majority_accuracy" in evaluated[-1]:
                majority.add_metric([name], evaluated[-1]["majority_accuracy"])
            for key in GENERATION_LABELS.values():
                if key in evaluated[-1]:
                    generation.add_metric([name, key.removeprefix("eval_")], evaluated[-1][key])
        if "audit" in run:
            audit.add_metric([name], float(run["audit"] == "intact"))
        if run.get("last_version_verifies") is not None:
            head.add_metric([name], float(run["last_version_verifies"]))
    return [rounds, planned, last, answered, sampled, skipped, epsilon, budget, transferred, stages, accuracy, majority, loss, generation, audit, head]


def participant_metrics(snapshot: dict) -> list[Metric]:
    """Per participant: state, connection, last seen, and skips by reason category across runs."""
    state = gauge("participant_state", "1 for the participant's state: registered, revoked, withdrawn, quarantined", ("participant", "state"))
    connected = gauge("participant_connected", "1 if the SuperLink holds the participant's node online", ("participant",))
    seen = gauge("participant_last_seen_timestamp_seconds", "when the SuperLink last heard from the participant (Unix time)", ("participant",))
    skipped = counter("participant_skipped", "rounds the participant was left out of, by reason category", ("participant", "reason"))
    blamed = counter("participant_blamed", "times secure aggregation blamed the participant for a protocol violation", ("participant",))
    for view in snapshot["participants"]:
        name = view["name"]
        for label, flag in (
            ("registered", view.get("registered")), ("revoked", bool(view.get("revoked"))),
            ("withdrawn", bool(view.get("withdrawn"))), ("quarantined", bool(view.get("quarantined"))),
        ):  # fmt: skip
            state.add_metric([name, label], float(bool(flag)))
        if view.get("connected") is not None:
            connected.add_metric([name], float(view["connected"]))
        if view.get("last_seen") is not None:
            seen.add_metric([name], view["last_seen"])
        for category, count in view["by_category"].items():
            skipped.add_metric([name, category], count)
        blamed.add_metric([name], len(view["blame"]))
    return [state, connected, seen, skipped, blamed]


class CoordinatorCollector(Collector):
    """Collects a fresh snapshot of `directory` at each scrape."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterator[Metric]:
        snapshot = observe(self.directory)
        yield from run_metrics(snapshot)
        yield from participant_metrics(snapshot)
        alerts = gauge("alerts", "alerts that need a person, by kind (see the dashboard for the text)", ("kind",))
        for kind in sorted({alert["kind"] for alert in snapshot["alerts"]}):
            alerts.add_metric([kind], sum(alert["kind"] == kind for alert in snapshot["alerts"]))
        yield alerts
