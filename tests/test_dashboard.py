"""The operator dashboard and the coordinator's /metrics, watched in headless Chromium during a live run.

A coordinator directory with three registered sites runs three plaintext rounds over LocalGrid
in a thread, with the real participant app. hospital-c is a real participant directory whose
default policy refuses plaintext rounds. While the rounds go, `fedlora coordinator dashboard`
runs as its own process; Debian's Chromium (driven by selenium through Debian's chromedriver)
keeps one page open and must see the rounds advance without a reload, the refusal with its
reason, epsilon and a verified version. /metrics is scraped mid-run (the run is held before
round 2's training, so the files stand still) and must agree with metrics.jsonl. Set FEDLORA_SCREENSHOTS=DIR to keep a screenshot of every page (docs/images/).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from coordinator.local_grid import LocalGrid
from coordinator.observe import alerts, observe
from coordinator.outputs import read_metrics
from coordinator.rounds import Coordinator
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.pki import create_ca, issue_server_certificate
from participant import app as participant_app
from participant.site import SITE_KEY
from tests.conftest import SMALL, registered_coordinator
from tests.test_deployment import free_port, kill_tree, listening, wait_for

SITES = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}
ROUNDS = 4
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
RUN = [
    *SMALL, "federation.participants=3", f"federation.rounds={ROUNDS}", "train.local_steps=2", "data.max_examples=90",
    "federation.min_participants=2", "privacy.noise_multiplier=0.8", "privacy.epsilon_budget=40", "robust.clip_norm=1.0",
]  # fmt: skip


def tree_digest(directory: Path) -> str:
    """One hash over every file's path and bytes: equal before and after means nothing was written."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1400,1600",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, "page")  # none until Dash has rendered the layout
    return found[0].text if found else ""


def scraped(port: int) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def agreement(values: dict[tuple[str, tuple], float], rows: list[dict]) -> None:
    """The scraped values are the metrics rows' own numbers."""
    rounds = [row for row in rows if row["round"] > 0]
    run = (("run", "main"),)
    assert values[("fedlora_coordinator_last_round", run)] == rows[-1]["round"]
    assert values[("fedlora_coordinator_rounds_total", (("outcome", "applied"), ("run", "main")))] == sum(r["applied"] for r in rounds)
    assert values[("fedlora_coordinator_answers_total", run)] == sum(r["participants"] for r in rounds)
    assert values[("fedlora_coordinator_bytes_total", (("direction", "up"), ("run", "main")))] == sum(r["bytes_up"] for r in rows)
    refused = sum(s["reason"].startswith("refused:") for r in rounds for s in r["skipped"])
    assert values.get(("fedlora_coordinator_skipped_total", (("reason", "refused"), ("run", "main"))), 0) == refused
    if rounds:
        assert values[("fedlora_coordinator_epsilon", (("run", "main"), ("view", "consumers")))] == pytest.approx(rounds[-1]["epsilon"], rel=1e-12)
    evaluated = [row for row in rows if "eval_accuracy" in row]
    assert values[("fedlora_coordinator_eval_accuracy", run)] == pytest.approx(evaluated[-1]["eval_accuracy"], rel=1e-12)


