"""Long-term identities in SecAgg+: who signed a key or a survivor set, checked against a roster.

Against a server that deviates, Bonawitz et al. (CCS 2017, §4 "active adversary", Fig. 4) sign
every key advertisement with a long-term key from a PKI: a server that relays its own keys in
place of a member's (a man in the middle) or invents members (Sybils) is caught, because only
the member can sign its keys and only the PKI says which key is whose. Here the PKI is a
*roster*: consortium member names and key fingerprints, pinned by each site out of band (like
the CA), so the coordinator cannot extend it. Every signature binds the instance's parameter
digest (`crypto.params_digest`), so it cannot be replayed into another instance.

Deployed, a participant's identity is its registered node key (EC P-384, ECDSA with SHA-384;
`fedlora.pki`) and fingerprints are `pki.key_fingerprint`'s. In simulation there are no site
directories: `simulated_identity` derives each virtual participant's key from its name, so
anyone can sign for anyone. It exercises the same code and proves nothing (simulation only).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tomllib
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.pki import CURVE, key_fingerprint

from .crypto import DOMAIN

_SIGNATURE = ec.ECDSA(hashes.SHA384())
_SIMULATED = b"fedlora/secagg/simulated-identity/v1|"  # public: simulated keys are not secret
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
class Identity:
    """This participant's signing key, its name on the roster, and the roster it checks others by."""

    name: str
    key: ec.EllipticCurvePrivateKey
    roster: Roster

    @property
    def public(self) -> bytes:
        return encode_public(self.key.public_key())

    def sign(self, statement: bytes) -> bytes:
        return self.key.sign(statement, _SIGNATURE)


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


def fingerprint(identity: bytes) -> str:
    """Roster fingerprint of an encoded identity (ValueError if it is not one)."""
    return key_fingerprint(decode_public(identity))


def verify(identity: bytes, signature: bytes, statement: bytes) -> None:
    """ValueError unless `signature` is the identity's ECDSA-SHA384 signature of `statement`."""
    try:
        decode_public(identity).verify(signature, statement, _SIGNATURE)
    except InvalidSignature:
        raise ValueError("signature does not verify") from None


def check_signed(roster: Roster, name: str, identity: bytes, signature: bytes, statement: bytes) -> str | None:
    """Why a statement is not signed by roster member `name` (None when it is)."""
    try:
        expected = roster.fingerprint_of(name)
        if fingerprint(identity) != expected:
            return f"signed with key {fingerprint(identity)}, not {name!r}'s roster key {expected}"
        verify(identity, signature, statement)
    except (KeyError, ValueError) as err:
        return str(err).strip('"')
    return None


def key_statement(params: bytes, sender: int, receiver: int, s_public: bytes, c_public: bytes) -> bytes:
    """What `sender` signs for `receiver`: its masking key and the key it receives shares from `receiver` on."""
    return DOMAIN + b"|keys|" + params + struct.pack(">QQ", sender, receiver) + s_public + c_public


def survivor_statement(params: bytes, survivors: list[int]) -> bytes:
    """What a survivor signs before revealing any share: the survivor set it was told (ConsistencyCheck)."""
    return DOMAIN + b"|survivors|" + params + struct.pack(f">{len(survivors)}Q", *sorted(survivors))


def simulated_identity(name: str, names: list[str]) -> Identity:
    """SIMULATION ONLY: `name`'s key derived from its name, the roster from `names` the same way."""
    return Identity(name, _derived_key(name), simulated_roster(names))


def simulated_roster(names: list[str]) -> Roster:
    """SIMULATION ONLY: the roster of simulated identities for `names`."""
    return Roster({n: key_fingerprint(_derived_key(n).public_key()) for n in names})


@lru_cache(maxsize=4096)
def _derived_key(name: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(hashlib.sha512(_SIMULATED + name.encode()).digest(), "big")
    return ec.derive_private_key(scalar % (_ORDER - 1) + 1, CURVE())

