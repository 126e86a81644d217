"""Participant side of SecAgg+ as pure functions `(state, request) -> (state, reply)`.

Follows Bonawitz et al. (CCS 2017, Fig. 4) restricted to a neighbourhood as in
Bell et al. (CCS 2020): advertise a masking key and one receiving key per neighbour
(with a proof of possession), Shamir-share the self-mask seed b and the masking key
s_sk among neighbours with a commitment to every share, upload
y = [encode(x), 1] + PRG(b) + sum_j ±PRG(s_ij) mod 2^32 (on the 16-bit wire only the low 16
bits of the update's words, `narrow`), then reveal for each
neighbour either its b-share (it survived) or its s-share (it dropped), never
both. Each bundle and its commitments are signed by the dealer (`identity.bundle_statement`);
an unsigned one was garbled in relay, and the coordinator is blamed (revealing a key for it
would open the genuine bundle the relay kept). A signed bundle that does not open is not fatal:
the participant masks anyway and accuses the sender, revealing the one receiving key that lets
the server check the accusation (see `crypto`). State is a plain `ParticipantState` so a stateless
Flower ClientApp can keep it in `context.state` between messages; its secrets are
erased once unmask is answered.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from cryptography.exceptions import InvalidTag

from . import crypto, shamir
from .errors import SecAggAbort, SecAggCoordinatorFault, SecAggProtocolError
from .identity import Identity, bundle_statement, check_signed, checked_before, key_statement, verify
from .fixedpoint import encode
from .guards import check_ids, expect
from .messages import (
    KeysAdvert,
    KeysRelay,
    MaskedInput,
    ParticipantState,
    SetupRequest,
    SharesRelay,
    SharesUpload,
)
from .narrow import narrowing, pack
from .prg import SEED_BYTES, apply_mask
from .reveal import erase_secrets, sign_survivors, unmask

__all__ = ["erase_secrets", "mask_input", "open_bundle", "setup", "share_keys", "sign_survivors", "unmask"]

BUNDLE_BYTES = 2 * shamir.SHARE_BYTES  # b-share || s-share


def x_coord(participant: int) -> int:
    """Shamir x coordinate of a participant (ids are >= 0, x must be non-zero)."""
    return participant + 1


def mask_sign(me: int, other: int) -> int:
    """+1 if `me` adds PRG(s_ij), -1 if it subtracts: the pair's masks cancel in the sum."""
    return 1 if me < other else -1


def request_params(request: SetupRequest) -> bytes:
    """Digest of the public parameters a setup request fixes (both sides compute it)."""
    return crypto.params_digest(
        request.round_id,
        request.members,
        request.threshold,
        request.vector_length,
        request.clip_norm,
        request.scale,
        request.wire_bits,
        request.context,
        request.member_names,
    )


def open_bundle(
    params: bytes,
    receiver_private: bytes,
    blob: bytes,
    sender: int,
    receiver: int,
    sender_s_public: bytes,
    b_commitment: bytes,
    s_commitment: bytes,
) -> tuple[bytes, bytes]:
    """Decrypt one share bundle and check it against the sender's commitments.

    Pure, so the server runs exactly the receiver's check when it judges an accusation.
    Raises ValueError saying what is wrong.
    """
    try:
        bundle = crypto.open_sealed(receiver_private, blob, params, sender, receiver, sender_s_public)
    except InvalidTag:
        raise ValueError("share ciphertext failed authentication") from None
    if len(bundle) != BUNDLE_BYTES:
        raise ValueError(f"share bundle is {len(bundle)} bytes, expected {BUNDLE_BYTES}")
    b_share, s_share = bundle[: shamir.SHARE_BYTES], bundle[shamir.SHARE_BYTES :]
    if crypto.commit_share(params, sender, receiver, b"b", b_share) != b_commitment or crypto.commit_share(
        params, sender, receiver, b"s", s_share
    ) != s_commitment:
        raise ValueError("shares do not match the sender's commitments")
    return b_share, s_share


def _check_roster(request: SetupRequest, identity: Identity) -> None:
    """Every member a distinct roster member, this one under its own name: the coordinator cannot
    add a member of its own (a Sybil) or make this participant sign for someone else."""
    names, me = request.member_names, request.receiver
    if len(names) != len(request.members) or len(set(names)) != len(names):
        raise SecAggProtocolError(None, f"member_names must name each of the {len(request.members)} members once, got {names}")
    strangers = sorted(set(names) - set(identity.roster.members))
    mine = names[request.members.index(me)]
    if strangers or mine != identity.name:
        what = f"members {strangers} are not on this site's roster" if strangers else f"names this participant {mine!r}, not {identity.name!r}"
        raise SecAggCoordinatorFault(
            f"instance {request.round_id!r} {what}; refusing to take part",
            {"round_id": request.round_id, "member_names": list(names), "not_on_roster": strangers, "named_as": mine},
        )


