"""The hash-chained audit log: a clean chain verifies; an edit, a reorder or a removal does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.audit import GENESIS, AuditLog, verify
from fedlora.cli import main
from fedlora.secagg import assign_named_buckets


def _log(path: Path, count: int = 4) -> list[dict]:
    log = AuditLog(path)
    return [log.append({"event": "round", "round": k, "epsilon": 0.5 * k}) for k in range(count)]


def _rewrite(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_a_clean_chain_verifies_and_reopening_continues_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = _log(path)
    assert written[0]["prev"] == GENESIS and all(b["prev"] == a["hash"] for a, b in zip(written, written[1:]))
    AuditLog(path).append({"event": "stopped"})  # a reopened log links to the last record
    problems, last = verify(path)
    assert problems == [] and last == json.loads(path.read_text().splitlines()[-1])["hash"]


@pytest.mark.parametrize("tamper", ["edit", "reorder", "remove", "garbage"])
def test_tampering_is_detected(tmp_path: Path, tamper: str) -> None:
    path = tmp_path / "audit.jsonl"
    records = _log(path)
    if tamper == "edit":
        records[1]["epsilon"] = 0.1  # less privacy spent than was
    elif tamper == "reorder":
        records[1], records[2] = records[2], records[1]
    elif tamper == "remove":
        del records[2]
    _rewrite(path, records)
    if tamper == "garbage":
        path.write_text(path.read_text() + "not json\n")
    problems, _ = verify(path)
    assert problems
    assert main(["audit", "verify", str(path)]) == 1


def test_the_log_refuses_fields_it_sets_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set by the log"):
        AuditLog(tmp_path / "a.jsonl").append({"hash": "0" * 64})


def test_verify_recomputes_each_rounds_buckets_from_the_recorded_secret(tmp_path: Path) -> None:
    secret = bytes(range(32))
    names = [f"participant-{i}" for i in range(6)]
    drawn = assign_named_buckets(names, 2, secret)
    good, forged, broken = (tmp_path / f"{name}.jsonl" for name in ("good", "forged", "broken"))
    AuditLog(good).append({"event": "round", "round": 1, "buckets": drawn, "bucket_secret": secret.hex(), "bucket_size": 2})
    assert verify(good)[0] == []
    # A chain the coordinator wrote itself, intact, but with buckets it chose rather than drew.
    chosen = sorted([sorted(names[:2]), sorted(names[2:4]), sorted(names[4:])])
    assert chosen != drawn
    AuditLog(forged).append({"event": "round", "round": 1, "buckets": chosen, "bucket_secret": secret.hex(), "bucket_size": 2})
    (problem,) = verify(forged)[0]
    assert problem.startswith("record 1: round 1: its buckets are not the ones its bucket_secret draws")
    assert main(["audit", "verify", str(forged)]) == 1
    AuditLog(broken).append({"event": "round", "round": 1, "buckets": drawn, "bucket_secret": "0/1", "bucket_size": 2})
    assert "cannot be recomputed" in verify(broken)[0][0]
