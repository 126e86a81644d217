"""examples/monitoring/: the Prometheus configuration, alert rules and Grafana dashboard work with our exporters.

promtool (Debian's prometheus package; .ci/run installs it) checks the configuration and rules
and runs the rules' unit tests (alerts-test.yml: each alert fires on its condition and stays
quiet just short of it). Every metric the rules and the dashboard query must be one the
coordinator's exporter really emits.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator.prometheus import CoordinatorCollector
from participant.metrics import SiteCollector
from fedlora.cli import main
from fedlora.config import load_config

MONITORING = Path(__file__).resolve().parents[1] / "examples" / "monitoring"
METRIC = re.compile(r"\b(fedlora_[a-z_]+)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is needed (.ci/run installs Debian's prometheus package)")
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_the_configuration_and_rules_load_and_the_rules_pass_their_unit_tests() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts-test.yml")):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in promtool("test", "rules", "alerts-test.yml").stdout


def exported_names(collector) -> set[str]:
    """The sample names a collector emits (a counter's samples end in _total)."""
    return {family.name + ("_total" if family.type == "counter" else "") for family in collector.collect()}


def test_every_metric_the_rules_and_the_dashboard_query_is_exported(tmp_path: Path) -> None:
    assert main(["coordinator", "init", str(tmp_path / "coordinator")]) == 0
    site = tmp_path / "site"
    assert main(["participant", "init", str(site), "--name", "hospital-a", "--data", "diabetes", "--label-column", "Outcome"]) == 0
    local = site / "participant.toml"  # limits, so that the limit gauges exist
    local.write_text(re.sub(r"(?m)^max_epsilon(_coordinator)? = .*$", lambda m: f"{m.group(0).split(' = ')[0]} = 8.0", local.read_text()))
    exported = exported_names(CoordinatorCollector(tmp_path / "coordinator")) | exported_names(SiteCollector(site))
    assert {"fedlora_coordinator_rounds_total", "fedlora_coordinator_participant_connected", "fedlora_participant_epsilon_limit"} <= exported
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queried = {expr for panel in dashboard["panels"] for target in panel["targets"] for expr in METRIC.findall(target["expr"])}
    queried |= set(METRIC.findall((MONITORING / "alerts.yml").read_text()))
    assert queried and not queried - exported, f"queried but never exported: {sorted(queried - exported)}"


def test_a_free_form_run_exports_its_loss_and_generation_scores_without_an_accuracy(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(load_config(None, ["model.task=generation"]).to_toml())
    rows = [
        {"round": 0, "participants": 0, "eval_loss": 3.0},
        {"round": 1, "applied": True, "participants": 2, "eval_loss": 1.0, "eval_exact_match": 0.25, "eval_token_f1": 0.4, "eval_rouge_l": 0.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in CoordinatorCollector(run).collect() for s in m.samples}
    assert samples[("fedlora_coordinator_eval_loss", (("run", "run"),))] == 1.0
    scores = {dict(labels)["score"]: value for (name, labels), value in samples.items() if name == "fedlora_coordinator_eval_generation"}
    assert scores == {"exact_match": 0.25, "token_f1": 0.4, "rouge_l": 0.5}
    assert not any(name == "fedlora_coordinator_eval_accuracy" for name, _ in samples)
