"""The hash-chained audit log: a clean chain verifies; an edit, a reorder or a removal does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.audit import GENESIS, AuditLog, verify
from fedlora.cli import main


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
