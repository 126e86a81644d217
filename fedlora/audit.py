"""Append-only audit log: one JSON record per line, each carrying the hash of the one before.

A record is `{"seq", "prev", ...fields, "hash"}`: `prev` is the previous record's `hash` (64
zeros for the first), and `hash` is SHA-256 over the record's canonical JSON without `hash`.
Editing a record breaks its own hash; removing or reordering records breaks the chain (`seq`
and `prev`). Cutting records off the end leaves a valid shorter chain, so the last hash must
be anchored elsewhere (e.g. in a signed adapter manifest) to detect truncation: `verify`
returns it for that purpose. Each append is flushed and fsynced before the round goes on.

`verify` also recomputes every secure round's buckets from the secret recorded beside them
(`bucket_secret`, `bucket_size`; fedlora/secagg/buckets.py), so the log shows that the buckets
are the ones that secret draws.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedlora.secagg.buckets import assign_named_buckets

GENESIS = "0" * 64


def record_hash(record: dict[str, Any]) -> str:
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        records = read_records(self.path) if self.path.exists() else []
        self.seq = len(records)
        self.last = records[-1]["hash"] if records else GENESIS

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Write one record after the last; returns it with its seq, prev and hash."""
        reserved = {"seq", "prev", "hash"} & set(fields)
        if reserved:
            raise ValueError(f"audit fields {sorted(reserved)} are set by the log itself")
        record = {"seq": self.seq, "prev": self.last, **fields}
        record["hash"] = record_hash(record)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True, allow_nan=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.seq, self.last = self.seq + 1, record["hash"]
        return record


def read_records(path: Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
    return records


def verify(path: Path) -> tuple[list[str], str]:
    """Every break in the chain (empty if none), and the last record's hash (to anchor elsewhere)."""
    problems, previous = [], GENESIS
    try:
        records = read_records(path)
    except ValueError as err:
        return [str(err)], ""
    for position, record in enumerate(records):
        where = f"record {position + 1}"
        if record.get("seq") != position:
            problems.append(f"{where}: seq {record.get('seq')} where {position} belongs (a record was removed, added or moved)")
        if record.get("prev") != previous:
            problems.append(f"{where}: prev does not match the hash of the record before it (removed or reordered)")
        if record.get("hash") != record_hash(record):
            problems.append(f"{where}: its hash does not match its content (edited)")
        previous = record.get("hash", "")
        problems += [f"{where}: {problem}" for problem in bucket_problems(record)]
    return problems, previous


def bucket_problems(record: dict[str, Any]) -> list[str]:
    """Why a round record's buckets are not the ones its recorded secret draws (empty if they are)."""
    if "bucket_secret" not in record:
        return []
    recorded = record.get("buckets", [])
    try:
        drawn = assign_named_buckets([name for bucket in recorded for name in bucket], record["bucket_size"], bytes.fromhex(record["bucket_secret"]))
    except (KeyError, TypeError, ValueError) as err:
        return [f"round {record.get('round')}: its buckets cannot be recomputed from bucket_secret ({err})"]
    if drawn != recorded:
        return [f"round {record.get('round')}: its buckets are not the ones its bucket_secret draws ({drawn})"]
    return []
