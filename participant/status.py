"""What a deployed site did and declined, from its own files: one report for `fedlora participant status`,
the monitor page and the site's Prometheus metrics (participant/monitor.py), so the three never disagree.

It only reads: DIR/events.jsonl (participant/site.py: refusals with the rules they name, the coordinator's
blame, a withdrawal, and each round the participant trained, each update it sent and each global adapter
it evaluated), DIR/ledger.json (participant/ledger.py) and the approvals (participant/approvals.py).

Which versions hold this site's updates: its update of round r goes into the global adapter the
coordinator makes from round r, which it then sends out: the site records that adapter's hash when it
evaluates it (round r) or trains from it (round r + 1). The coordinator's audit log names the version
with that `adapter_sha256` in its `round` records (round-0003, or round-0003-r1 once re-trained after a
withdrawal), and every later version of the run builds on it. Whether the round was applied is the
coordinator's to say; the site only knows what it sent.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from participant.approvals import approval_status
from participant.ledger import site_status
from participant.local_config import load_local_config
from participant.site import CONTRIBUTED_EVENT, EVALUATED_EVENT, EVENTS, TRAINED_EVENT

RECENT = 5  # refusals and blames shown in full: the last few
UNCLASSIFIED = "unclassified"  # the rule of a refusal recorded before refusals named their rules
ACTIVITY = (TRAINED_EVENT, CONTRIBUTED_EVENT, EVALUATED_EVENT)


def read_events(site: Path) -> list[dict[str, Any]]:
    """events.jsonl's records, oldest first ([] before the first); a last line a crash cut short is left
    out. ValueError naming the line when a whole line is not a record."""
    path = Path(site) / EVENTS
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # what follows the last newline is unfinished
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not a record the participant wrote ({err}); restore the line") from None
        if not isinstance(record, dict) or not {"time", "event"} <= record.keys():
            raise ValueError(f"{path}:{number} is not a record the participant wrote (no time and event); restore the line")
        records.append(record)
    return records


def refusal_summary(events: list[dict[str, Any]], recent: int = RECENT) -> dict[str, Any]:
    """How many instructions were refused, how many named each rule (one may name several), and the last few."""
    refused = [e for e in events if e["event"] == "refused"]
    by_rule = Counter(rule for e in refused for rule in e.get("rules", [UNCLASSIFIED]))
    return {"total": len(refused), "by_rule": dict(sorted(by_rule.items())), "last": refused[-recent:]}


def blame_summary(events: list[dict[str, Any]], recent: int = RECENT) -> dict[str, Any]:
    """Secure-aggregation instances aborted with evidence against the coordinator (the evidence stays in the file)."""
    blamed = [e for e in events if e["event"] == "coordinator-blamed"]
    return {"total": len(blamed), "last": [{"time": e["time"], "reason": e["reason"]} for e in blamed[-recent:]]}


def run_summaries(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the site did in each run (by configuration hash, as approved; a resumed run keeps it), first run first."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["event"] in ACTIVITY:
            runs.setdefault(event["config_sha256"], []).append(event)
    return [run_summary(config_sha256, records) for config_sha256, records in runs.items()]


def run_summary(config_sha256: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's rounds trained and contributed to, the formats the site held the base in, bytes sent, and
    the adapter each contributed round made."""
    sent = [e for e in records if e["event"] == CONTRIBUTED_EVENT]
    contributions = {e["contribution"]: e for e in sent}  # a retried message records the same contribution again
    made: dict[int, str] = {}  # round -> hash of the adapter the coordinator made from it, as last seen
    for event in records:
        if event["event"] == TRAINED_EVENT:
            made[event["round"] - 1] = event["trained_from"]
        elif event["event"] == EVALUATED_EVENT:
            made[event["round"]] = event["adapter_sha256"]
    contributed = sorted({e["round"] for e in contributions.values()})
    return {
        "config_sha256": config_sha256,
        "flower_runs": sorted({e["run"] for e in records}),
        "rounds_trained": sorted({e["round"] for e in records if e["event"] == TRAINED_EVENT}),
        "base_weights": sorted({e["base_weights"] for e in records if "base_weights" in e}),  # this site's own format(s)
        "rounds_contributed": contributed,
        "contributions": len(contributions),
        "bytes_sent": sum(e["bytes"] for e in contributions.values()),
        "last_contribution": sent[-1]["time"] if sent else None,
        "versions": [{"round": r, "adapter_sha256": made.get(r)} for r in contributed],  # None: not sent to this site yet
    }


def site_report(site: Path, recent: int = RECENT) -> dict[str, Any]:
    """Everything `participant status` shows: the privacy ledger and approvals (as before), the runs, refusals,
    blame and withdrawal; ValueError or FileNotFoundError naming the file that does not read."""
    site = Path(site)
    local = load_local_config(site)
    events = read_events(site)
    withdrew = [e for e in events if e["event"] == "withdrew"]
    return site_status(site) | approval_status(site, local.policy) | {
        "site": local.site.name,
        "directory": str(site.resolve()),
        "runs": run_summaries(events),
        "refusals": refusal_summary(events, recent),
        "coordinator_blamed": blame_summary(events, recent),
        "withdrawn": {"time": withdrew[-1]["time"], "reason": withdrew[-1]["reason"]} if withdrew else None,
    }


def rounds_text(rounds: list[int]) -> str:
    """Sorted rounds as ranges, '1-3, 5' ('none' for none): how the command and the page print them."""
    spans: list[list[int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans) or "none"