def setup(request: SetupRequest, identity: Identity) -> tuple[ParticipantState, KeysAdvert]:
    """Stage 1->2: check the round parameters and roster, make the keys, advertise them signed and with a proof."""
    me, k, t = request.receiver, len(request.neighbours), request.threshold
    check_ids(request.members, "members")
    check_ids(request.neighbours, "neighbours")
    if me in request.neighbours or me not in request.members:
        raise SecAggProtocolError(None, f"participant {me} is its own neighbour or not a member")
    _check_roster(request, identity)
    if not set(request.neighbours) <= set(request.members):
        raise SecAggProtocolError(None, "neighbours must be members of the instance")
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
    params = request_params(request)
    try:
        narrowing(request.wire_bits, request.vector_length, len(request.members), params)
    except ValueError as err:
        raise SecAggProtocolError(None, f"refused the wire: {err}") from None
    s_private, s_public = crypto.generate_keypair()
    receiving = [crypto.generate_keypair() for _ in request.neighbours]
    try:
        proof = crypto.possession_proof(
            [s_private, *(c for c, _ in receiving)], request.server_public, params, me
        )
    except ValueError as err:
        raise SecAggProtocolError(None, f"server key refused: {err}") from None
    state = ParticipantState(
        round_id=request.round_id,
        participant_id=me,
        name=identity.name,
        params=params,
        neighbours=list(request.neighbours),
        threshold=t,
        vector_length=request.vector_length,
        clip_norm=float(request.clip_norm),
        scale=float(request.scale),
        stage="advertised",
        neighbour_names=[request.member_names[request.members.index(j)] for j in request.neighbours],
        members=list(request.members),
        member_names=list(request.member_names),
        s_private=s_private,
        s_public=s_public,
        c_privates=[c for c, _ in receiving],
        key_ids=[],
        key_s_publics=[],
        key_cards=[],
        b_seed=b"",
        own_b_share=b"",
        share_owners=[],
        held_b_shares=[],
        held_s_shares=[],
        survivors=[],
        wire_bits=request.wire_bits,
    )
    signatures = [
        identity.sign(key_statement(params, me, j, s_public, c_public))
        for j, (_, c_public) in zip(request.neighbours, receiving, strict=True)
    ]
    advert = KeysAdvert(
        request.round_id, me, s_public, list(request.neighbours), [p for _, p in receiving], proof,
        identity.card, signatures,
    )
    return state, advert


def _check_signed_keys(state: ParticipantState, relay: KeysRelay, identity: Identity) -> None:
    """Each relayed key signed by its owner's roster key for this instance and this receiver.

    Anything else was put there by the relay (the server checks signatures before relaying), so
    it is the coordinator's fault, with the relayed key, identity and signature as evidence.
    """
    me = state.participant_id
    for j, c_pub, s_pub, ident, sig in zip(relay.ids, relay.c_publics, relay.s_publics, relay.identities, relay.signatures, strict=True):
        name = state.neighbour_names[state.neighbours.index(j)]
        fault = check_signed(identity.roster, name, ident, sig, key_statement(state.params, j, me, s_pub, c_pub), identity.known)
        if fault:
            raise SecAggCoordinatorFault(
                f"relayed keys of participant {j} ({name!r}) to {me} that {name!r} did not sign: {fault}",
                {
                    "round_id": state.round_id, "params": state.params.hex(), "owner": j, "owner_name": name,
                    "roster_fingerprint": identity.roster.members.get(name, ""), "s_public": s_pub.hex(),
                    "c_public": c_pub.hex(), "card": ident.hex(), "signature": sig.hex(),
                },
            )


def _check_relayed_keys(state: ParticipantState, relay: KeysRelay) -> None:
    """Every relayed key well-formed and distinct from every other and from ours (blames its owner)."""
    me = state.participant_id
    own = {state.s_public, *(crypto.public_from_private(c) for c in state.c_privates)}
    seen: set[bytes] = set()
    for j, c_pub, s_pub in zip(relay.ids, relay.c_publics, relay.s_publics, strict=True):
        for key in (c_pub, s_pub):
            try:
                crypto.check_public_key(key)
            except ValueError as err:
                raise SecAggProtocolError(j, f"relayed key refused by {me}: {err}") from None
            if key in own or key in seen:
                raise SecAggProtocolError(j, f"relayed a key that is not distinct (seen by {me})")
            seen.add(key)


