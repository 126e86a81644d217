"""Long-term identities in SecAgg+: who signed a key or a survivor set, checked against a roster.

Against a server that deviates, Bonawitz et al. (CCS 2017, §4 "active adversary", Fig. 4) sign
every key advertisement with a long-term key from a PKI: a server that relays its own keys in
place of a member's (a man in the middle) or invents members (Sybils) is caught, because only
the member can sign its keys and only the PKI says which key is whose. Here the PKI is a
*roster*: consortium member names and key fingerprints, pinned by each site out of band (like
the CA), so the coordinator cannot extend it. Every signature binds the instance's parameter
digest (`crypto.params_digest`), so it cannot be replayed into another instance.

Deployed, a participant's root identity is its registered node key (EC P-384; `fedlora.pki`),
and roster fingerprints are `pki.key_fingerprint`'s. It does not sign protocol messages itself:
it certifies, once, a long-lived Ed25519 *signing key* of the site (ECDSA-SHA384 over the
Ed25519 public key), and that key signs everything in the protocol. An Ed25519 signature costs
about a seventh of a P-384 one to make and a fifth to check (docs/benchmarks.md, issue 22), and
a participant checks one per neighbour and one per member on the survivor set each round. A
member is presented by its *card*: signing key, certificate and node public key together; a
verifier checks the certificate once per card (`Identity.known` caches the result) and the roster
fingerprint and signature every time. Revoking a node key (a new roster) revokes its card.

In simulation there are no site directories: `simulated_identity` derives each virtual
participant's keys from its name, so anyone can sign for anyone. It exercises the same code and
proves nothing (simulation only).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedlora.pki import CURVE, key_fingerprint

from .crypto import DOMAIN

_SIGNATURE = ec.ECDSA(hashes.SHA384())
_CERTIFICATE = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)  # RFC 6979: one card per key pair, so caches hit
_SIMULATED = b"fedlora/secagg/simulated-identity/v1|"  # public: simulated keys are not secret
_SIGNING_KEY_BYTES = 32  # raw Ed25519 public key
_KNOWN_CARDS = 4096  # certificates remembered per verifier; more are checked again
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973  # of P-384


@dataclass(frozen=True)
class Roster:
    """Consortium members by name -> key fingerprint ("sha256:<hex>"), pinned by each site."""

    members: dict[str, str]

    def fingerprint_of(self, name: str) -> str:
        """The pinned fingerprint of `name`; KeyError saying the name is not on the roster."""
        if name not in self.members:
            raise KeyError(f"{name!r} is not on this site's roster ({len(self.members)} members)")
        return self.members[name]


@dataclass(frozen=True)
class Card:
    """A member as presented in the protocol: its certified signing key, under its node key."""

    fingerprint: str  # of the node key: what the roster pins
    signing_key: ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class Identity:
    """This participant's signing key and card, its name on the roster, and the roster it checks others by."""

    name: str
    signing_key: ed25519.Ed25519PrivateKey
    card: bytes  # `make_card`: what others check its signatures with
    roster: Roster
    known: dict[bytes, Card] = field(default_factory=dict, compare=False, repr=False)  # cards already checked

    def sign(self, statement: bytes) -> bytes:
        return self.signing_key.sign(statement)


def certify(node_key: ec.EllipticCurvePrivateKey, signing_key: ed25519.Ed25519PublicKey) -> bytes:
    """The node key's ECDSA-SHA384 certificate of a signing key (made once per site)."""
    return node_key.sign(_certified_statement(_raw(signing_key)), _CERTIFICATE)


def make_card(node_public: ec.EllipticCurvePublicKey, signing_key: ed25519.Ed25519PublicKey, certificate: bytes) -> bytes:
    """signing key (32 bytes) | certificate length (2) | certificate | node key (OpenSSH line)."""
    return _raw(signing_key) + struct.pack(">H", len(certificate)) + certificate + encode_public(node_public)


def open_card(card: bytes, known: dict[bytes, Card]) -> Card:
    """The card's node fingerprint and signing key once its certificate verifies; ValueError otherwise.
    A card seen before (in `known`) is not checked again."""
    if card in known:
        return known[card]
    raw, certificate, node = _parts(card)
    try:
        node.verify(certificate, _certified_statement(raw), _SIGNATURE)
    except InvalidSignature:
        raise ValueError("the signing key's certificate does not verify under the card's node key") from None
    opened = Card(key_fingerprint(node), ed25519.Ed25519PublicKey.from_public_bytes(raw))
    if len(known) >= _KNOWN_CARDS:
        known.clear()
    known[card] = opened
    return opened


def checked_before(cards: list[bytes]) -> dict[bytes, Card]:
    """Cards this verifier opened before (kept in its own files), opened again without their certificates."""
    known = {}
    for card in cards[-_KNOWN_CARDS:]:
        raw, _, node = _parts(card)
        known[card] = Card(key_fingerprint(node), ed25519.Ed25519PublicKey.from_public_bytes(raw))
    return known


def _parts(card: bytes) -> tuple[bytes, bytes, ec.EllipticCurvePublicKey]:
    """signing key, certificate, node key of a card; ValueError if it is not one."""
    if len(card) < _SIGNING_KEY_BYTES + 2:
        raise ValueError("identity card is truncated")
    (length,) = struct.unpack(">H", card[_SIGNING_KEY_BYTES:_SIGNING_KEY_BYTES + 2])
    start = _SIGNING_KEY_BYTES + 2
    return card[:_SIGNING_KEY_BYTES], card[start:start + length], decode_public(card[start + length:])


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _certified_statement(raw_signing_key: bytes) -> bytes:
    return DOMAIN + b"|signing-key|" + raw_signing_key


