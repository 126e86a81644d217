"""The site's Prometheus metrics, read from its own files at every scrape (participant/status.py's report),
so what Prometheus shows always agrees with `fedlora participant status` and the files themselves.

Labels stay few: `config_sha256` names a run the site took part in (one per run), `rule` a refusal's rule
(a configuration key such as policy.require_secagg, or malformed, replay, withdrawn, setup-terms,
unclassified: never the free text), `view` the ledger's two views (consumers, coordinator).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from participant.site import TIME_FORMAT
from participant.status import site_report

PREFIX = "fedlora_participant_"
PER_RUN: tuple[tuple[str, str, Callable[[dict[str, Any]], float]], ...] = (  # counters by run: name, help, value of a run summary
    ("rounds_trained", "Rounds this site trained, by run configuration", lambda run: len(run["rounds_trained"])),
    ("contributions", "Updates this site sent (plaintext, or masked into a secure sum), by run configuration", lambda run: run["contributions"]),
    ("sent_bytes", "Payload bytes of the updates this site sent, by run configuration", lambda run: run["bytes_sent"]),
)
VIEWS = (("consumers", "epsilon", "max_epsilon"), ("coordinator", "epsilon_coordinator", "max_epsilon_coordinator"))


class SiteCollector(Collector):
    """Collects a site directory's metrics afresh at each scrape; reads its files, never writes them."""

    def __init__(self, site: Path) -> None:
        self.site = Path(site)

    def collect(self) -> Iterable[Metric]:
        return site_metrics(site_report(self.site))


def site_metrics(report: dict[str, Any]) -> list[Metric]:
    """The metric families of a `site_report`."""
    families: list[Metric] = []
    for name, documentation, value in PER_RUN:
        family = CounterMetricFamily(PREFIX + name, documentation, labels=["config_sha256"])
        for run in report["runs"]:
            family.add_metric([run["config_sha256"]], value(run))
        families.append(family)
    sent = [run["last_contribution"] for run in report["runs"] if run["last_contribution"]]
    if sent:
        last = max(datetime.strptime(time, TIME_FORMAT).timestamp() for time in sent)
        families.append(GaugeMetricFamily(PREFIX + "last_contribution_timestamp_seconds", "When this site last sent an update", value=last))
    refusals = report["refusals"]
    families.append(CounterMetricFamily(PREFIX + "refusals", "Instructions this site refused", value=refusals["total"]))
    by_rule = CounterMetricFamily(PREFIX + "refusal_rules", "Refusals naming each rule (one refusal may name several)", labels=["rule"])
    for rule, count in refusals["by_rule"].items():
        by_rule.add_metric([rule], count)
    blamed = report["coordinator_blamed"]["total"]
    epsilon = GaugeMetricFamily(PREFIX + "epsilon", "User-level epsilon this site's contributions spent, all runs (ledger.json)", labels=["view"])
    limit = GaugeMetricFamily(PREFIX + "epsilon_limit", "The site's policy limit on that epsilon (absent: none)", labels=["view"])
    for view, spent, limited in VIEWS:
        epsilon.add_metric([view], report[spent])
        if report[limited] > 0:
            limit.add_metric([view], report[limited])
    return families + [
        by_rule,
        CounterMetricFamily(PREFIX + "coordinator_blamed", "Secure-aggregation instances this site aborted, blaming the coordinator", value=blamed),
        epsilon,
        limit,
        GaugeMetricFamily(PREFIX + "epsilon_delta", "The delta at which the ledger states epsilon (policy.delta)", value=report["delta"]),
        GaugeMetricFamily(PREFIX + "withdrawn", "1 once this site has withdrawn from the consortium", value=float(report["withdrawn"] is not None)),
    ]
