"""A participant's withdrawal from a run: every version it shaped marked, the head rolled back, a certificate.

Exact unlearning by replay: a version's lineage is its chain of parents (manifest `parent`);
a participant contributed to a version when the round that made it applied its update (the
audit log's round records: `answered`, `applied`, `version`). Every version whose lineage
includes such a round gets a signed withdrawal record (fedlora/registry.py), the published
head (`adapters/final`) and the checkpoint go back to the last version of the head's lineage
without it, and the next `--resume` re-trains the rounds after that as a new lineage with the
participant excluded: with the same seeds, sampling is over the same remaining names and each
round starts from the same adapter, so the new head is the one a run without it would have
made (bit for bit in plaintext; under secure aggregation fresh buckets are drawn, so within
the fixed-point error).

The privacy accountant is not rolled back: the withdrawn versions were released, so what they
spent stays spent, and the replay's rounds are charged on top like any other round.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.checkpoint import CHECKPOINT, VERSION_CHECKPOINTS, load_checkpoint, save_checkpoint
from coordinator.outputs import Lineage, read_metrics
from coordinator.participants import ParticipantBook
from fedlora.atomic import write_bytes_atomic, write_json_atomic
from fedlora.audit import AuditLog, read_records
from fedlora.registry import MANIFEST, WITHDRAWAL, document_verifies, sign_document, trusted_key, withdraw_version
from fedlora.withdrawal_request import request_problems

WITHDRAWALS = "withdrawals"  # signed certificates, one per participant and run
CERTIFICATE_KIND = "fedlora withdrawal certificate"
SECURE_SCOPE = (
    "Its update was only ever summed with its bucket's members' (rounds and buckets listed): the coordinator never "
    "saw it alone. Replay removes every contribution it made from the new lineage: no re-trained round includes its "
    "update, and no re-trained participant starts from a version that did. Replay cannot remove: copies of the "
    "withdrawn versions already taken by their users; the bucket sums' norms and cosines recorded in the metrics of "
    "the withdrawn lineage; the privacy this site spent (its own ledger keeps it); what its bucket's members could "
    "learn from the withdrawn versions they trained from."
)


def contributors(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Version -> the participants whose updates the round that made it applied."""
    made: dict[str, set[str]] = {}
    for record in records:
        if record.get("event") == "round" and record.get("applied"):
            made[record.get("version") or f"round-{record['round']:04d}"] = set(record.get("answered", []))
    return made


def parents(adapters: Path) -> dict[str, str | None]:
    """Version -> its parent, from every signed manifest under `adapters/` (`final` is a copy, left out)."""
    out = {}
    for directory in sorted(adapters.glob("round-*")):
        if (directory / MANIFEST).is_file():
            out[directory.name] = json.loads((directory / MANIFEST).read_text())["facts"].get("parent")
    return out


def ancestry(version: str, parent_of: dict[str, str | None]) -> list[str]:
    """The version and its ancestors, newest first."""
    chain, seen = [], set()
    current: str | None = version
    while current is not None and current not in seen:
        chain.append(current)
        seen.add(current)
        current = parent_of.get(current)
    return chain


def tainted(name: str, made: dict[str, set[str]], parent_of: dict[str, str | None]) -> list[str]:
    """Every version whose lineage includes a round that applied `name`'s update."""
    return [version for version in parent_of if any(name in made.get(v, ()) for v in ancestry(version, parent_of))]


def rollback_target(head: str, shaped: set[str], parent_of: dict[str, str | None]) -> str | None:
    """The newest version of the head's lineage that `name` did not shape (None: not even round 0)."""
    return next((version for version in ancestry(head, parent_of) if version not in shaped), None)


def secure_rounds(records: list[dict[str, Any]], name: str, shaped: set[str]) -> list[dict[str, Any]]:
    """The secure rounds of withdrawn versions in which `name`'s update was summed, with its bucket."""
    out = []
    for record in records:
        if record.get("event") == "round" and record.get("applied") and record.get("version") in shaped:
            bucket = next((members for members in record.get("buckets", []) if name in members), None)
            if bucket is not None and name in record.get("answered", []):
                out.append({"round": record["round"], "version": record["version"], "bucket": bucket})
    return out


