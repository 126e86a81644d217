"""Run outcomes never overstate what happened (coordinator/outcome.py, gather.error_reason).

Pure checks of how rows are read, then whole runs over LocalGrid: one where every site
refuses every instruction stops early with the reasons, publishes no `final` and is not
finished; a coordinator whose own base model is not the stated one refuses to run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.deploy import finished, run_outcome
from coordinator.gather import error_reason
from coordinator.local_grid import LocalGrid
from coordinator.outcome import BUDGET, REFUSALS, read_outcome, refusal_stop, refused_by_everyone
from coordinator.rounds import Coordinator, majority_accuracy
from fedlora.audit import read_records
from fedlora.config import load_config
from fedlora.model import model_fingerprint
from participant import app as participant_app
from participant.local_config import LOCAL_CONFIG
from tests.conftest import SMALL
from tests.test_participant_policy import site


def round_row(server_round: int, applied: bool, skipped: list[tuple[str, str]] = (), sampled: int = 2) -> dict:
    return {"round": server_round, "sampled": sampled, "applied": applied, "skipped": [{"participant": p, "reason": r} for p, r in skipped]}


REFUSED_BY_BOTH = [("a", "refused: policy.require_secagg"), ("b", "refused: policy.require_secagg")]


def test_rounds_run_and_applied_are_counted_apart() -> None:
    rows = [{"round": 0}, round_row(1, True), round_row(2, False), round_row(3, True)]
    outcome = read_outcome(rows, rounds_planned=3)
    assert (outcome.rounds_run, outcome.rounds_applied, outcome.complete, outcome.succeeded) == (3, 2, True, True)
    assert outcome.summary().startswith("3/3 rounds run, 2 applied")


def test_a_complete_run_that_applied_nothing_has_not_succeeded() -> None:
    outcome = read_outcome([{"round": 0}, round_row(1, False), round_row(2, False)], rounds_planned=2)
    assert outcome.complete and not outcome.succeeded
    assert "nothing was trained" in outcome.summary()


def test_a_budget_stop_is_complete_and_a_refusal_stop_is_not() -> None:
    budget = read_outcome([{"round": 0}, round_row(1, True), {"round": 2, "stopped": "spent", "stopped_by": BUDGET}], 5)
    refused = read_outcome([{"round": 0}, round_row(1, True), {"round": 2, "stopped": "refused", "stopped_by": REFUSALS}], 5)
    assert budget.succeeded and budget.stopped == "spent"
    assert not refused.complete and not refused.succeeded


def test_a_run_cut_short_is_not_complete() -> None:
    assert not read_outcome([{"round": 0}, round_row(1, True)], rounds_planned=3).complete


def test_two_rounds_refused_by_everyone_stop_the_run_with_the_reasons() -> None:
    rows = [round_row(1, False, REFUSED_BY_BOTH), round_row(2, False, REFUSED_BY_BOTH)]
    reason = refusal_stop(rows)
    assert "rounds 1, 2" in reason and "a: refused: policy.require_secagg" in reason and "b: refused" in reason
    assert refusal_stop(rows[:1]) == ""  # one round is not yet a pattern


@pytest.mark.parametrize(
    "skipped",
    [
        [("a", "refused: x"), ("b", "no reply within 600 s")],  # a silent site may answer next round
        [("a", "refused: x")],  # b trained
    ],
)
def test_a_round_is_refused_by_everyone_only_when_every_sampled_site_answered_so(skipped) -> None:
    assert not refused_by_everyone(round_row(1, False, skipped))
    assert refusal_stop([round_row(1, False, REFUSED_BY_BOTH), round_row(2, False, skipped)]) == ""


def test_a_failure_on_every_site_counts_like_a_refusal() -> None:
    assert refused_by_everyone(round_row(1, False, [("a", "failed: OSError: disk full"), ("b", "refused: budget")]))


@pytest.mark.parametrize(
    ("flower_reason", "expected"),
    [
        ("<class 'participant.site.Refusal'>:<'hospital-a refuses a train request: policy.require_secagg'>", "refused: hospital-a refuses a train request: policy.require_secagg"),
        ("<class 'ZeroDivisionError'>:<'division by zero'>", "failed: ZeroDivisionError: division by zero"),
        ("An exception was raised when attempting to load `ClientApp`", "failed: An exception was raised when attempting to load `ClientApp`"),
    ],
)
def test_flowers_error_replies_read_as_refusals_or_failures(flower_reason: str, expected: str) -> None:
    assert error_reason(flower_reason) == expected


def test_the_majority_class_rate_sums_every_sites_counts() -> None:
    assert majority_accuracy([[30, 10], [10, 50]], 2) == {"majority_accuracy": 60 / 100}


@pytest.mark.parametrize("counts", [[], [None, [1, 2]], [[1, 2], [1, 2, 3]], [[1, -5], [1, 1]], [[1, -5], [10, 10]], [[0, 0]], [[1, 2, 3]]])
def test_no_majority_rate_from_missing_or_malformed_counts(counts) -> None:
    assert majority_accuracy(counts, 2) == {}


# --- whole runs ------------------------------------------------------------------------

def refusing_consortium(tmp_path: Path, sites: int) -> LocalGrid:
    """Sites whose policy requires secure aggregation, for a plaintext run: every one refuses."""
    configs = {}
    for index in range(sites):
        directory = tmp_path / f"site-{index}"
        directory.mkdir()
        (directory / LOCAL_CONFIG).write_text(site(require_secagg=True, model_sha256=model_fingerprint("builtin:tiny-llama")).to_toml())
        configs[index + 1] = {"participant-dir": str(directory)}
    return LocalGrid(participant_app.app, configs)


def test_a_run_every_site_refuses_stops_early_and_publishes_no_final(tmp_path: Path) -> None:
    sha = model_fingerprint("builtin:tiny-llama")
    cfg = load_config(None, [*SMALL, "federation.rounds=4", f"model.sha256={sha}", "data.label_names=no,yes"])
    out = tmp_path / "run"
    rows = Coordinator(cfg, out).run(refusing_consortium(tmp_path, 3))
    rounds = [row for row in rows if row["round"] > 0]
    assert [row.get("applied") for row in rounds[:2]] == [False, False] and [row["rounds_applied"] for row in rounds[:2]] == [0, 0]
    stop = rounds[2]
    assert stop["round"] == 3 and stop["stopped_by"] == REFUSALS and "policy.require_secagg" in stop["stopped"]
    assert len(rounds) == 3  # round 4 never ran
    assert not (out / "adapters" / "final").exists()
    ended = read_records(out / "audit.jsonl")[-1]
    assert ended["event"] == "ended" and ended["rounds_applied"] == 0 and ended["final"] is None
    assert not finished(out) and run_outcome(out).rounds_applied == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[1])["skipped"][0]["reason"].startswith("refused: ")


def test_the_coordinator_refuses_a_base_model_other_than_the_stated_one(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, f"model.sha256={'0' * 64}"])
    with pytest.raises(ValueError, match="model.sha256 states 0000.*fingerprint"):
        Coordinator(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything was written


def test_a_run_that_learns_is_a_success_and_its_manifests_certify_the_base_it_used(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "federation.rounds=1"])  # no model.sha256 stated: the coordinator's own hash is certified
    out = tmp_path / "run"
    rows = Coordinator(cfg, out).run(LocalGrid(participant_app.app, {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)}))
    assert rows[1]["applied"] and rows[1]["rounds_applied"] == 1
    assert rows[0]["majority_accuracy"] == rows[1]["majority_accuracy"] > 0.5  # diabetes: most records say no
    assert finished(out) and run_outcome(out).succeeded
    manifest = json.loads((out / "adapters" / "final" / "manifest.json").read_text())["facts"]
    assert manifest["base_model_sha256"] == model_fingerprint("builtin:tiny-llama")
    ended = read_records(out / "audit.jsonl")[-1]
    assert (ended["event"], ended["rounds_run"], ended["rounds_applied"], ended["final"]) == ("ended", 1, 1, "final")
