"""The runs this site approved: a deployed participant trains and evaluates for no other (issue 24).

A SuperNode takes instructions from any run its coordinator starts; approval is what makes a run
one this site takes part in. A run is approved by its configuration hash (`fedlora.config.config_sha256`,
the SHA-256 of the run configuration every instruction carries; `fedlora coordinator status` prints it
for the operator to send): the hash pins everything the run is, its consortium terms included, it
stays the same when the run is resumed, and an instruction carrying any other configuration is not
approved. A Flower run id approves one Flower run whatever configuration it sends (the policy still
applies), and ends with it: a resumed run is a new Flower run.

DIR/approvals.json (replaced atomically) keeps every approval made with `fedlora participant approve`,
when it was made and, once withdrawn (`--revoke`), when; participant.toml's
`policy.approved_config_sha256` pins more. Both are read at every instruction, so an approval or a
withdrawal counts from the next instruction on, without restarting the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.atomic import read_json, write_json_atomic
from participant.local_config import SHA256_HEX, PolicySection

APPROVALS = "approvals.json"
CONFIG, RUN = "config_sha256", "run_id"


@dataclass(frozen=True)
class Approval:
    kind: str  # CONFIG or RUN
    value: str  # 64 lower-case hex digits, or a run id in decimal

    def __str__(self) -> str:
        return f"configuration sha256 {self.value}" if self.kind == CONFIG else f"Flower run {self.value}"


def parse_approval(text: str) -> Approval:
    """A configuration hash (64 hex digits) or a Flower run id (a number); ValueError saying which forms exist."""
    cleaned = text.strip().lower()
    if SHA256_HEX.fullmatch(cleaned):
        return Approval(CONFIG, cleaned)
    if cleaned.isdigit():
        return Approval(RUN, str(int(cleaned)))
    raise ValueError(
        f"{text!r} is neither a run configuration hash (64 hex digits: the operator's `fedlora coordinator status`, "
        "or this site's refusal, names it) nor a Flower run id (a number)"
    )


def approval_records(site: Path) -> list[dict[str, Any]]:
    """Every approval made in approvals.json, withdrawn ones included (`revoked` set); ValueError naming the
    file when it was edited into something else."""
    path = Path(site) / APPROVALS
    records = read_json(path, [])
    if not isinstance(records, list) or not all(isinstance(r, dict) and _is_approval(r) for r in records):
        raise ValueError(f"{path} is not a list of approvals written by `fedlora participant approve`; restore it or remove it")
    return records


def _is_approval(record: dict[str, Any]) -> bool:
    try:
        return parse_approval(str(record["value"])) == Approval(record["kind"], record["value"]) and "approved" in record
    except (KeyError, ValueError):
        return False


def standing(site: Path) -> set[Approval]:
    """approvals.json's approvals that are not withdrawn."""
    return {Approval(r["kind"], r["value"]) for r in approval_records(site) if not r.get("revoked")}


def approved(site: Path, policy: PolicySection) -> set[Approval]:
    """What the site approves now: its standing approvals and the policy's pinned hashes."""
    return standing(site) | {Approval(CONFIG, sha) for sha in policy.approved_config_sha256}


def approval_status(site: Path, policy: PolicySection) -> dict[str, Any]:
    """The approvals as `fedlora participant approvals` and `participant status` report them."""
    return {"require_approval": policy.require_approval, "pinned": list(policy.approved_config_sha256), "approvals": approval_records(site)}


def approval_violations(policy: PolicySection, granted: set[Approval], config_sha256: str, run_id: int) -> list[str]:
    """'policy.require_approval: why' when the site approved neither this configuration nor this run."""
    if not policy.require_approval or {Approval(CONFIG, config_sha256), Approval(RUN, str(run_id))} & granted:
        return []
    return [(
        f"policy.require_approval: this site has not approved Flower run {run_id}, configuration sha256 {config_sha256} "
        f"(it takes part once it runs `fedlora participant approve DIR {config_sha256}`)"
    )]


def approve(site: Path, text: str) -> tuple[Approval, bool]:
    """Record an approval; whether it is new (approving what stands already changes nothing)."""
    approval = parse_approval(text)
    if approval in standing(site):
        return approval, False
    _write(site, [*approval_records(site), {"kind": approval.kind, "value": approval.value, "approved": _now(), "revoked": None}])
    return approval, True


def revoke(site: Path, text: str, policy: PolicySection) -> Approval:
    """Withdraw a standing approval (kept in approvals.json, marked revoked); ValueError if there is none, or
    if the policy pins it (withdrawing here would change nothing)."""
    approval = parse_approval(text)
    if approval.kind == CONFIG and approval.value in policy.approved_config_sha256:
        raise ValueError(f"cannot revoke {approval} here: policy.approved_config_sha256 pins it; remove it from participant.toml")
    records = approval_records(site)
    current = [r for r in records if Approval(r["kind"], r["value"]) == approval and not r.get("revoked")]
    if not current:
        raise ValueError(f"cannot revoke {approval}: this site has not approved it (`fedlora participant approvals DIR` lists what it has)")
    _write(site, [r | {"revoked": _now()} if r in current else r for r in records])
    return approval


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write(site: Path, records: list[dict[str, Any]]) -> None:
    write_json_atomic(Path(site) / APPROVALS, records)