def withdraw_from_run(run_dir: Path, name: str, reason: str, key: Ed25519PrivateKey, requested_by: dict[str, Any]) -> dict[str, Any]:
    """Withdraw `name` from a run that is not running; the signed certificate (also written to the run).

    Marks its versions, rolls the head and the checkpoint back, archives the withdrawn lineage's
    metrics, excludes it from every later round (`lineage.json`), records it in the audit chain.
    """
    run_dir = Path(run_dir)
    with open(run_dir / ".withdrawal.lock", "a") as lock:  # the operator's command and a coordinator ending its rounds
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _withdraw(run_dir, name, reason, key, requested_by)


def _withdraw(run_dir: Path, name: str, reason: str, key: Ed25519PrivateKey, requested_by: dict[str, Any]) -> dict[str, Any]:
    audit_path = run_dir / "audit.jsonl"
    records = read_records(audit_path)
    if not any(name in r.get("sampled", []) + r.get("answered", []) for r in records if r.get("event") == "round"):
        known = sorted({n for r in records if r.get("event") == "round" for n in r.get("sampled", [])})
        raise KeyError(f"{name!r} never took part in the run in {run_dir} (participants: {', '.join(known) or 'none'})")
    lineage = Lineage.load(run_dir)
    if name in lineage.withdrawn:
        raise ValueError(f"{name!r} is already withdrawn from the run in {run_dir}: {lineage.withdrawn[name]}")
    parent_of = parents(run_dir / "adapters")
    shaped = tainted(name, contributors(records), parent_of)
    state = load_checkpoint(run_dir / CHECKPOINT)
    head = lineage.version(int(state["round"]))
    target = rollback_target(head, set(shaped), parent_of) if head in shaped else head
    if head in shaped and (target is None or not (run_dir / VERSION_CHECKPOINTS / f"{target}.npz").is_file()):
        raise ValueError(
            f"cannot roll the run in {run_dir} back to {target}: no state was kept for it (checkpoints/{target}.npz; runs "
            "made before fedlora kept a checkpoint per version cannot be re-trained exactly); nothing was changed"
        )
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    certificate_id = hashlib.sha256(f"{run_dir.resolve()}|{name}|{when}".encode()).hexdigest()[:16]
    for version in shaped:
        mark_withdrawn(run_dir / "adapters" / version, key, name, reason, when, certificate_id)
    facts: dict[str, Any] = {
        "participant": name,
        "reason": reason,
        "requested_by": requested_by,
        "withdrawn_at": when,
        "certificate": certificate_id,
        "withdrawn_versions": shaped,
        "head_before": head,
        "rolled_back_to": target,
        "secure_rounds": secure_rounds(records, name, set(shaped)),
    }
    if head in shaped:
        roll_back(run_dir, lineage, target, parent_of, head)
    lineage.withdrawn[name] = f"{reason} ({when})"
    lineage.save(run_dir)
    record = AuditLog(audit_path).append({"event": "withdrawal", **facts, "lineage": lineage.number})
    # The replay starts from the rolled-back state, checkpointed after the withdrawal's record.
    rolled = load_checkpoint(run_dir / VERSION_CHECKPOINTS / f"{target}.npz") if head in shaped and target else state
    rolled = rolled | {"privacy": state["privacy"], "audit_last": record["hash"]}  # what was spent stays spent
    save_checkpoint(run_dir / CHECKPOINT, rolled)
    certificate = sign_document({
        "kind": CERTIFICATE_KIND,
        "run": run_dir.name,
        **facts,
        "lineage": lineage.number,
        "replay_from_round": int(rolled["round"]) + 1,
        "audit_record": {"seq": record["seq"], "hash": record["hash"]},
        **({"secure_scope": SECURE_SCOPE} if facts["secure_rounds"] else {}),
    }, key)
    write_json_atomic(run_dir / WITHDRAWALS / f"{name}.json", certificate)
    return certificate