def _check_signed_bundles(state: ParticipantState, relay: SharesRelay) -> None:
    """Each relayed bundle and its commitments signed by its sender's card (checked against the roster at
    stage 3) under the masking key relayed then. Anything else was put there by the relay, which must
    not make this participant accuse the sender: the receiving key it would reveal opens the genuine
    bundle the relay kept. The coordinator is blamed, with the relayed bundle as evidence."""
    me = state.participant_id
    cards = checked_before(state.key_cards)
    for j, blob, b_commit, s_commit, signature in zip(
        relay.senders, relay.ciphertexts, relay.b_share_commitments, relay.s_share_commitments, relay.signatures, strict=True
    ):
        at, receiving = state.key_ids.index(j), crypto.public_from_private(state.c_privates[state.neighbours.index(j)])
        statement = bundle_statement(state.params, j, me, state.key_s_publics[at], receiving, blob, b_commit, s_commit)
        try:
            verify(cards[state.key_cards[at]], signature, statement)
        except ValueError as err:
            name = state.neighbour_names[state.neighbours.index(j)]
            raise SecAggCoordinatorFault(
                f"relayed a share bundle of participant {j} ({name!r}) to {me} that {name!r} did not sign: {err}",
                {
                    "round_id": state.round_id, "params": state.params.hex(), "owner": j, "owner_name": name,
                    "ciphertext": blob.hex(), "b_share_commitment": b_commit.hex(), "s_share_commitment": s_commit.hex(),
                    "signature": signature.hex(), "card": state.key_cards[at].hex(),
                },
            ) from None


def share_keys(state: ParticipantState, relay: KeysRelay, identity: Identity) -> tuple[ParticipantState, SharesUpload]:
    """Stage 3: check the neighbours' signed keys, draw b, Shamir-share b and s_sk over self +
    neighbours, seal per neighbour."""
    expect(state, "advertised", relay.round_id, relay.receiver)
    me, t = state.participant_id, state.threshold
    ids = relay.ids
    if not len(ids) == len(relay.c_publics) == len(relay.s_publics) == len(relay.identities) == len(relay.signatures):
        raise SecAggProtocolError(None, "key relay lists have different lengths")
    check_ids(ids, "relayed key owners")
    unknown = sorted(set(ids) - set(state.neighbours))
    if unknown:
        raise SecAggProtocolError(unknown[0], f"keys relayed to {me} but {unknown[0]} is not its neighbour")
    _check_signed_keys(state, relay, identity)
    _check_relayed_keys(state, relay)  # signed by their owner: a bad or copied key is the owner's fault
    if len(ids) + 1 < t:
        raise SecAggAbort(f"participant {me}: only {len(ids)} neighbours left, threshold is {t}")
    b_seed = os.urandom(SEED_BYTES)
    holders = [x_coord(h) for h in [me, *ids]]
    b_shares = shamir.split(b_seed, t, holders)
    s_shares = shamir.split(state.s_private, t, holders)
    ciphertexts, b_commits, s_commits, signatures = [], [], [], []
    for j, c_pub in zip(ids, relay.c_publics, strict=True):
        b_share, s_share = b_shares[x_coord(j)], s_shares[x_coord(j)]
        try:
            ciphertexts.append(crypto.seal_bundle(c_pub, b_share + s_share, state.params, me, j, state.s_public))
        except ValueError as err:
            raise SecAggProtocolError(j, f"receiving key refused by {me}: {err}") from None
        b_commits.append(crypto.commit_share(state.params, me, j, b"b", b_share))
        s_commits.append(crypto.commit_share(state.params, me, j, b"s", s_share))
        signatures.append(identity.sign(bundle_statement(state.params, me, j, state.s_public, c_pub, ciphertexts[-1], b_commits[-1], s_commits[-1])))
    new = dataclasses.replace(
        state,
        stage="shared",
        key_ids=list(ids),
        key_s_publics=list(relay.s_publics),
        key_cards=list(relay.identities),
        b_seed=b_seed,
        own_b_share=b_shares[x_coord(me)],
    )
    commitment = crypto.commit_seed(state.params, me, b_seed)
    return new, SharesUpload(state.round_id, me, list(ids), ciphertexts, commitment, b_commits, s_commits, signatures)


