"""A deployed participant's directory: its own configuration, policy checks and local log.

`fedlora participant start DIR` passes DIR to the ClientApp as the node config key
`participant-dir`. Every instruction is then checked against DIR/participant.toml and the runs
the site approved (DIR/approvals.json, participant/approvals.py) before anything is trained or
uploaded; a refusal (policy, approval, malformed message, replay) is appended
to DIR/events.jsonl with its reason and the rules it broke (`rules`: a short, bounded list that
metrics can count by), so the site can see what it was asked and declined (and logged as one line,
participant/report.py). What the participant did is appended there too, as it happens
(`record_activity`): each round it trained, each update it sent and each global adapter it evaluated,
with the run and the hash of the adapter, which is how a site later tells which versions hold its
updates (participant/status.py reads it all back).
DIR/roster.toml, pinned out of band like the CA, names the consortium's members and their key
fingerprints; with DIR/node.key it is this site's identity in secure aggregation (`site_identity`),
where DIR/signing.key (Ed25519, made on first use, certified by node.key) signs its messages and
DIR/known-cards.json remembers the other members' cards whose certificates it checked.
Without the key (simulation) one configuration plays both parts, as before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedlora.atomic import append_line, read_json, write_bytes_atomic, write_json_atomic
from fedlora.config import Config
from fedlora.pki import PRIVATE_MODE, key_fingerprint
from fedlora.secagg.identity import Identity, certify, checked_before, make_card, parse_roster
from fedlora.withdrawal_request import REQUEST, make_request, read_request, refusal_text
from participant.approvals import approval_violations, approved
from participant.local_config import effective_config, load_local_config, policy_violations

if TYPE_CHECKING:  # fedlora.wire imports Flower's records
    from fedlora.wire import Instruction

SITE_KEY = "participant-dir"
EVENTS = "events.jsonl"
ACCOUNTANT = "accountant.json"
ROSTER = "roster.toml"
NODE_KEY = "node.key"
SIGNING_KEY = "signing.key"
KNOWN_CARDS = "known-cards.json"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # of events.jsonl's `time`: local time with its UTC offset
# What a refusal broke when no configuration key names it (events.jsonl `rules`, beside policy.* and data.*).
MALFORMED, REPLAY, WITHDRAWN, SETUP_TERMS = "malformed", "replay", "withdrawn", "setup-terms"
# What the participant did (events.jsonl `event`): trained a round, sent an update, evaluated a global adapter.
TRAINED_EVENT, CONTRIBUTED_EVENT, EVALUATED_EVENT = "trained", "contributed", "evaluated"


class Refusal(RuntimeError):
    """An instruction this participant declines; the message names the rule and is the error reply."""


def site_of(node_config: dict[str, Any]) -> Path | None:
    value = node_config.get(SITE_KEY)
    return Path(str(value)) if value else None


def record_event(site: Path | None, event: str, **details: Any) -> None:
    """Append one line to the site's events.jsonl (the handler logs the refusal: participant/report.py)."""
    if site is not None:
        append_line(site / EVENTS, json.dumps({"time": time.strftime(TIME_FORMAT), "event": event, **details}))


def record_activity(site: Path | None, event: str, run_id: int, config_sha256: str, server_round: int, **details: Any) -> None:
    """Record what the participant did in a round of a run (TRAINED_EVENT, CONTRIBUTED_EVENT, EVALUATED_EVENT), before its reply leaves."""
    record_event(site, event, run=run_id, config_sha256=config_sha256, round=server_round, **details)


def refuse(site: Path | None, reason: str, rules: list[str], **details: Any) -> Refusal:
    """A Refusal, recorded with the rules it names (configuration keys, or MALFORMED, REPLAY, ...)."""
    record_event(site, "refused", reason=reason, rules=rules, **details)
    return Refusal(reason)


