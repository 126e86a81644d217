"""Participant side of SecAgg+ as pure functions `(state, request) -> (state, reply)`.

Follows Bonawitz et al. (CCS 2017, Fig. 4) restricted to a neighbourhood as in
Bell et al. (CCS 2020): advertise two X25519 keys, Shamir-share the self-mask
seed b and the masking key s_sk among neighbours, upload
y = encode(x) + PRG(b) + sum_j ±PRG(s_ij) mod 2^32, then reveal for each
neighbour either its b-share (it survived) or its s-share (it dropped), never
both. State is a plain `ParticipantState` so a stateless Flower ClientApp can
keep it in `context.state` between messages.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from cryptography.exceptions import InvalidTag

from . import crypto, shamir
from .errors import SecAggAbort, SecAggProtocolError
from .fixedpoint import encode
from .messages import (
    KeysAdvert,
    KeysRelay,
    MaskedInput,
    ParticipantState,
    SetupRequest,
    SharesRelay,
    SharesUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from .prg import SEED_BYTES, apply_mask

BUNDLE_BYTES = 32 + 2 * shamir.SHARE_BYTES  # keys digest || b-share || s-share


def x_coord(participant: int) -> int:
    """Shamir x coordinate of a participant (ids are >= 0, x must be non-zero)."""
    return participant + 1


def mask_sign(me: int, other: int) -> int:
    """+1 if `me` adds PRG(s_ij), -1 if it subtracts: the pair's masks cancel in the sum."""
    return 1 if me < other else -1


def _check_ids(ids: list[int], what: str) -> None:
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise SecAggProtocolError(None, f"{what} must be distinct non-negative ids, got {ids}")


def _expect(state: ParticipantState, stage: str, round_id: str, receiver: int) -> None:
    if round_id != state.round_id or receiver != state.participant_id:
        raise SecAggProtocolError(
            None,
            f"request for round {round_id!r}/participant {receiver} reached participant "
            f"{state.participant_id} in round {state.round_id!r}",
        )
    if state.stage != stage:
        raise SecAggProtocolError(
            None, f"participant {state.participant_id} is at stage {state.stage!r}, not {stage!r}"
        )


def setup(request: SetupRequest) -> tuple[ParticipantState, KeysAdvert]:
    """Stage 1->2: check the round parameters, make key pairs c and s, advertise them."""
    me, k, t = request.receiver, len(request.neighbours), request.threshold
    _check_ids(request.neighbours, "neighbours")
    if me in request.neighbours:
        raise SecAggProtocolError(None, f"participant {me} is listed as its own neighbour")
    if not (k + 1) // 2 < t <= k + 1:
        # A threshold at or below half the neighbourhood lets a server collect both
        # shares of someone from two disjoint halves: refuse to take part.
        raise SecAggProtocolError(
            None,
            f"threshold {t} is insecure or unreachable for {k} neighbours: "
            f"need {(k + 1) // 2 + 1}..{k + 1}",
        )
    if request.vector_length < 1 or not request.scale > 0 or not request.clip_norm > 0:
        raise SecAggProtocolError(None, "vector_length, scale and clip_norm must be positive")
    c_private, c_public = crypto.generate_keypair()
    s_private, s_public = crypto.generate_keypair()
    state = ParticipantState(
        round_id=request.round_id,
        participant_id=me,
        neighbours=sorted(request.neighbours),
        threshold=t,
        vector_length=request.vector_length,
        clip_norm=float(request.clip_norm),
        scale=float(request.scale),
        stage="advertised",
        c_private=c_private,
        s_private=s_private,
        c_public=c_public,
        s_public=s_public,
        key_ids=[],
        key_c_publics=[],
        key_s_publics=[],
        b_seed=b"",
        own_b_share=b"",
        own_s_share=b"",
        share_owners=[],
        held_b_shares=[],
        held_s_shares=[],
    )
    return state, KeysAdvert(request.round_id, me, c_public, s_public)


def share_keys(state: ParticipantState, relay: KeysRelay) -> tuple[ParticipantState, SharesUpload]:
    """Stage 3: draw b, Shamir-share b and s_sk over self + neighbours, encrypt per neighbour."""
    _expect(state, "advertised", relay.round_id, relay.receiver)
    me, t = state.participant_id, state.threshold
    ids = relay.ids
    if not len(ids) == len(relay.c_publics) == len(relay.s_publics):
        raise SecAggProtocolError(None, "key relay lists have different lengths")
    _check_ids(ids, "relayed key owners")
    for j, c_pub, s_pub in zip(ids, relay.c_publics, relay.s_publics, strict=True):
        if j not in state.neighbours:
            raise SecAggProtocolError(j, f"keys relayed to {me} but {j} is not its neighbour")
        if len(c_pub) != crypto.KEY_BYTES or len(s_pub) != crypto.KEY_BYTES:
            raise SecAggProtocolError(j, "public keys must be 32 bytes")
        if s_pub == state.s_public or c_pub == state.c_public:
            raise SecAggProtocolError(j, f"advertised participant {me}'s own public key")
    if len(ids) + 1 < t:
        raise SecAggAbort(f"participant {me}: only {len(ids)} neighbours left, threshold is {t}")
    b_seed = os.urandom(SEED_BYTES)
    holders = [x_coord(h) for h in [me, *ids]]
    b_shares = shamir.split(b_seed, t, holders)
    s_shares = shamir.split(state.s_private, t, holders)
    digest = crypto.keys_digest(state.c_public, state.s_public)
    ciphertexts = []
    for j, c_pub in zip(ids, relay.c_publics, strict=True):
        bundle = digest + b_shares[x_coord(j)] + s_shares[x_coord(j)]
        key = crypto.share_key(state.c_private, c_pub, state.round_id)
        ciphertexts.append(
            crypto.encrypt(key, bundle, crypto.associated_data(state.round_id, me, j))
        )
    new = dataclasses.replace(
        state,
        stage="shared",
        key_ids=list(ids),
        key_c_publics=list(relay.c_publics),
        key_s_publics=list(relay.s_publics),
        b_seed=b_seed,
        own_b_share=b_shares[x_coord(me)],
        own_s_share=s_shares[x_coord(me)],
    )
    commitment = crypto.commit_seed(state.round_id, me, b_seed)
    return new, SharesUpload(state.round_id, me, list(ids), ciphertexts, commitment)