def mask_input(
    state: ParticipantState,
    relay: SharesRelay,
    vector: np.ndarray,
    rounding_key: bytes | None = None,
    clip_norm: float | None = None,
    noise: np.ndarray | None = None,
) -> tuple[ParticipantState, MaskedInput]:
    """Stage 4: keep neighbours' shares, upload y = [encode(x) + noise, 1] + PRG(b) + sum_j ±PRG(s_ij).

    A bundle that does not open (or does not match its commitments) is left out and its sender
    accused, with the receiving key that opens just that bundle as evidence. `rounding_key`
    keys the stochastic rounding; by default it is fresh from the OS CSPRNG, so nobody can
    recompute the rounding (a fixed key is for reproducible simulations only). `clip_norm`
    defaults to the instance's; only a simulated attacker passes more (`widest_clip`).
    `noise` (integers, one per input coordinate) is added to the encoding mod 2^32 before
    masking: a participant's share of distributed DP noise, which the sum then carries (32-bit
    wire only: on the 16-bit wire it would not fit the range, `fedlora.secagg.plan`).
    """
    expect(state, "shared", relay.round_id, relay.receiver)
    me, senders = state.participant_id, relay.senders
    if not len(senders) == len(relay.ciphertexts) == len(relay.b_share_commitments) == len(relay.s_share_commitments) == len(relay.signatures):
        raise SecAggProtocolError(None, "share relay lists have different lengths")
    check_ids(senders, "share senders")
    unknown = sorted(set(senders) - set(state.key_ids))
    if unknown:
        raise SecAggProtocolError(
            unknown[0], f"shares relayed to {me} from a sender whose keys it never received"
        )
    if len(senders) + 1 < state.threshold:
        raise SecAggAbort(
            f"participant {me}: only {len(senders)} neighbours shared keys, "
            f"threshold is {state.threshold}"
        )
    vec = np.asarray(vector)
    if vec.shape != (state.vector_length,):
        raise ValueError(
            f"update has shape {vec.shape}, the round expects ({state.vector_length},)"
        )
    if noise is not None and (np.shape(noise) != (state.vector_length,) or not np.issubdtype(np.asarray(noise).dtype, np.integer)):
        raise ValueError(f"noise must be {state.vector_length} integers, got {np.asarray(noise).dtype} {np.shape(noise)}")
    narrow = narrowing(state.wire_bits, state.vector_length, len(state.members), state.params)
    if noise is not None and narrow is not None:
        raise ValueError("distributed DP noise does not fit the 16-bit wire; use secagg.wire_bits=32")
    _check_signed_bundles(state, relay)  # before a bundle that does not open can make it accuse anyone
    owners, held_b, held_s, accused, revealed = [], [], [], [], []
    for j, blob, b_commit, s_commit in zip(
        senders, relay.ciphertexts, relay.b_share_commitments, relay.s_share_commitments, strict=True
    ):
        receiving = state.c_privates[state.neighbours.index(j)]
        s_pub = state.key_s_publics[state.key_ids.index(j)]
        try:
            b_share, s_share = open_bundle(state.params, receiving, blob, j, me, s_pub, b_commit, s_commit)
        except ValueError:
            accused.append(j)
            revealed.append(receiving)
            continue
        owners.append(j)
        held_b.append(b_share)
        held_s.append(s_share)
    masked = np.empty(state.vector_length + 1, dtype=np.uint32)
    bound = state.clip_norm if clip_norm is None else clip_norm
    masked[:-1] = encode(vec, bound, state.scale, rounding_key or os.urandom(SEED_BYTES), narrow)
    if noise is not None:  # two's complement: adding the low 32 bits is adding the integer mod 2^32
        masked[:-1] += np.bitwise_and(np.asarray(noise, dtype=np.int64), 0xFFFFFFFF).astype(np.uint32)
    masked[-1] = 1  # the count slot: the unmasked sum must equal the number of members in it
    apply_mask(masked, state.b_seed, 1)
    for j in senders:
        s_pub = state.key_s_publics[state.key_ids.index(j)]
        apply_mask(masked, crypto.pairwise_seed(state.s_private, s_pub, state.params), mask_sign(me, j))
    new = dataclasses.replace(
        state, stage="masked", share_owners=owners, held_b_shares=held_b, held_s_shares=held_s
    )
    return new, MaskedInput(state.round_id, me, pack(masked, narrow), accused, revealed)