def parse_roster(text: str, where: str = "roster") -> Roster:
    """A roster from its TOML (`[members]` name = "sha256:<hex>"); ValueError naming `where` and the entry."""
    try:
        members = tomllib.loads(text).get("members")
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not TOML ({err})") from None
    if not isinstance(members, dict) or not members:
        raise ValueError(f"{where}: needs a [members] table of name = \"sha256:<hex>\" entries")
    for name, value in members.items():
        if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise ValueError(f"{where}: members.{name} must be a key fingerprint \"sha256:<64 hex digits>\", got {value!r}")
    if len(set(members.values())) != len(members):
        raise ValueError(f"{where}: two members share one key fingerprint")
    return Roster(dict(members))


def roster_toml(roster: Roster) -> str:
    """The TOML a site pins (`parse_roster` reads it back)."""
    lines = ["# fedlora consortium roster: member name = key fingerprint. Pin it at every site; only the",
             "# operator's out-of-band copy counts (the coordinator cannot extend it).", "[members]"]
    return "\n".join(lines + [f"{json.dumps(name)} = {json.dumps(fp)}" for name, fp in sorted(roster.members.items())]) + "\n"


def encode_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """A public key as its OpenSSH line (what node.pub holds): plain bytes for the wire."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def decode_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """Inverse of `encode_public`; ValueError unless it is an EC P-384 key."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"identity is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, CURVE):
        raise ValueError("identity is not an EC P-384 key")
    return key


def verify(card: Card, signature: bytes, statement: bytes) -> None:
    """ValueError unless `signature` is the card's signing key's signature of `statement`."""
    try:
        card.signing_key.verify(signature, statement)
    except InvalidSignature:
        raise ValueError("signature does not verify") from None


def check_signed(roster: Roster, name: str, card: bytes, signature: bytes, statement: bytes, known: dict[bytes, Card]) -> str | None:
    """Why a statement is not signed by roster member `name` (None when it is)."""
    try:
        expected = roster.fingerprint_of(name)
        opened = open_card(card, known)
        if opened.fingerprint != expected:
            return f"signed with key {opened.fingerprint}, not {name!r}'s roster key {expected}"
        verify(opened, signature, statement)
    except (KeyError, ValueError) as err:
        return str(err).strip('"')
    return None


def key_statement(params: bytes, sender: int, receiver: int, s_public: bytes, c_public: bytes) -> bytes:
    """What `sender` signs for `receiver`: its masking key and the key it receives shares from `receiver` on."""
    return DOMAIN + b"|keys|" + params + struct.pack(">QQ", sender, receiver) + s_public + c_public


def bundle_statement(
    params: bytes, sender: int, receiver: int, s_public: bytes, c_public: bytes, ciphertext: bytes, b_commitment: bytes,
    s_commitment: bytes,
) -> bytes:
    """What `sender` signs for each share bundle it seals to `receiver`: its masking key, the receiving
    key it sealed to, the ciphertext and the commitments to its two shares. Without it a relay that
    garbles a bundle, or its commitments, makes the receiver accuse an honest sender and reveal the
    receiving key that opens the genuine bundle the relay kept: garbled to every neighbour, t shares
    of both secrets. The keys bound, a bundle of another setup of the instance does not verify either."""
    return (DOMAIN + b"|bundle|" + params + struct.pack(">QQ", sender, receiver) + s_public + c_public
            + hashlib.sha256(ciphertext).digest() + b_commitment + s_commitment)


def survivor_statement(params: bytes, survivors: list[int]) -> bytes:
    """What a survivor signs before revealing any share: the survivor set it was told (ConsistencyCheck)."""
    return DOMAIN + b"|survivors|" + params + struct.pack(f">{len(survivors)}Q", *sorted(survivors))


def simulated_identity(name: str, names: list[str]) -> Identity:
    """SIMULATION ONLY: `name`'s keys derived from its name, the roster from `names` the same way.
    One object per (name, roster), so a virtual participant remembers the cards it checked."""
    return _simulated_identity(name, tuple(names))


@lru_cache(maxsize=4096)
def _simulated_identity(name: str, names: tuple[str, ...]) -> Identity:
    node_key = _derived_key(name)
    signing_key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(_SIMULATED + b"signing|" + name.encode()).digest())
    card = make_card(node_key.public_key(), signing_key.public_key(), certify(node_key, signing_key.public_key()))
    return Identity(name, signing_key, card, simulated_roster(names))


def simulated_roster(names: list[str] | tuple[str, ...]) -> Roster:
    """SIMULATION ONLY: the roster of simulated identities for `names`."""
    return Roster({n: _derived_fingerprint(n) for n in names})


@lru_cache(maxsize=4096)
def _derived_key(name: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(hashlib.sha512(_SIMULATED + name.encode()).digest(), "big")
    return ec.derive_private_key(scalar % (_ORDER - 1) + 1, CURVE())


@lru_cache(maxsize=4096)
def _derived_fingerprint(name: str) -> str:
    return key_fingerprint(_derived_key(name).public_key())