def mark_withdrawn(directory: Path, key: Ed25519PrivateKey, name: str, reason: str, when: str, certificate_id: str) -> None:
    """Sign a withdrawal record into a version (adding `name` to the participants of an existing one)."""
    existing = json.loads((directory / WITHDRAWAL).read_text()) if (directory / WITHDRAWAL).is_file() else {}
    participants = sorted(set(existing.get("participants", [])) | {name})
    withdraw_version(directory, key, {"participants": participants, "reason": reason, "withdrawn_at": when, "certificate": certificate_id})


def roll_back(run_dir: Path, lineage: Lineage, target: str, parent_of: dict[str, str | None], head: str) -> None:
    """Publish `target` as the head and start the next lineage from it; the old lineage's metrics are archived."""
    chain = list(reversed(ancestry(target, parent_of)))  # round 0 .. target
    base_round = len(chain) - 1
    old = list(reversed(ancestry(head, parent_of)))
    archive = run_dir / "lineages" / f"lineage-{lineage.number}.metrics.jsonl"
    archive.parent.mkdir(exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", archive)
    kept = [row for row in read_metrics(run_dir) if row["round"] <= base_round and "stopped" not in row]
    write_bytes_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(row, allow_nan=True) + "\n" for row in kept).encode())
    final = run_dir / "adapters" / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(run_dir / "adapters" / target, final)
    lineage.number += 1
    lineage.base_round = base_round
    lineage.chain = dict(enumerate(chain))
    lineage.replaced = {r: version for r, version in enumerate(old) if r > base_round}


def verify_certificate(certificate: dict[str, Any], public_key_pem: bytes, audit_path: Path | None = None) -> list[str]:
    """What is wrong with a withdrawal certificate (empty if nothing): its signature, and its audit record if given."""
    if certificate.get("kind") != CERTIFICATE_KIND:
        return [f"not a withdrawal certificate (kind {certificate.get('kind')!r})"]
    problems = [] if document_verifies(certificate, trusted_key(public_key_pem)) else ["the signature does not verify with the trusted key"]
    if audit_path is not None:
        seq, digest = certificate["audit_record"]["seq"], certificate["audit_record"]["hash"]
        records = read_records(audit_path)
        record = records[seq] if seq < len(records) else {}
        if record.get("hash") != digest:
            problems.append(f"{audit_path} has no record {seq} with the certificate's hash (the chain lacks the withdrawal)")
        elif any(record.get(key) != certificate.get(key) for key in ("participant", "withdrawn_versions", "rolled_back_to", "certificate")):
            problems.append(f"{audit_path} record {seq} states another withdrawal than the certificate")
    return problems


def requested_by(request: dict[str, Any] | None) -> dict[str, Any]:
    """Who asked, for the certificate: the operator, or the site with its signed request's digest."""
    if request is None:
        return {"by": "operator"}
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    return {"by": "participant", "request_sha256": digest, "signed_at": request.get("at"), "request": request}


def honour_request(book: ParticipantBook, name: str, request: dict[str, Any], audit: AuditLog) -> str:
    """Revoke and mark withdrawn a site whose signed request checks out; what was done, for the log.

    A request that does not check out is refused in the audit chain (the site's own refusals
    keep arriving, so the operator sees it every round until it is resolved).
    """
    entry = book.find(name)
    if entry.withdrawal:
        return ""
    problems = request_problems(request, name, entry.fingerprint)
    if problems:
        audit.append({"event": "withdrawal_refused", "participant": name, "problems": problems})
        return f"refused a withdrawal request in {name}'s reply: {'; '.join(problems)}"
    book.withdraw(name, str(request.get("reason", "")), requested_by(request))
    book.revoke(name, f"withdrawn: {request.get('reason', '')}")
    audit.append({"event": "withdrawal_requested", "participant": name, "requested_by": requested_by(request)})
    return f"{name} asked to withdraw ({request.get('reason')}): revoked now; its versions are withdrawn when this run's rounds end"
