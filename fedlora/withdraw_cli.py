"""`fedlora coordinator withdraw`, `fedlora participant withdraw`, `fedlora audit certificate`.

Handlers call coordinator/deploy.py, participant/site.py and coordinator/withdrawal.py and print
what the operator or the hospital needs to do next.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _coordinator_withdraw(args: argparse.Namespace) -> int:
    from coordinator import deploy

    for line in deploy.withdraw(Path(args.directory), args.name, args.reason, Path(args.request) if args.request else None):
        print(line)
    return 0


def _participant_withdraw(args: argparse.Namespace) -> int:
    from participant.site import withdraw

    path = withdraw(Path(args.directory), args.reason)
    print(f"withdrawal request signed with this site's node key: {path}")
    print("  from now on this site refuses every instruction, and each refusal carries the request to the coordinator;")
    print("  send the file to the operator as well. Keep the certificate they return (`fedlora audit certificate` checks it).")
    return 0


def _audit_certificate(args: argparse.Namespace) -> int:
    from coordinator.withdrawal import verify_certificate

    certificate = json.loads(Path(args.certificate).read_text())
    problems = verify_certificate(certificate, Path(args.public_key).read_bytes(), Path(args.audit) if args.audit else None)
    for problem in problems:
        print(f"{args.certificate}: {problem}")
    if problems:
        return 1
    print(
        f"{args.certificate}: signed by {args.public_key}; {certificate['participant']} withdrawn from run {certificate['run']} "
        f"at {certificate['withdrawn_at']}: {len(certificate['withdrawn_versions'])} versions withdrawn, head rolled back to "
        f"{certificate['rolled_back_to']}" + (f"; in {args.audit} as record {certificate['audit_record']['seq']}" if args.audit else "")
    )
    return 0


def add_withdraw_commands(coordinator: argparse._SubParsersAction, participant: argparse._SubParsersAction, audit: argparse._SubParsersAction) -> None:
    withdraw = coordinator.add_parser(
        "withdraw", help="withdraw a participant: revoke it now, mark every version it shaped, roll each run's head back, certify it"
    )
    withdraw.add_argument("directory")
    withdraw.add_argument("name")
    withdraw.add_argument("--reason", default="", help="why (kept in the certificate, the audit log and every withdrawn version)")
    withdraw.add_argument("--request", help="the site's signed withdrawal-request.json (checked against its registered key)")
    withdraw.set_defaults(handler=_coordinator_withdraw)
    pwithdraw = participant.add_parser("withdraw", help="leave the consortium: sign a withdrawal request and refuse every instruction from now on")
    pwithdraw.add_argument("directory")
    pwithdraw.add_argument("--reason", required=True)
    pwithdraw.set_defaults(handler=_participant_withdraw)
    certificate = audit.add_parser("certificate", help="check a withdrawal certificate's signature (and its record in a run's audit log)")
    certificate.add_argument("certificate")
    certificate.add_argument("--public-key", required=True, help="the coordinator's coordinator.pub")
    certificate.add_argument("--audit", help="the run's audit.jsonl, to check the certificate is in its chain")
    certificate.set_defaults(handler=_audit_certificate)
