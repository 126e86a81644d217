"""What a deployed site records of its own activity (participant/site.py), and the report read back from
its files (participant/status.py) that `fedlora participant status`, the monitor page and its metrics share.

A real run: a Coordinator over coordinator/local_grid.py with two deployed sites, one taking part and one
whose policy refuses every instruction; the versions the site records are checked against the
coordinator's own audit log.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.atomic import append_line
from fedlora.audit import read_records
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.model import model_fingerprint
from participant import app as participant_app
from participant.ledger import LEDGER, site_status
from participant.local_config import LOCAL_CONFIG, LocalDataSection
from participant.site import CONTRIBUTED_EVENT, EVENTS, MALFORMED, record_activity, record_event
from participant.status import UNCLASSIFIED, read_events, rounds_text, site_report
from tests.conftest import SMALL
from tests.test_participant_policy import events, site

ROUNDS = 2


def deployed_site(directory: Path, **policy) -> Path:
    """A site directory whose participant.toml trains the diabetes records on the built-in model."""
    directory.mkdir()
    local = site(model_sha256=model_fingerprint("builtin:tiny-llama"), **policy)
    local.data = LocalDataSection(path="diabetes", label_names=["no", "yes"], max_examples=60)
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    return directory


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two plaintext rounds without DP: hospital-a takes part, hospital-b's policy refuses every instruction."""
    root = tmp_path_factory.mktemp("status")
    taking_part, refusing = deployed_site(root / "hospital-a"), deployed_site(root / "hospital-b", require_secagg=True)
    sha = model_fingerprint("builtin:tiny-llama")
    cfg = load_config(None, [*SMALL, f"federation.rounds={ROUNDS}", "federation.participants=2", "train.local_steps=1", f"model.sha256={sha}",
                             "data.label_names=no,yes"])  # fmt: skip
    coordinator = Coordinator(cfg, root / "run")
    grid = LocalGrid(participant_app.app, {1: {"participant-dir": str(taking_part)}, 2: {"participant-dir": str(refusing)}})
    rows = coordinator.run(grid)
    return {"site": taking_part, "refusing": refusing, "out": root / "run", "sha": coordinator.out.config_sha256, "rows": rows}


# --- what the participant records -----------------------------------------------------------

def test_a_deployed_site_records_each_round_it_trained_sent_and_evaluated(deployed_run: dict) -> None:
    logged = events(deployed_run["site"])
    assert [(e["event"], e["round"]) for e in logged] == [
        ("evaluated", 0), ("trained", 1), ("contributed", 1), ("evaluated", 1), ("trained", 2), ("contributed", 2), ("evaluated", 2)
    ]
    assert {e["config_sha256"] for e in logged} == {deployed_run["sha"]} and len({e["run"] for e in logged}) == 1
    sent = [e for e in logged if e["event"] == CONTRIBUTED_EVENT]
    ledger_keys = json.loads((deployed_run["site"] / LEDGER).read_text())["entries"]
    assert [e["contribution"] for e in sent] == sorted(ledger_keys) == [f"run-{sent[0]['run']}/config-{deployed_run['sha']}/round-{r}" for r in (1, 2)]
    assert all(e["bytes"] > 0 for e in sent) and sent[0]["bytes"] == sent[1]["bytes"]  # the same layout each round


def test_the_ledger_is_charged_for_plaintext_rounds_without_dp_too(deployed_run: dict) -> None:
    ledger = site_status(deployed_run["site"])
    assert ledger["contributions"] == ROUNDS and ledger["epsilon"] == ledger["epsilon_coordinator"] == float("inf")


def test_a_refusal_records_the_rules_it_names(deployed_run: dict) -> None:
    logged = events(deployed_run["refusing"])
    assert logged and all(e["event"] == "refused" and e["rules"] == ["policy.require_secagg"] for e in logged)
    report = site_report(deployed_run["refusing"])
    assert report["refusals"]["total"] == len(logged) and report["refusals"]["by_rule"] == {"policy.require_secagg": len(logged)}
    assert report["runs"] == [] and report["contributions"] == 0


def test_a_secure_contribution_is_recorded_with_its_instance_before_it_leaves(tmp_path: Path) -> None:
    from fedlora.config import config_sha256
    from tests.test_privacy_views import _secure_round, _sites

    dirs = _sites(tmp_path, 3)
    assert _secure_round(dirs, 1.0, 0.5, 0.1, 4, "run-s").layout[0]["status"] == "ok"
    for directory in dirs:
        (sent,) = events(directory)
        assert sent["event"] == CONTRIBUTED_EVENT and sent["round"] == 4 and sent["config_sha256"] == config_sha256("run-s")
        assert sent["contribution"] == f"config-{config_sha256('run-s')}/round-4" and sent["instance"] == "run-s/round-4/bucket-0"
        assert list(json.loads((directory / LEDGER).read_text())["entries"]) == [sent["contribution"]]
        assert sent["bytes"] > 4 * 2_000  # the masked input: a 32-bit word per coordinate, and more


