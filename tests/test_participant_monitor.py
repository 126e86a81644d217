"""`fedlora participant monitor` (participant/monitor.py, metrics.py) and the exposure rules it shares
(fedlora/exposure.py).

The server runs in a thread on a free loopback port, as the command runs it; it is scraped over HTTP
(and HTTPS with a token) and the metrics are parsed with prometheus_client's own parser, then compared
with what the site's files say, read here without participant/status.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedlora.cli import main
from fedlora.exposure import check_exposure, is_loopback, load_token, parse_listen, token_matches
from fedlora.pki import create_ca, issue_server_certificate
from fedlora.privacy.ledger import Charge, Ledger
from fedlora.wire import instruction_content
from participant.app import checked_instruction
from participant.ledger import LEDGER, record_contribution
from participant.local_config import LOCAL_CONFIG
from fedlora.web import url
from participant.monitor import make_monitor_server
from participant.site import EVENTS, Refusal, record_activity, record_event
from tests.test_participant_policy import _context, _message, run_config, site

SHA = "c" * 64
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """A secure-only site with two DP contributions to a run, a refused plaintext instruction and a blame."""
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / LOCAL_CONFIG).write_text(site(require_secagg=True, max_epsilon=8.0).to_toml())
    for r in (1, 2):
        record_activity(directory, "trained", 5, SHA, r, trained_from=f"adapter-{r - 1}", examples=40)
        record_contribution(directory, f"{SHA}/round-{r}/bucket-0", Charge(0.5, 1.0, 0.9), 5, SHA, r, f"adapter-{r - 1}", 1000 + r)
    with pytest.raises(Refusal):  # the real refusal path: a plaintext instruction <b>reaches</b> a secure-only site
        checked_instruction(_message(instruction_content(np.zeros(8, dtype=np.float32), 3, run_config().to_toml())), _context(directory), "a <b>train</b> request")
    record_event(directory, "coordinator-blamed", reason="relayed a key its owner did not sign", evidence={"round_id": "x"})
    return directory


@contextmanager
def serve(directory: Path, **options: str) -> Iterator[str]:
    """The monitor serving in a thread; stopped on leaving the block, even when an assertion failed in it
    (cheroot's workers are not daemon threads: a server left running would keep pytest from exiting)."""
    server = make_monitor_server(directory, "127.0.0.1:0", **options)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield url(server)
    finally:
        server.stop()
        thread.join()


@pytest.fixture
def monitor(site_dir: Path) -> Iterator[str]:
    with serve(site_dir) as base:
        yield base


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict, str]:
    """(status, headers, body) of one request; an error status is returned, not raised."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def scrape(url: str, **kwargs) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}, parsed by prometheus_client."""
    status, _, text = fetch(f"{url}/metrics", **kwargs)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def file_events(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / EVENTS).read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mode) for p in sorted(directory.rglob("*")) if p.is_file()}


# --- metrics ----------------------------------------------------------------------------------

