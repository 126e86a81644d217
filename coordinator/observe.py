"""What the operator's dashboard and `/metrics` show: one read-only snapshot of a coordinator directory.

A snapshot is built from the files the coordinator already writes (participants.json, each run's
metrics.jsonl, audit.jsonl, adapters/, lineage) and from the SuperLink's own SQLite state, opened
read-only, for who is connected. Nothing here writes, so a view can never change the federation,
and every number it shows is the one `metrics.jsonl` holds. A simulated run directory (no
coordinator.toml) is shown as a coordinator with that one run.

Alerts are what needs a person: a site refusing round after round, a bucket whose members were
blamed, a privacy budget mostly spent, a run that applies nothing, a broken audit chain or a head
version that does not verify.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

from coordinator.deploy import SETTINGS, run_status, status
from coordinator.outputs import GENERATION_LABELS, Lineage, read_metrics
from fedlora.config import ConfigError, load_config
from fedlora.registry import WITHDRAWAL, verify_adapter

REFUSALS_TO_ALERT = 2  # a site that refused this many of its last sampled rounds in a row needs a person
BUDGET_ALERT_FRACTION = 0.8  # epsilon spent against privacy.epsilon_budget
IDLE_ROUNDS_TO_ALERT = 2  # this many rounds in a row not applied
SUPERLINK_DB = Path("state") / "superlink.db"

# Why a participant was left out of a round, as a short category (bounded label values for Prometheus).
REASON_CATEGORIES = (
    ("refused:", "refused"),
    ("failed:", "failed"),
    ("no reply within", "timeout"),
    ("malformed reply", "malformed"),
    ("screened out", "screened"),
    ("secure aggregation: excluded", "blamed"),
    ("reply refused", "excluded"),
    ("left out", "dropped_with_bucket"),
)


def reason_category(reason: str) -> str:
    """The category of a skip reason ('other' for one not listed in REASON_CATEGORIES)."""
    return next((category for prefix, category in REASON_CATEGORIES if reason.startswith(prefix)), "other")


def round_series(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round (0 = untrained), what the charts and tables show, in metrics.jsonl's own numbers."""
    keys = (
        "round", "applied", "sampled", "participants", "eval_accuracy", "eval_loss", "majority_accuracy", "train_loss",
        "epsilon", "epsilon_coordinator", "seconds", "bytes_up", "bytes_down", "aborted", "robust_fallback", *GENERATION_LABELS.values(),
    )  # fmt: skip
    series = []
    for row in rows:
        if "stopped" in row:
            continue
        entry = {key: row[key] for key in keys if key in row and not (isinstance(row[key], float) and not math.isfinite(row[key]))}
        entry["stage_seconds"] = row.get("stage_seconds", {})
        entry["skipped"] = [{**skip, "category": reason_category(skip["reason"])} for skip in row.get("skipped", [])]
        entry["buckets"] = [
            {"members": b["members"], "status": b.get("status", ""), "blamed": b.get("blamed", {})} for b in row.get("secagg", {}).get("buckets", [])
        ]
        entry["quarantined"] = row.get("quarantined", {})
        series.append(entry)
    return series


def file_stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Each file's name, size and modification time: changes whenever a file of the version is rewritten."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file())


@functools.lru_cache(maxsize=4096)
def verified(directory: str, stamp: tuple[tuple[str, int, int], ...], public_key: bytes) -> tuple[str, ...]:
    """`verify_adapter`'s problems, once per content stamp: a page refresh or a scrape does not re-hash every
    version of every run (`fedlora adapter verify` always hashes afresh)."""
    return tuple(verify_adapter(Path(directory), public_key))


def verify_remembered(directory: Path, public_key: bytes) -> list[str]:
    """`verify_adapter` through `verified`: what a snapshot calls for every version, the head included."""
    return list(verified(str(directory), file_stamp(directory), public_key))