def test_concurrent_appends_never_interleave_within_a_line(tmp_path: Path) -> None:
    def write(writer: int) -> None:
        for i in range(200):
            append_line(tmp_path / EVENTS, json.dumps({"time": "t", "event": "x", "writer": writer, "i": i, "pad": "y" * 3000}))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = read_events(tmp_path)
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(200)]


def test_a_last_line_cut_short_is_left_out_and_an_edited_line_is_named(tmp_path: Path) -> None:
    record_event(tmp_path, "refused", reason="r", rules=[MALFORMED])
    with (tmp_path / EVENTS).open("a") as handle:
        handle.write('{"time": "2026-01-01T00:00:00+0000", "ev')  # a crash mid-write
    assert [e["reason"] for e in read_events(tmp_path)] == ["r"]
    (tmp_path / EVENTS).write_text((tmp_path / EVENTS).read_text() + "\n")
    with pytest.raises(ValueError, match=f"{EVENTS}:2 is not a record"):
        read_events(tmp_path)


# --- the report -------------------------------------------------------------------------------

def test_the_versions_a_site_reports_are_the_ones_the_coordinator_audited(deployed_run: dict) -> None:
    (run,) = site_report(deployed_run["site"])["runs"]
    audited = {r["round"]: r for r in read_records(deployed_run["out"] / "audit.jsonl") if r["event"] == "round"}
    assert run["config_sha256"] == deployed_run["sha"] and run["rounds_trained"] == run["rounds_contributed"] == [1, 2]
    assert [v["round"] for v in run["versions"]] == [1, 2]
    for version in run["versions"]:
        assert version["adapter_sha256"] == audited[version["round"]]["adapter_sha256"]
        assert audited[version["round"]]["version"] == f"round-{version['round']:04d}" and audited[version["round"]]["answered"] == ["node-1"]  # hospital-a


def test_a_retried_contribution_counts_once_and_a_round_not_yet_seen_has_no_version(tmp_path: Path) -> None:
    (tmp_path / LOCAL_CONFIG).write_text(site().to_toml())
    record_activity(tmp_path, "trained", 7, "c" * 64, 3, trained_from="a2", examples=10)
    for _ in range(2):  # the same update, recorded again by a retried message
        record_activity(tmp_path, CONTRIBUTED_EVENT, 7, "c" * 64, 3, contribution="run-7/round-3", trained_from="a2", bytes=100)
    (run,) = site_report(tmp_path)["runs"]
    assert (run["contributions"], run["bytes_sent"], run["rounds_contributed"]) == (1, 100, [3])
    assert run["versions"] == [{"round": 3, "adapter_sha256": None}]
    record_activity(tmp_path, "trained", 7, "c" * 64, 4, trained_from="a3", examples=10)
    assert site_report(tmp_path)["runs"][0]["versions"] == [{"round": 3, "adapter_sha256": "a3"}]  # round 4 started from it


def test_refusals_are_counted_by_each_rule_they_name_and_old_ones_are_unclassified(tmp_path: Path) -> None:
    (tmp_path / LOCAL_CONFIG).write_text(site().to_toml())
    append_line(tmp_path / EVENTS, json.dumps({"time": "2026-01-01T00:00:00+0000", "event": "refused", "reason": "from before rules"}))
    record_event(tmp_path, "refused", reason="two rules", rules=["policy.require_secagg", "data.label_names"], round=2)
    record_event(tmp_path, "refused", reason="bad message", rules=[MALFORMED])
    record_event(tmp_path, "coordinator-blamed", reason="relayed an unsigned key", evidence={"round_id": "x"})
    report = site_report(tmp_path, recent=2)
    assert report["refusals"]["total"] == 3
    assert report["refusals"]["by_rule"] == {"data.label_names": 1, MALFORMED: 1, "policy.require_secagg": 1, UNCLASSIFIED: 1}
    assert [e["reason"] for e in report["refusals"]["last"]] == ["two rules", "bad message"]
    assert report["coordinator_blamed"]["total"] == 1 and report["coordinator_blamed"]["last"][0]["reason"] == "relayed an unsigned key"
    assert report["withdrawn"] is None


def test_the_status_command_prints_the_runs_refusals_and_versions(deployed_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["participant", "status", str(deployed_run["site"])]) == 0
    text = capsys.readouterr().out
    (run,) = site_report(deployed_run["site"])["runs"]
    assert f"configuration sha256 {deployed_run['sha']}" in text and "trained rounds 1-2; sent 2 updates" in text
    assert f"round 2: {run['versions'][1]['adapter_sha256'][:16]}…" in text and "refusals: 0" in text
    assert main(["participant", "status", str(deployed_run["refusing"])]) == 0
    text = capsys.readouterr().out
    assert "runs this site took part in: 0" in text and "policy.require_secagg" in text
    assert main(["participant", "status", str(deployed_run["site"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.replace("Infinity", "1e999"))["runs"] == [run]


def test_rounds_print_as_ranges() -> None:
    assert [rounds_text(r) for r in ([], [3], [1, 2, 3, 5], [1, 3, 4])] == ["none", "3", "1-3, 5", "1, 3-4"]
