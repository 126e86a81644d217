"""What a deployed site records of its own activity (participant/site.py).

A real run: a Coordinator over coordinator/local_grid.py with two deployed sites, one taking part and one
whose policy refuses every instruction.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.atomic import append_line
from fedlora.config import load_config
from fedlora.model import model_fingerprint
from participant import app as participant_app
from participant.ledger import LEDGER, site_status
from participant.local_config import LOCAL_CONFIG, LocalDataSection
from participant.site import CONTRIBUTED_EVENT, EVENTS
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
    assert [e["contribution"] for e in sent] == sorted(ledger_keys) == [f"run-{sent[0]['run']}/round-{r}" for r in (1, 2)]
    assert all(e["bytes"] > 0 for e in sent) and sent[0]["bytes"] == sent[1]["bytes"]  # the same layout each round


def test_the_ledger_is_charged_for_plaintext_rounds_without_dp_too(deployed_run: dict) -> None:
    ledger = site_status(deployed_run["site"])
    assert ledger["contributions"] == ROUNDS and ledger["epsilon"] == ledger["epsilon_coordinator"] == float("inf")


def test_a_refusal_records_the_rules_it_names(deployed_run: dict) -> None:
    logged = events(deployed_run["refusing"])
    assert logged and all(e["event"] == "refused" and e["rules"] == ["policy.require_secagg"] for e in logged)


def test_a_secure_contribution_is_recorded_with_its_instance_before_it_leaves(tmp_path: Path) -> None:
    from fedlora.config import config_sha256
    from tests.test_privacy_views import _secure_round, _sites

    dirs = _sites(tmp_path, 3)
    assert _secure_round(dirs, 1.0, 0.5, 0.1, 4, "run-s").layout[0]["status"] == "ok"
    for directory in dirs:
        (sent,) = events(directory)
        assert sent["event"] == CONTRIBUTED_EVENT and sent["round"] == 4 and sent["config_sha256"] == config_sha256("run-s")
        assert sent["contribution"] == "run-s/round-4/bucket-0" and list(json.loads((directory / LEDGER).read_text())["entries"]) == [sent["contribution"]]
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
    records = events(tmp_path)
    assert sorted((r["writer"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(200)]