def versions(run_dir: Path, public_key: bytes | None) -> list[dict[str, Any]]:
    """Every adapter version of a run: its lineage, parent, whether it verifies and whether it is withdrawn."""
    adapters = Path(run_dir) / "adapters"
    out = []
    for version in sorted(adapters.glob("round-*")) if adapters.is_dir() else []:
        manifest = version / "manifest.json"
        if not manifest.is_file():
            continue  # being written
        facts = json.loads(manifest.read_text()).get("facts", {})
        problems = verify_remembered(version, public_key) if public_key else ["no coordinator.pub to verify against"]
        out.append({
            "version": version.name, "round": facts.get("round"), "parent": facts.get("parent"), "lineage": facts.get("lineage", 0),
            "verifies": not problems, "problems": problems, "withdrawn": (version / WITHDRAWAL).is_file(),
        })  # fmt: skip
    return out


def run_view(run_dir: Path, public_key: bytes | None) -> dict[str, Any]:
    """One run: the status `coordinator status` prints, its rounds, budget, versions and totals."""
    rows = read_metrics(run_dir) if Path(run_dir, "metrics.jsonl").is_file() else []
    series = round_series(rows)
    view = run_status(run_dir, public_key, verify_remembered) if public_key else {}
    try:
        budget = load_config(Path(run_dir) / "config.toml").privacy.epsilon_budget
    except (ConfigError, FileNotFoundError):
        budget = 0.0
    stages: dict[str, float] = {}
    for entry in series:
        for stage, seconds in entry["stage_seconds"].items():
            stages[stage] = stages.get(stage, 0.0) + seconds
    return view | {
        "name": Path(run_dir).name,
        "rounds": series,
        "epsilon_budget": budget,
        "versions": versions(run_dir, public_key),
        "lineage_withdrawn": Lineage.load(Path(run_dir)).withdrawn,
        "stage_seconds_total": stages,
        "bytes_up_total": sum(entry.get("bytes_up", 0) for entry in series),
        "bytes_down_total": sum(entry.get("bytes_down", 0) for entry in series),
        "last_round": series[-1]["round"] if series else None,
        "updated": Path(run_dir, "metrics.jsonl").stat().st_mtime if Path(run_dir, "metrics.jsonl").is_file() else None,
    }


def liveness(database: Path, now: float) -> dict[int, dict[str, Any]]:
    """Per Flower node id: whether the SuperLink holds it online, and when it last heard from it.

    Read from the SuperLink's SQLite state opened read-only; an unknown schema (another Flower
    release) or no database gives no liveness rather than an error.
    """
    if not database.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0) as connection:
            rows = connection.execute("SELECT node_id, online_until, last_activated_at FROM node").fetchall()
    except sqlite3.Error:
        return {}
    nodes = {}
    for node_id, online_until, activated in rows:
        node = node_id + 2**64 if node_id < 0 else node_id  # Flower stores uint64 ids as int64
        until = float(online_until) if online_until is not None else None
        nodes[node] = {"connected": until is not None and until > now, "last_seen": min(until, now) if until else None, "activated": activated}
    return nodes