def _open_bundle(state: ParticipantState, sender: int, blob: bytes) -> tuple[bytes, bytes]:
    """Decrypt and check one neighbour's share bundle; blame `sender` for any defect."""
    me = state.participant_id
    if sender not in state.key_ids:
        raise SecAggProtocolError(
            sender, f"shares relayed to {me} from a sender whose keys it never received"
        )
    pos = state.key_ids.index(sender)
    c_pub, s_pub = state.key_c_publics[pos], state.key_s_publics[pos]
    key = crypto.share_key(state.c_private, c_pub, state.round_id)
    try:
        bundle = crypto.decrypt(key, blob, crypto.associated_data(state.round_id, sender, me))
    except (InvalidTag, ValueError):
        raise SecAggProtocolError(
            sender,
            f"share ciphertext to {me} failed authentication "
            "(tampered, or replayed from another pair or round)",
        ) from None
    if len(bundle) != BUNDLE_BYTES:
        raise SecAggProtocolError(
            sender, f"share bundle is {len(bundle)} bytes, expected {BUNDLE_BYTES}"
        )
    if bundle[:32] != crypto.keys_digest(c_pub, s_pub):
        raise SecAggProtocolError(
            sender, f"share bundle names keys that {me} did not receive for it"
        )
    return bundle[32 : 32 + shamir.SHARE_BYTES], bundle[32 + shamir.SHARE_BYTES :]


def mask_input(
    state: ParticipantState, relay: SharesRelay, vector: np.ndarray, rng: np.random.Generator
) -> tuple[ParticipantState, MaskedInput]:
    """Stage 4: store neighbours' shares, upload y = encode(x) + PRG(b) + sum_j ±PRG(s_ij)."""
    _expect(state, "shared", relay.round_id, relay.receiver)
    me, senders = state.participant_id, relay.senders
    if len(senders) != len(relay.ciphertexts):
        raise SecAggProtocolError(None, "share relay lists have different lengths")
    _check_ids(senders, "share senders")
    if len(senders) + 1 < state.threshold:
        raise SecAggAbort(
            f"participant {me}: only {len(senders)} neighbours shared keys, "
            f"threshold is {state.threshold}"
        )
    pairs = zip(senders, relay.ciphertexts, strict=True)
    opened = [_open_bundle(state, j, blob) for j, blob in pairs]
    vec = np.asarray(vector)
    if vec.shape != (state.vector_length,):
        raise ValueError(
            f"update has shape {vec.shape}, the round expects ({state.vector_length},)"
        )
    masked = encode(vec, state.clip_norm, state.scale, rng)
    apply_mask(masked, state.b_seed, 1)
    for j in senders:
        s_pub = state.key_s_publics[state.key_ids.index(j)]
        apply_mask(
            masked, crypto.pairwise_seed(state.s_private, s_pub, state.round_id), mask_sign(me, j)
        )
    new = dataclasses.replace(
        state,
        stage="masked",
        share_owners=list(senders),
        held_b_shares=[b for b, _ in opened],
        held_s_shares=[s for _, s in opened],
    )
    return new, MaskedInput(state.round_id, me, masked)


def unmask(
    state: ParticipantState, request: UnmaskRequest
) -> tuple[ParticipantState, UnmaskResponse]:
    """Stage 5: b-shares of survivors (and own), s-shares of dropped; never both for one."""
    me = state.participant_id
    if state.stage == "unmasked":
        raise SecAggProtocolError(
            None, f"participant {me} already answered an unmask request; refusing a second"
        )
    _expect(state, "masked", request.round_id, request.receiver)
    survived = [j for j in request.survived if j != me]
    _check_ids(survived, "survivors")
    _check_ids(request.dropped, "dropped")
    both = sorted(set(survived) & set(request.dropped))
    if both or me in request.dropped:
        j = both[0] if both else me
        raise SecAggProtocolError(
            j, f"server asked {me} for both the self-mask and the key share of {j}; refusing"
        )
    unknown = sorted(set(survived + request.dropped) - set(state.share_owners))
    if unknown:
        raise SecAggProtocolError(unknown[0], f"participant {me} holds no shares of {unknown[0]}")
    if len(survived) + 1 < state.threshold:
        raise SecAggAbort(
            f"participant {me}: only {len(survived)} neighbours survived, "
            f"threshold is {state.threshold}"
        )
    pos = {j: i for i, j in enumerate(state.share_owners)}
    response = UnmaskResponse(
        round_id=state.round_id,
        sender=me,
        b_owners=[me, *survived],
        b_shares=[state.own_b_share] + [state.held_b_shares[pos[j]] for j in survived],
        s_owners=list(request.dropped),
        s_shares=[state.held_s_shares[pos[j]] for j in request.dropped],
    )
    # Forget secrets no longer needed; the stage mark makes any later request fail.
    done = dataclasses.replace(state, stage="unmasked", b_seed=b"", s_private=b"", c_private=b"")
    return done, response