class HeldGrid(LocalGrid):
    """LocalGrid that holds the run before round 2's training until the test has looked: the run is
    live (its thread waits inside a round), and the files stand still while they are compared."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.paused, self.go_on = threading.Event(), threading.Event()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
            self.paused.set()
            self.go_on.wait(300)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them: apt-get install chromium chromium-driver)")
    root = tmp_path_factory.mktemp("dashboard")
    directory = registered_coordinator(root, SITES)
    refusing = root / "hospital-c-site"  # a real site: its default policy requires secure aggregation and approval
    assert main(["participant", "init", str(refusing), "--name", "hospital-c", "--data", "diabetes", "--label-column", "Outcome"]) == 0
    configs = {node: {"partition-id": i, "num-partitions": 3} for i, node in enumerate(SITES)}
    configs[13][SITE_KEY] = str(refusing)
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = (root / "dashboard.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "coordinator", "dashboard", str(directory), "--listen", f"127.0.0.1:{port}", "--refresh", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    driver = None
    try:
        wait_for(lambda: listening(port), 120, "the dashboard to listen")
        driver = browser()
        driver.get(f"http://127.0.0.1:{port}/runs/main")
        driver.execute_script("window.openedOnce = true")  # a reload would lose it
        wait_for(lambda: "No run 'main'" in page_text(driver), 60, "the page before the run")
        cfg = load_config(None, RUN)
        grid = HeldGrid(participant_app.app, configs)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                Coordinator(cfg, directory / "runs" / "main", deployment=directory).run(grid)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                failure.append(err)

        thread = threading.Thread(target=run)
        thread.start()
        assert grid.paused.wait(300), "the run never reached its second round"
        out = directory / "runs" / "main"
        wait_for(lambda: "round 1 of" in page_text(driver), 60, "round 1 on the open page")
        seen = [next(line for line in page_text(driver).splitlines() if line.startswith("round "))]
        mid_run = {"rows": read_metrics(out), "values": scraped(port)}  # while the run is held before round 2
        grid.go_on.set()
        while thread.is_alive():
            progress = next((line for line in page_text(driver).splitlines() if line.startswith("round ")), "")
            if progress and seen[-1] != progress:
                seen.append(progress)
            time.sleep(0.3)
        thread.join()
        assert not failure, failure
        wait_for(lambda: f"round {ROUNDS} of {ROUNDS}" in page_text(driver), 60, "the last round on the page")
        reloaded = driver.execute_script("return window.openedOnce === true")
        final_text = page_text(driver)
        seen.append(next(line for line in final_text.splitlines() if line.startswith("round ")))
        pages = {}
        shots = os.environ.get("FEDLORA_SCREENSHOTS")
        for path, name in (("/", "overview"), ("/participants", "participants"), ("/runs/main", "run"), ("/versions", "versions")):
            driver.get(f"http://127.0.0.1:{port}{path}")
            wait_for(lambda: page_text(driver).strip() != "", 60, f"the {name} page")
            time.sleep(1.5)  # the charts draw
            pages[name] = page_text(driver)
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(Path(shots) / f"dashboard-{name}.png"))
        digest = tree_digest(directory)
        after_metrics = scraped(port)
        exposition = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        time.sleep(2.5)  # two more page refreshes
        driver.quit()
        driver = None
        yield {
            "directory": directory, "port": port, "seen": seen, "mid_run": mid_run, "still_open": reloaded, "final": final_text,
            "pages": pages, "digest": digest, "after": after_metrics, "exposition": exposition, "root": root,
        }  # fmt: skip
    finally:
        if driver is not None:
            driver.quit()
        kill_tree(server)


def test_the_open_page_follows_the_rounds_without_a_reload(live: dict) -> None:
    assert live["still_open"], "the page was reloaded"
    rounds = [int(line.split()[1]) for line in live["seen"] if line.split()[1].isdigit()]
    assert rounds == sorted(rounds) and len(set(rounds)) >= 2 and rounds[-1] == ROUNDS, live["seen"]
    assert "epsilon" in live["final"] and "of budget 40" in live["final"]


def test_the_pages_show_the_refusal_its_reason_epsilon_and_a_verified_version(live: dict) -> None:
    pages = live["pages"]
    assert "policy.require_secagg" in pages["participants"] and "hospital-c" in pages["participants"]
    assert f"hospital-c refused rounds {ROUNDS - 1}, {ROUNDS} of main" in pages["overview"]  # the alert, with the reason
    assert "policy.require_secagg" in pages["run"]
    rows = read_metrics(live["directory"] / "runs" / "main")
    assert f"{rows[-1]['epsilon']:.4g}" in pages["run"]
    assert f"round-{ROUNDS:04d} {ROUNDS} round-{ROUNDS - 1:04d} 0 verifies" in pages["versions"] and "audit chain: intact" in pages["versions"]


def test_metrics_agree_with_the_metrics_file_during_and_after_the_run(live: dict) -> None:
    mid_run = live["mid_run"]
    assert [row["round"] for row in mid_run["rows"]] == [0, 1]  # scraped during the run, after its first round
    agreement(mid_run["values"], mid_run["rows"])
    agreement(live["after"], read_metrics(live["directory"] / "runs" / "main"))
    assert live["after"][("fedlora_coordinator_participant_skipped_total", (("participant", "hospital-c"), ("reason", "refused")))] == ROUNDS
    assert live["after"][("fedlora_coordinator_alerts", (("kind", "site_refusing"),))] == 1


def test_the_exposition_passes_prometheus_own_lint(live: dict) -> None:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is needed (.ci/run installs Debian's prometheus package)")
    done = subprocess.run(["promtool", "check", "metrics"], input=live["exposition"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_watching_changes_nothing(live: dict) -> None:
    for path in ("/", "/participants", "/runs/main", "/versions", "/metrics"):
        assert requests.get(f"http://127.0.0.1:{live['port']}{path}", timeout=30).status_code == 200
    for method in ("put", "delete", "patch"):
        for path in ("/", "/metrics", "/_dash-update-component"):
            assert getattr(requests, method)(f"http://127.0.0.1:{live['port']}{path}", timeout=30).status_code == 405, (method, path)
    assert requests.post(f"http://127.0.0.1:{live['port']}/metrics", timeout=30).status_code == 405
    assert tree_digest(live["directory"]) == live["digest"]


def test_exposed_without_tls_or_a_token_it_refuses_to_start(live: dict, capsys, monkeypatch) -> None:
    def started(server) -> None:  # a dashboard that should have refused must not serve (nor hang the test)
        server.stop()
        raise AssertionError(f"the dashboard started on {server.bind_addr}")

    monkeypatch.setattr("fedlora.web.serve_forever", started)
    directory, root = live["directory"], live["root"]
    assert main(["coordinator", "dashboard", str(directory), "--listen", f"0.0.0.0:{free_port()}"]) == 2
    assert "without --token-file" in capsys.readouterr().err
    token = root / "token"
    token.write_text("x" * 40)
    plain = ["coordinator", "dashboard", str(root / "simulated"), "--listen", f"0.0.0.0:{free_port()}", "--token-file", str(token)]
    shutil.copytree(directory / "runs" / "main", root / "simulated")  # a run directory has no certificate of its own
    assert main(plain) == 2 and "without --tls-cert, --tls-key" in capsys.readouterr().err
    token.write_text("short")
    assert main(["coordinator", "dashboard", str(directory), "--listen", f"0.0.0.0:{free_port()}", "--token-file", str(token)]) == 2
    assert "a token is at least 16 printable ASCII characters" in capsys.readouterr().err
    token.write_text("x" * 40)
    create_ca(root / "another-ca")
    issue_server_certificate(root / "another-ca", ["127.0.0.1"])
    code = main([
        "coordinator", "dashboard", str(directory), "--listen", f"0.0.0.0:{free_port()}", "--token-file", str(token),
        "--tls-cert", str(root / "another-ca" / "server.crt"), "--tls-key", str(root / "another-ca" / "server.key"),
    ])  # fmt: skip
    assert code == 2 and "not issued by the consortium CA" in capsys.readouterr().err


def test_exposed_it_serves_tls_and_asks_every_request_for_the_token(live: dict) -> None:
    directory, root = live["directory"], live["root"]
    token = root / "operator-token"
    token.write_text("operator-" + "k" * 40 + "\n")
    port = free_port()
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "coordinator", "dashboard", str(directory), "--listen", f"0.0.0.0:{port}", "--token-file", str(token)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: listening(port), 120, "the exposed dashboard to listen")
        url, ca = f"https://127.0.0.1:{port}", str(directory / "pki" / "ca.crt")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url + "/metrics", timeout=30)  # the system store does not know the consortium CA
        assert requests.get(url + "/metrics", verify=ca, timeout=30).status_code == 401
        assert requests.get(url + "/", verify=ca, timeout=30, headers={"Authorization": "Bearer wrong"}).status_code == 401
        bearer = {"Authorization": "Bearer operator-" + "k" * 40}
        assert "fedlora_coordinator_last_round" in requests.get(url + "/metrics", verify=ca, timeout=30, headers=bearer).text
        assert requests.get(url + "/", verify=ca, timeout=30, auth=("operator", "operator-" + "k" * 40)).status_code == 200
    finally:
        kill_tree(server)


def test_alerts_name_what_needs_a_person() -> None:
    def run(**fields) -> dict:
        return {"name": "r", "rounds": fields.pop("rounds", []), "epsilon_budget": 0.0, **fields}

    def entry(number: int, applied: bool, skipped=(), buckets=()) -> dict:
        return {"round": number, "applied": applied, "skipped": list(skipped), "buckets": list(buckets)}

    refusal = {"participant": "h", "reason": "refused: policy.max_epsilon", "category": "refused"}
    timeout = {"participant": "h", "reason": "no reply within 5 s", "category": "timeout"}
    cases = {
        "budget": run(epsilon=8.0, epsilon_budget=10.0),
        "nothing_applied": run(rounds=[entry(1, False), entry(2, False)]),
        "site_refusing": run(rounds=[entry(1, True, [refusal]), entry(2, True, [refusal])]),
        "bucket_blamed": run(rounds=[entry(1, True, buckets=[{"members": ["a", "b"], "status": "ok", "blamed": {"a": "bad share"}}])]),
        "audit_broken": run(audit="line 3: edited"),
        "version_unverified": run(last_version="round-0001", last_version_verifies=False),
    }
    for kind, case in cases.items():
        assert [a["kind"] for a in alerts({"runs": {"r": case}})] == [kind], kind
    quiet = [
        run(epsilon=7.9, epsilon_budget=10.0), run(rounds=[entry(1, False), entry(2, True)]),
        run(rounds=[entry(1, True, [refusal]), entry(2, True, [timeout])]), run(rounds=[entry(1, True, [refusal])]),
    ]  # fmt: skip
    for case in quiet:
        assert alerts({"runs": {"r": case}}) == [], case


def test_a_directory_that_is_neither_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="neither a coordinator directory"):
        observe(tmp_path)
    assert main(["coordinator", "dashboard", str(tmp_path)]) == 2
    assert "neither a coordinator directory" in capsys.readouterr().err


def test_a_version_tampered_with_after_a_snapshot_shows_at_the_next(live: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(live["directory"] / "runs" / "main", run)
    shutil.copy(live["directory"] / "coordinator.pub", run / "coordinator.pub")  # a run directory verifies against its own key file
    assert all(v["verifies"] for v in observe(run)["runs"]["run"]["versions"])  # verified once, then remembered
    weights = run / "adapters" / f"round-{ROUNDS:04d}" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    shown = {v["version"]: v for v in observe(run)["runs"]["run"]["versions"]}
    assert not shown[f"round-{ROUNDS:04d}"]["verifies"] and shown[f"round-{ROUNDS - 1:04d}"]["verifies"]
    assert observe(run)["alerts"][0]["kind"] == "version_unverified"