def test_the_metrics_are_what_the_sites_files_say(site_dir: Path, monitor: str) -> None:
    metrics = scrape(monitor)
    ledger = Ledger(1e-5)
    ledger.load_state_dict(json.loads((site_dir / LEDGER).read_text()))
    consumers, coordinator = ledger.epsilons()
    logged = file_events(site_dir)
    refused = [e for e in logged if e["event"] == "refused"]
    sent = [e for e in logged if e["event"] == "contributed"]
    run = (("config_sha256", SHA),)
    assert metrics[("fedlora_participant_epsilon", (("view", "consumers"),))] == pytest.approx(consumers)
    assert metrics[("fedlora_participant_epsilon", (("view", "coordinator"),))] == pytest.approx(coordinator)
    assert metrics[("fedlora_participant_epsilon_limit", (("view", "consumers"),))] == 8.0
    assert ("fedlora_participant_epsilon_limit", (("view", "coordinator"),)) not in metrics  # the policy sets none
    assert metrics[("fedlora_participant_rounds_trained_total", run)] == len([e for e in logged if e["event"] == "trained"]) == 2
    assert metrics[("fedlora_participant_contributions_total", run)] == len(sent) == len(ledger.entries) == 2
    assert metrics[("fedlora_participant_sent_bytes_total", run)] == sum(e["bytes"] for e in sent) == 2003
    assert metrics[("fedlora_participant_refusals_total", ())] == len(refused) == 1
    assert metrics[("fedlora_participant_refusal_rules_total", (("rule", "policy.require_secagg"),))] == 1
    assert metrics[("fedlora_participant_coordinator_blamed_total", ())] == 1
    assert metrics[("fedlora_participant_withdrawn", ())] == 0 and metrics[("fedlora_participant_epsilon_delta", ())] == 1e-5
    from datetime import datetime

    assert metrics[("fedlora_participant_last_contribution_timestamp_seconds", ())] == datetime.strptime(sent[-1]["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp()


def test_each_scrape_reads_the_files_afresh(site_dir: Path, monitor: str) -> None:
    before = scrape(monitor)
    record_event(site_dir, "refused", reason="refused a malformed train request: KeyError: 'round'", rules=["malformed"])
    after = scrape(monitor)
    assert after[("fedlora_participant_refusals_total", ())] == before[("fedlora_participant_refusals_total", ())] + 1
    assert after[("fedlora_participant_refusal_rules_total", (("rule", "malformed"),))] == 1


# --- the page, and what is answered --------------------------------------------------------------

def test_the_page_shows_a_refusals_rule_and_reason_escaped(monitor: str) -> None:
    status, headers, page = fetch(monitor)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8" and '<meta http-equiv="refresh"' in page
    assert "refuses a &lt;b&gt;train&lt;/b&gt; request for round 3: policy.require_secagg" in page and "<b>train</b>" not in page
    assert "relayed a key its owner did not sign" in page and f"{SHA}" in page and "1-2" in page  # blame, the run, its rounds


def test_only_get_and_head_are_answered(monitor: str) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = fetch(f"{monitor}/metrics", method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = fetch(f"{monitor}/metrics", "HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 0
    assert fetch(f"{monitor}/elsewhere")[0] == 404


def test_serving_leaves_the_site_directory_byte_identical(site_dir: Path, monitor: str) -> None:
    before = snapshot(site_dir)
    for path, method in (("/", "GET"), ("/metrics", "GET"), ("/", "HEAD"), ("/metrics", "POST")):
        fetch(monitor + path, method)
    assert snapshot(site_dir) == before


# --- exposure ------------------------------------------------------------------------------------

@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path]:
    create_ca(tmp_path / "pki")
    key, cert = issue_server_certificate(tmp_path / "pki", ["127.0.0.1"])
    (tmp_path / "token").write_text(TOKEN + "\n")
    return {"key": key, "cert": cert, "ca": tmp_path / "pki" / "ca.crt", "token": tmp_path / "token"}


def refusal(site_dir: Path, listen: str, **options: str) -> str:
    """Why the monitor refuses to bind; a server it bound after all is stopped (its threads would keep pytest alive)."""
    try:
        server = make_monitor_server(site_dir, listen, **options)
    except ValueError as err:
        return str(err)
    server.stop()
    raise AssertionError(f"the monitor bound {listen} with {sorted(options)}")


def test_an_address_others_can_reach_needs_tls_and_a_token(
    site_dir: Path, tls: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for listen in ("0.0.0.0:9464", "[::]:9464", "192.0.2.7:9464", "monitor.hospital.example:9464"):
        assert "without --tls-cert, --tls-key, --token-file" in refusal(site_dir, listen)
    assert re.search("without --tls-cert, --tls-key: .*TLS", refusal(site_dir, "0.0.0.0:9464", token_file=str(tls["token"])))
    assert "without --token-file" in refusal(site_dir, "0.0.0.0:9464", tls_cert=str(tls["cert"]), tls_key=str(tls["key"]))
    monkeypatch.setattr("fedlora.web.serve_forever", lambda server: server.stop() or pytest.fail("the monitor started serving"))
    assert main(["participant", "monitor", str(site_dir), "--listen", "0.0.0.0:9464"]) != 0
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    check_exposure("0.0.0.0", tls["cert"], tls["key"], tls["token"])  # all three: allowed


def test_with_a_token_a_request_without_it_is_refused_over_tls(site_dir: Path, tls: dict[str, Path]) -> None:
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    options = {"tls_cert": str(tls["cert"]), "tls_key": str(tls["key"]), "token_file": str(tls["token"])}
    with serve(site_dir, **options) as base:
        status, headers, _ = fetch(f"{base}/metrics", context=context)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")  # a browser asks for the token
        assert fetch(base, headers={"Authorization": "Bearer " + "f" * 32}, context=context)[0] == 401
        assert fetch(base, "POST", context=context)[0] == 401  # who may not read may not learn what is answered either
        assert scrape(base, headers={"Authorization": f"Bearer {TOKEN}"}, context=context)[("fedlora_participant_refusals_total", ())] == 1
        assert fetch(base, "POST", headers={"Authorization": f"Bearer {TOKEN}"}, context=context)[0] == 405
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP to the TLS port: the connection is dropped
            fetch(base.replace("https", "http"))


def test_the_certificate_goes_with_its_key_and_named_files_must_exist(tls: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="go together"):
        check_exposure("127.0.0.1", tls["cert"], None, None)
    with pytest.raises(ValueError, match="no such file: --token-file /nowhere"):
        check_exposure("127.0.0.1", None, None, "/nowhere")
    check_exposure("127.0.0.1", None, None, None)  # this machine only: nothing more needed


@pytest.mark.parametrize(("listen", "expected"), [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:80", ("::1", 80)), ("localhost:0", ("localhost", 0))])
def test_listen_is_host_and_port(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", ":9464", "127.0.0.1:http", "127.0.0.1:70000"])
def test_a_listen_without_host_and_port_is_refused_showing_the_form(listen: str) -> None:
    with pytest.raises(ValueError, match="give HOST:PORT"):
        parse_listen(listen)


def test_only_loopback_addresses_and_localhost_count_as_this_machine() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "monitor.hospital.example", ""))


def test_a_token_is_long_printable_and_compared_as_a_bearer_token(tmp_path: Path) -> None:
    for weak in ("", "short", "has a space in it, 1234567890", "é" * 20):
        (tmp_path / "token").write_text(weak)
        with pytest.raises(ValueError, match="openssl rand -hex 32"):
            load_token(tmp_path / "token")
    (tmp_path / "token").write_text(f"  {TOKEN}\n")
    token = load_token(tmp_path / "token")
    assert token == TOKEN
    assert token_matches(f"Bearer {TOKEN}", token) and token_matches(f"bearer  {TOKEN} ", token)
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()  # what a browser sends: the token as password
    assert token_matches(f"Basic {basic}", token) and token_matches(f"basic {basic}", token)
    assert not any(token_matches(h, token) for h in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer é", "Basic é"))