def min_bucket_size(site: Path | None) -> int:
    """The site's policy.min_bucket_size (1 without a site: in simulation the run's bucket size decides)."""
    return 1 if site is None else load_local_config(site).policy.min_bucket_size


def site_config(site: Path | None, instruction: Instruction, run_id: int, what: str, evaluating: bool = False) -> Config:
    """The configuration this round runs with here; raises Refusal when the policy forbids it or the site
    has not approved the run (Flower run `run_id`)."""
    run, server_round = instruction.config, instruction.server_round
    if site is None:
        return run
    if (site / REQUEST).is_file():  # withdrawn: nothing more, and the coordinator hears why with every refusal
        raise refuse(site, refusal_text(read_request(site / REQUEST)), [WITHDRAWN], round=server_round)
    local = load_local_config(site)
    violations = policy_violations(run, local, evaluating)
    violations += approval_violations(local.policy, approved(site, local.policy), instruction.config_sha256, run_id)
    if violations:
        reason = f"{local.site.name or 'this participant'} refuses {what} for round {server_round}: " + "; ".join(violations)
        raise refuse(site, reason, [violation.split(":", 1)[0] for violation in violations], round=server_round)  # each starts with its key
    return effective_config(run, local)


def node_key(site: Path) -> ec.EllipticCurvePrivateKey:
    key_path = site / NODE_KEY
    key = load_ssh_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: {type(key).__name__} is not the EC P-384 node key `fedlora participant init` makes")
    return key


def withdraw(site: Path, reason: str) -> Path:
    """Leave the consortium: a request signed with the node key, after which every instruction is refused."""
    site = Path(site).resolve()
    if (site / REQUEST).is_file():
        raise FileExistsError(f"{site} has already withdrawn ({site / REQUEST}); send that file to the operator if they have not seen it")
    if not reason.strip():
        raise ValueError("say why the site withdraws (--reason): the certificate and the audit log keep it")
    request = make_request(load_local_config(site).site.name, reason, node_key(site))
    write_json_atomic(site / REQUEST, request)
    record_event(site, "withdrew", reason=reason)
    return site / REQUEST


def site_identity(site: Path) -> Identity:
    """This site's signing identity: its signing key certified by its node key, named as the pinned
    roster names the node key."""
    roster_path = site / ROSTER
    if not roster_path.is_file():
        raise FileNotFoundError(
            f"no consortium roster at {roster_path}: secure aggregation needs the roster the operator distributes "
            f"(`fedlora coordinator roster`); install it with `fedlora participant init --roster` or copy it there"
        )
    roster = parse_roster(roster_path.read_text(), str(roster_path))
    key = node_key(site)
    mine = key_fingerprint(key.public_key())
    names = [name for name, fingerprint in roster.members.items() if fingerprint == mine]
    if len(names) != 1:
        raise ValueError(f"{roster_path} names this site's key {mine} {len(names)} times, not once: ask the operator for the current roster")
    signing_key = _signing_key(site / SIGNING_KEY)
    card = make_card(key.public_key(), signing_key.public_key(), certify(key, signing_key.public_key()))
    known = checked_before([bytes.fromhex(c) for c in read_json(site / KNOWN_CARDS, [])])
    return Identity(names[0], signing_key, card, roster, known)


def remember_cards(site: Path | None, identity: Identity) -> None:
    """Keep the cards this site has checked (a deployed SuperNode runs each message in a new process)."""
    if site is not None and len(identity.known) != len(read_json(site / KNOWN_CARDS, [])):
        write_json_atomic(site / KNOWN_CARDS, [card.hex() for card in identity.known])


def _signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """The site's Ed25519 signing key, made on first use (private from the first byte; of two
    processes making it at once, the first to link it wins and the other reads it)."""
    if not path.is_file():
        fresh = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            write_bytes_atomic(path, fresh, PRIVATE_MODE, exclusive=True)
        except FileExistsError:
            pass
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: {type(key).__name__} is not the Ed25519 signing key this site makes; remove it to make a new one")
    return key