def participant_views(directory: Path, book: list[dict[str, Any]], runs: dict[str, dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Each participant: its registration state, liveness, and across runs its refusals, blame and quarantine."""
    live = liveness(directory / SUPERLINK_DB, now)
    by_name: dict[str, dict[str, Any]] = {
        entry["name"]: {
            **entry, "registered": True, **live.get(entry["node_id"], {"connected": None, "last_seen": None}),
        } for entry in book
    }  # fmt: skip
    for run in runs.values():
        for entry in run["rounds"]:
            for skip in entry["skipped"]:
                view = by_name.setdefault(skip["participant"], {"name": skip["participant"], "registered": False})
                view.setdefault("skips", []).append({"run": run["name"], "round": entry["round"], **skip})
            for bucket in entry["buckets"]:
                for name, why in bucket["blamed"].items():
                    by_name.setdefault(name, {"name": name, "registered": False}).setdefault("blame", []).append(
                        {"run": run["name"], "round": entry["round"], "reason": why}
                    )
            for name, why in entry["quarantined"].items():
                by_name.setdefault(name, {"name": name, "registered": False})["quarantined"] = why
    for view in by_name.values():
        skips = view.setdefault("skips", [])
        view.setdefault("blame", [])
        view.setdefault("quarantined", "")
        view["refusals"] = [skip for skip in skips if skip["category"] == "refused"]
        view["by_category"] = {category: sum(s["category"] == category for s in skips) for category in sorted({s["category"] for s in skips})}
    return sorted(by_name.values(), key=lambda view: view["name"])


def alerts(snapshot: dict[str, Any]) -> list[dict[str, str]]:
    """What needs a human, most severe first: each alert a kind, a subject and a sentence saying why."""
    found: list[dict[str, str]] = []
    for run in snapshot["runs"].values():
        rounds = [entry for entry in run["rounds"] if entry["round"] > 0]
        if run.get("audit", "intact") != "intact":
            found.append({"kind": "audit_broken", "subject": run["name"], "text": f"audit chain of {run['name']}: {run['audit']}"})
        if run.get("last_version_verifies") is False:
            found.append({"kind": "version_unverified", "subject": run["name"], "text": f"head {run['last_version']} of {run['name']} does not verify"})
        idle = rounds[-IDLE_ROUNDS_TO_ALERT:]
        if len(idle) == IDLE_ROUNDS_TO_ALERT and not any(entry.get("applied") for entry in idle):
            found.append({
                "kind": "nothing_applied", "subject": run["name"],
                "text": f"{run['name']}: rounds {', '.join(str(e['round']) for e in idle)} applied nothing"
                + (f" ({idle[-1]['aborted']})" if idle[-1].get("aborted") else ""),
            })  # fmt: skip
        budget, spent = run.get("epsilon_budget") or 0.0, run.get("epsilon")
        if budget > 0 and spent is not None and spent >= BUDGET_ALERT_FRACTION * budget:
            found.append({"kind": "budget", "subject": run["name"], "text": f"{run['name']}: epsilon {spent:.3g} of the budget {budget:g} spent ({spent / budget:.0%})"})
        for entry in rounds:
            for bucket in entry["buckets"]:
                if bucket["blamed"]:
                    blamed = "; ".join(f"{name}: {why}" for name, why in bucket["blamed"].items())
                    found.append({"kind": "bucket_blamed", "subject": run["name"], "text": f"{run['name']} round {entry['round']}: blamed {blamed}"})
        found += refusing_sites(run["name"], rounds)
    return found


def refusing_sites(run_name: str, rounds: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Sites whose last REFUSALS_TO_ALERT rounds they were skipped in were all refusals (the reason of the last)."""
    history: dict[str, list[dict[str, Any]]] = {}
    for entry in rounds:
        for skip in entry["skipped"]:
            history.setdefault(skip["participant"], []).append(skip | {"round": entry["round"]})
    out = []
    for name, skips in sorted(history.items()):
        last = skips[-REFUSALS_TO_ALERT:]
        if len(last) == REFUSALS_TO_ALERT and all(skip["category"] == "refused" for skip in last):
            out.append({"kind": "site_refusing", "subject": name, "text": f"{name} refused rounds {', '.join(str(s['round']) for s in last)} of {run_name}: {last[-1]['reason']}"})
    return out


def observe(directory: Path, now: float | None = None) -> dict[str, Any]:
    """The snapshot of a coordinator directory (or of one simulated run directory)."""
    directory = Path(directory).resolve()
    now = time.time() if now is None else now
    if (directory / SETTINGS).is_file():
        report = status(directory)
        public_key: bytes | None = (directory / "coordinator.pub").read_bytes()
        run_dirs = sorted(p for p in (directory / "runs").glob("*") if p.is_dir()) if (directory / "runs").is_dir() else []
        book = report["participants"]
    elif (directory / "metrics.jsonl").is_file():
        key = directory / "coordinator.pub"
        report = {"address": None, "run_toml_config_sha256": None}
        public_key, run_dirs, book = (key.read_bytes() if key.is_file() else None), [directory], []
    else:
        raise FileNotFoundError(f"{directory} is neither a coordinator directory (no {SETTINGS}) nor a run directory (no metrics.jsonl)")
    runs = {run_dir.name: run_view(run_dir, public_key) for run_dir in run_dirs}
    snapshot = {
        "directory": str(directory), "address": report["address"], "run_toml_config_sha256": report["run_toml_config_sha256"],
        "taken": now, "runs": runs, "participants": participant_views(directory, book, runs, now),
    }  # fmt: skip
    snapshot["alerts"] = alerts(snapshot)
    return snapshot
