"""Plain-data messages of the SecAgg+ stages and the participant's state.

Every field is `str`, `int`, `float`, `bytes`, a list of one of those, or a
uint32 numpy array (uint16 on the 16-bit wire, `narrow`), so the coordinator can
map a message onto Flower records (scalars and lists -> ConfigRecord, arrays ->
ArrayRecord) without knowing the protocol. Maps keyed by participant are parallel lists (`ids[i]` <-> `x[i]`),
because record keys must be strings. `from_dict` type-checks everything that
arrives from the wire before the protocol looks at it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .errors import SecAggProtocolError

M = TypeVar("M", bound="Message")
_WORDS = (np.dtype(np.uint32), np.dtype(np.uint16))  # the wire's words; which one, and how many, the server checks
_SCALARS: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bytes": bytes,
}


def _matches(value: Any, annotation: str) -> bool:
    if annotation == "np.ndarray":
        return isinstance(value, np.ndarray) and value.dtype in _WORDS and value.ndim == 1
    if annotation.startswith("list["):
        inner = _SCALARS[annotation[5:-1]]
        return isinstance(value, list) and all(
            isinstance(v, inner) and not isinstance(v, bool) for v in value
        )
    return isinstance(value, _SCALARS[annotation]) and not isinstance(value, bool)


@dataclass(frozen=True)
class Message:
    """Base: a frozen dataclass of plain fields with dict (de)serialisation."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[M], data: dict[str, Any], sender: int | None = None) -> M:
        """Build and type-check; a malformed message is blamed on `sender`."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                raise SecAggProtocolError(sender, f"{cls.__name__} lacks field '{f.name}'")
            value = data[f.name]
            if isinstance(value, tuple):
                value = list(value)
            if not _matches(value, str(f.type)):
                raise SecAggProtocolError(
                    sender, f"{cls.__name__}.{f.name} must be {f.type}, got {type(value).__name__}"
                )
            values[f.name] = value
        return cls(**values)


# Stage 1: server -> each participant.
@dataclass(frozen=True)
class SetupRequest(Message):
    round_id: str  # unique per (run, round, bucket): binds keys, masks and ciphertexts
    receiver: int
    members: list[int]  # every participant of the instance, in order (bound into the keys)
    neighbours: list[int]
    threshold: int
    vector_length: int
    clip_norm: float
    scale: float
    context: str  # the application's public parameters (bound into the keys)
    server_public: bytes  # fresh X25519 key the proofs of possession answer to
    member_names: list[str]  # roster name of each member (parallel to `members`; bound into the keys)
    wire_bits: int = 32  # 16: the update travels rotated, in 16 bits (`narrow`); bound into the keys


# Stage 2: participant -> server.
@dataclass(frozen=True)
class KeysAdvert(Message):
    round_id: str
    sender: int
    s_public: bytes  # X25519, agrees pairwise mask seeds
    c_ids: list[int]  # its neighbours, in order ...
    c_publics: list[bytes]  # ... and the key it receives each one's shares on
    possession: bytes  # proof it holds the private keys of s_public and c_publics
    identity: bytes  # its card (`identity.make_card`): signing key certified by its node key, on the roster under its name ...
    signatures: list[bytes]  # ... signing, per neighbour, `identity.key_statement` of its keys for that neighbour


# Stage 3 request: server -> participant, the keys of neighbours that advertised.
@dataclass(frozen=True)
class KeysRelay(Message):
    round_id: str
    receiver: int
    ids: list[int]
    c_publics: list[bytes]  # ids[m]'s receiving key for shares from this receiver
    s_publics: list[bytes]
    identities: list[bytes]  # ids[m]'s card ...
    signatures: list[bytes]  # ... and its signature of its keys for this receiver


# Stage 3 reply: participant -> server, one ciphertext per neighbour in the relay.
@dataclass(frozen=True)
class SharesUpload(Message):
    round_id: str
    sender: int
    receivers: list[int]
    ciphertexts: list[bytes]
    b_commitment: bytes  # SHA-256 commitment to the self-mask seed, checked on recovery
    b_share_commitments: list[bytes]  # per receiver: commitment to the b-share dealt to it
    s_share_commitments: list[bytes]  # per receiver: commitment to the s-share dealt to it
    signatures: list[bytes]  # per receiver: `identity.bundle_statement` of its ciphertext and commitments, signed


# Stage 4 request: server -> participant, the ciphertexts addressed to it.
@dataclass(frozen=True)
class SharesRelay(Message):
    round_id: str
    receiver: int
    senders: list[int]
    ciphertexts: list[bytes]
    b_share_commitments: list[bytes]  # what each sender committed to for this receiver
    s_share_commitments: list[bytes]
    signatures: list[bytes]  # each sender's signature of its bundle for this receiver (`identity.bundle_statement`)


# Stage 4 reply: participant -> server.
@dataclass(frozen=True)
class MaskedInput(Message):
    round_id: str
    sender: int
    masked: np.ndarray  # uint32, length vector_length + 1 (the last word counts members); 16-bit wire: `narrow.pack`
    accused: list[int]  # senders whose share bundle did not open or match its commitments ...
    revealed_keys: list[bytes]  # ... and the receiving private key that opens each one


# Stage 5 request: server -> participant whose masked input arrived (ConsistencyCheck).
@dataclass(frozen=True)
class SurvivorsRequest(Message):
    round_id: str
    receiver: int
    survivors: list[int]  # every member whose masked input the server summed


# Stage 5 reply: participant -> server.
@dataclass(frozen=True)
class SurvivorsSignature(Message):
    round_id: str
    sender: int
    signature: bytes  # over `identity.survivor_statement` of the survivors it was told


# Stage 6 request: server -> participant that signed the survivor set.
@dataclass(frozen=True)
class UnmaskRequest(Message):
    round_id: str
    receiver: int
    survived: list[int]  # neighbours whose masked input arrived: reveal b-shares
    dropped: list[int]  # neighbours who masked with us but sent nothing: reveal s-shares
    signers: list[int]  # members that signed the survivor set ...
    signatures: list[bytes]  # ... their signatures: a participant reveals nothing without a majority on its own set ...
    signer_identities: list[bytes]  # ... and their cards


# Stage 6 reply: participant -> server.
@dataclass(frozen=True)
class UnmaskResponse(Message):
    round_id: str
    sender: int
    b_owners: list[int]
    b_shares: list[bytes]
    s_owners: list[int]
    s_shares: list[bytes]


@dataclass(frozen=True)
class ParticipantState(Message):
    """Everything a participant keeps between stages (secret: never leaves the client).

    Plain data so a stateless ClientApp can keep it in Flower's `context.state`; every secret
    field is emptied once the participant has answered unmask.
    """

    round_id: str
    participant_id: int
    name: str  # its roster name in this instance
    params: bytes  # digest of the instance's public parameters (crypto.params_digest)
    neighbours: list[int]
    threshold: int
    vector_length: int
    clip_norm: float
    scale: float
    stage: str  # "advertised" -> "shared" -> "masked" -> "signed" -> "unmasked" (or "aborted")
    neighbour_names: list[str]  # roster name of each neighbour (same order as `neighbours`)
    s_private: bytes
    s_public: bytes
    c_privates: list[bytes]  # receiving key per neighbour (same order as `neighbours`)
    key_ids: list[int]  # neighbours whose keys were relayed to us (stage 3)
    key_s_publics: list[bytes]
    key_cards: list[bytes]  # their cards, checked against the roster at stage 3: what their bundles are signed with
    b_seed: bytes
    own_b_share: bytes
    share_owners: list[int]  # neighbours whose valid shares we hold (stage 4)
    held_b_shares: list[bytes]
    held_s_shares: list[bytes]
    survivors: list[int]  # the survivor set it signed (stage 5)
    wire_bits: int
    members: list[int]  # every member of the instance (a 16-bit wire's cap per member depends on their number) ...
    member_names: list[str]  # ... and its roster name: whose signatures on the survivor set count
