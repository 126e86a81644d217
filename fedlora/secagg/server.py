"""Server side of SecAgg+: validate, relay, judge accusations, and finally unmask the sum.

One `SecAggServer` runs one instance (one bucket of one round): Bonawitz et al. (CCS 2017)
stages over the sparse graph of Bell et al. (CCS 2020). Each `collect_*` method takes the
replies that arrived for a stage and returns the requests for the next one. A participant
that sends something invalid is *blamed* (`blamed`: id -> reason) and treated like one that
dropped out at that stage, so one malicious participant cannot stop a bucket on its own:

- keys: non-canonical, low-order or unproved keys, and any key advertised twice (only a
  holder of the private key can prove possession, so everyone sharing a key is guilty);
- shares: uploads not addressed to exactly the relayed neighbours, or malformed;
- masked inputs: an accusation is judged by opening the accused bundle with the revealed
  receiving key, exactly as the accuser did; whoever is wrong is blamed;
- consistency: a survivor's signature on the survivor set that does not verify;
- unmask: a revealed share that does not match its owner's commitment convicts its holder;
  shares that match but lie off one polynomial (found by Berlekamp-Welch decoding over all
  shares received) convict the owner, who dealt them.

Fewer than `threshold` live holders of a secret that must be recovered raises `SecAggAbort`
before any share is revealed. After unmasking, the count slot (each member adds 1) must equal
the number of members summed: members given different public parameters derive unrelated
masks, and the sum is refused instead of revealing anything. On the 16-bit wire (`narrow`) a
masked input must be exactly `narrow.pack`'s uint16 layout, or its sender is blamed; the sum is
kept in uint32 as on the 32-bit wire and narrowed only once unmasked.

The server need not be trusted to relay honestly: every advertised key is signed with its
owner's long-term identity (`identity`), which participants check against their own roster; the
server checks the signatures too (and the roster, when it is given one), so that it never relays
what an honest participant would refuse and blame on it. Before any share is revealed, every
survivor signs the survivor set (ConsistencyCheck, Bonawitz et al. round 4; `reveal`), and the
server relays to each every member's signature, which must come from a majority of the members.
See docs/threat-model.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from . import crypto, shamir
from .errors import SecAggAbort
from .fixedpoint import check_no_overflow, choose_scale, decode, error_bound
from .graph import check_ids, communication_graph, default_degree, default_threshold
from .identity import Card, Roster, bundle_statement, key_statement, open_card, survivor_statement, verify
from .messages import (
    KeysAdvert,
    KeysRelay,
    MaskedInput,
    SetupRequest,
    SharesRelay,
    SharesUpload,
    SurvivorsRequest,
    SurvivorsSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from .narrow import Narrow, add_packed, narrowed, narrowing, wire_shape
from .participant import BUNDLE_BYTES, mask_sign, open_bundle, x_coord
from .prg import apply_mask
from .rotation import rotated_bound

log = logging.getLogger("fedlora.secagg")
CIPHERTEXT_BYTES = crypto.KEY_BYTES + crypto.NONCE_BYTES + BUNDLE_BYTES + crypto.TAG_BYTES
_DIGEST_BYTES = 32
_KNOWN_CARDS: dict[bytes, Card] = {}  # cards whose certificate this process checked (`identity.open_card`)


@dataclass(frozen=True)
class SumResult:
    """Decoded sum of the survivors' clipped inputs."""

    total: np.ndarray  # float32, length vector_length
    sum_u32: np.ndarray  # the unmasked sum in Z_{2^32} (without the count slot; narrow words as int16), for re-decoding
    count: int
    survivors: list[int]
    dropped: list[int]
    scale: float
    # Per coordinate, before float32 rounding of `total`. On the 16-bit wire it holds for the
    # rotated narrow coordinates; rotated back, sqrt(vector_length) times it bounds the L2 error.
    error_bound: float
    blamed: dict[int, str] = field(default_factory=dict)  # protocol violations, by participant
    narrow: Narrow | None = None  # the 16-bit wire's narrowing, for re-decoding (`decode`)


class _Reply(Protocol):
    @property
    def round_id(self) -> str: ...
    @property
    def sender(self) -> int: ...


R = TypeVar("R", bound=_Reply)


class SecAggServer:
    """State machine of one secure-aggregation instance, stage by stage.

    Call `setup`, `collect_keys`, `collect_shares`, `collect_masked`, `collect_signatures`,
    `collect_unmask` in order, each with the replies that arrived in time. After `SecAggAbort` the instance is
    spent; a new one needs a new round_id (participants mask at most once per round anyway).
    """

    def __init__(
        self,
        round_id: str,
        participant_ids: list[int],
        vector_length: int,
        clip_norm: float,
        *,
        degree: int | None = None,
        threshold: int | None = None,
        scale: float | None = None,
        graph_seed: bytes | int | None = None,
        context: str = "",
        wire_bits: int = 32,
        names: list[str] | None = None,
        roster: Roster | None = None,
    ) -> None:
        ids = check_ids(list(participant_ids))
        n = len(ids)
        names = [f"participant-{i}" for i in ids] if names is None else list(names)
        if len(names) != n or len(set(names)) != n:
            raise ValueError(f"names must name each of the {n} participants once, got {names}")
        if n < 2 or vector_length < 1:
            raise ValueError(
                f"need >= 2 participants and vector_length >= 1, got {n}, {vector_length}"
            )
        k = min(n - 1, default_degree(n) if degree is None else degree)
        t = default_threshold(k) if threshold is None else threshold
        if not (k + 1) // 2 < t <= k + 1:
            raise ValueError(
                f"threshold {t} must be in [{(k + 1) // 2 + 1}, {k + 1}] for degree {k}: "
                "at or below half the neighbourhood a server could learn both shares of someone"
            )
        if scale is None:  # the 16-bit wire: n rotated, clipped coordinates fit 16 bits (`narrow`)
            scale = choose_scale(clip_norm, n) if wire_bits == 32 else choose_scale(rotated_bound(clip_norm, vector_length - 1), n, 16)
        check_no_overflow(clip_norm, n, scale)
        self.round_id, self.ids, self.d, self.context = round_id, ids, vector_length, context
        self.clip_norm, self.scale = float(clip_norm), float(scale)
        self.threshold, self.degree = t, k
        seed = round_id.encode() if graph_seed is None else graph_seed
        self.graph = communication_graph(ids, k, seed)
        self.names, self.roster = names, roster
        self.params = crypto.params_digest(
            round_id, ids, t, vector_length, self.clip_norm, self.scale, wire_bits, context, names
        )
        self.wire_bits, self.narrow = wire_bits, narrowing(wire_bits, vector_length, n, self.params)
        self._server_private, self._server_public = crypto.generate_keypair()
        self.stage = "setup"
        self.blamed: dict[int, str] = {}
        self.s_publics: dict[int, bytes] = {}
        self.receiving: dict[tuple[int, int], bytes] = {}  # (holder, sender) -> holder's key
        self.identities: dict[int, bytes] = {}  # id -> its card
        self.cards: dict[int, Card] = {}  # id -> its card, opened
        self.bundle_signatures: dict[tuple[int, int], bytes] = {}  # (sender, receiver) -> its signature of that bundle
        self.key_signatures: dict[tuple[int, int], bytes] = {}  # (owner, receiver) -> owner's signature
        self.key_relay: dict[int, list[int]] = {}  # id -> neighbours whose keys it got (U1)
        self.relayed: dict[int, list[int]] = {}  # id -> neighbours whose shares it got (U2)
        self.boxes: dict[tuple[int, int], tuple[bytes, bytes, bytes]] = {}  # (from, to) -> ct, commits
        self.commitments: dict[int, bytes] = {}
        self.lacking: set[tuple[int, int]] = set()  # (holder, owner): holder has no valid shares
        self.total = np.zeros(0, dtype=np.uint32)
        self.u3: set[int] = set()
        self.holding: set[int] = set()  # survivors that will be asked for shares
        self.asked: dict[int, UnmaskRequest] = {}

    # --- bookkeeping ----------------------------------------------------------------
    def _advance(self, expected: str, nxt: str) -> None:
        if self.stage != expected:
            raise RuntimeError(f"SecAggServer is at stage {self.stage!r}, cannot run {expected!r}")
        self.stage = nxt

    def blame(self, participant: int, reason: str) -> None:
        """Book a protocol violation on `participant` (the first reason is kept)."""
        if participant not in self.blamed:
            log.warning("%s: participant %d blamed: %s", self.round_id, participant, reason)
            self.blamed[participant] = reason

    def _accept(self, replies: list[R], allowed: set[int], stage: str) -> dict[int, R]:
        """Replies from expected senders, one each; anything else is blamed and ignored."""
        counts = Counter(msg.sender for msg in replies)
        accepted = {}
        for msg in replies:
            i = msg.sender
            if counts[i] > 1:
                self.blame(i, f"sent {counts[i]} replies at {stage}")
            elif msg.round_id != self.round_id:
                self.blame(i, f"reply for round {msg.round_id!r} at {stage}, expected {self.round_id!r}")
            elif i not in allowed:
                self.blame(i, f"unexpected reply at {stage}")
            else:
                accepted[i] = msg
        return accepted

    def _prune(self, alive: set[int], stage: str) -> set[int]:
        """Drop members with < t-1 live neighbours: their secrets could not be recovered."""
        replied = len(alive)
        while True:
            weak = {i for i in alive if len(alive.intersection(self.graph[i])) + 1 < self.threshold}
            if not weak:
                break
            alive -= weak
        if len(alive) < self.threshold:
            raise SecAggAbort(
                f"round {self.round_id}: {replied} participants answered at {stage}, {len(alive)} "
                f"of them with enough live neighbours; threshold is {self.threshold}"
            )
        return alive

    # --- stages ---------------------------------------------------------------------
    def setup(self) -> list[SetupRequest]:
        """Stage 1: one request per participant with its neighbours and the public parameters."""
        self._advance("setup", "keys")
        return [
            SetupRequest(
                self.round_id, i, list(self.ids), self.graph[i], self.threshold, self.d,
                self.clip_norm, self.scale, self.context, self._server_public, self.names, self.wire_bits,
            )
            for i in self.ids
        ]

    def _key_fault(self, i: int, msg: KeysAdvert) -> str | None:
        if msg.c_ids != self.graph[i] or len(msg.c_publics) != len(msg.c_ids):
            return "advertised receiving keys for other participants than its neighbours"
        publics = [msg.s_public, *msg.c_publics]
        try:
            for key in publics:
                crypto.check_public_key(key)
            crypto.check_possession(self._server_private, publics, msg.possession, self.params, i)
        except ValueError as err:
            return f"advertised keys refused: {err}"
        return self._signature_fault(i, msg)

    def _signature_fault(self, i: int, msg: KeysAdvert) -> str | None:
        """Its keys signed by its card (on the roster under its name, when the server has one):
        an honest server relays nothing its neighbours would refuse and blame on it."""
        name = self.names[self.ids.index(i)]
        if len(msg.signatures) != len(msg.c_ids):
            return f"sent {len(msg.signatures)} key signatures for {len(msg.c_ids)} neighbours"
        try:
            card = open_card(msg.identity, _KNOWN_CARDS)
            if self.roster is not None and card.fingerprint != self.roster.fingerprint_of(name):
                return f"advertised identity {card.fingerprint}, not {name!r}'s roster key"
            for j, c_public, signature in zip(msg.c_ids, msg.c_publics, msg.signatures, strict=True):
                verify(card, signature, key_statement(self.params, i, j, msg.s_public, c_public))
        except (KeyError, ValueError) as err:
            return f"advertised keys not signed by its identity: {err}"
        self.cards[i] = card
        return None

    def collect_keys(self, adverts: list[KeysAdvert]) -> list[KeysRelay]:
        """Stage 2 -> 3: check keys (form, order, possession, distinctness), relay them."""
        self._advance("keys", "shares")
        valid = {}
        for i, msg in self._accept(adverts, set(self.ids), "key advertisement").items():
            fault = self._key_fault(i, msg)
            if fault:
                self.blame(i, fault)
            else:
                valid[i] = msg
        owners: dict[bytes, list[int]] = {}
        for i, msg in valid.items():
            for key in (msg.s_public, *msg.c_publics):
                owners.setdefault(key, []).append(i)
        for holders in owners.values():
            if len(holders) > 1:  # each proved possession: they share a private key
                for i in holders:
                    self.blame(i, f"advertised a key that participants {sorted(set(holders))} all hold")
        alive = self._prune(set(valid) - set(self.blamed), "key advertisement")
        for i in alive:
            self.s_publics[i], self.identities[i] = valid[i].s_public, valid[i].identity
            for j, key, signature in zip(valid[i].c_ids, valid[i].c_publics, valid[i].signatures, strict=True):
                self.receiving[(i, j)] = key
                self.key_signatures[(i, j)] = signature
        relays = []
        for i in sorted(alive):
            nbrs = [j for j in self.graph[i] if j in alive]
            self.key_relay[i] = nbrs
            relays.append(
                KeysRelay(
                    self.round_id, i, nbrs,
                    [self.receiving[(j, i)] for j in nbrs], [self.s_publics[j] for j in nbrs],
                    [self.identities[j] for j in nbrs], [self.key_signatures[(j, i)] for j in nbrs],
                )
            )
        return relays

    def _upload_fault(self, i: int, msg: SharesUpload) -> str | None:
        lists = (msg.ciphertexts, msg.b_share_commitments, msg.s_share_commitments)
        if any(len(x) != len(msg.receivers) for x in lists) or len(msg.b_commitment) != _DIGEST_BYTES:
            return "malformed share upload"
        if sorted(msg.receivers) != self.key_relay[i]:
            return f"addressed shares to {sorted(msg.receivers)}, not to its neighbours with keys {self.key_relay[i]}"
        if any(len(blob) != CIPHERTEXT_BYTES for blob in msg.ciphertexts):
            return f"share ciphertexts must be {CIPHERTEXT_BYTES} bytes"
        if any(len(c) != _DIGEST_BYTES for c in msg.b_share_commitments + msg.s_share_commitments):
            return "share commitments must be 32 bytes"
        if len(msg.signatures) != len(msg.receivers):
            return f"sent {len(msg.signatures)} bundle signatures for {len(msg.receivers)} bundles"
        for j, blob, b_c, s_c, signature in zip(
            msg.receivers, msg.ciphertexts, msg.b_share_commitments, msg.s_share_commitments, msg.signatures, strict=True
        ):
            try:  # an honest server relays nothing the receiver would refuse and blame on it
                verify(self.cards[i], signature, bundle_statement(self.params, i, j, self.s_publics[i], self.receiving[(j, i)], blob, b_c, s_c))
            except ValueError as err:
                return f"share bundle for {j} not signed by its identity: {err}"
        return None

    def collect_shares(self, uploads: list[SharesUpload]) -> list[SharesRelay]:
        """Stage 3 -> 4: check each upload is addressed to exactly its relayed neighbours, relay."""
        self._advance("shares", "masked")
        valid = set()
        for i, msg in self._accept(uploads, set(self.key_relay), "share exchange").items():
            fault = self._upload_fault(i, msg)
            if fault:
                self.blame(i, fault)
                continue
            valid.add(i)
            self.commitments[i] = msg.b_commitment
            for j, blob, b_c, s_c, signature in zip(
                msg.receivers, msg.ciphertexts, msg.b_share_commitments, msg.s_share_commitments, msg.signatures,
                strict=True,
            ):
                self.boxes[(i, j)] = (blob, b_c, s_c)
                self.bundle_signatures[(i, j)] = signature
        alive = self._prune(valid, "share exchange")
        relays = []
        for i in sorted(alive):
            senders = [j for j in self.key_relay[i] if j in alive]
            self.relayed[i] = senders
            boxes = [self.boxes[(j, i)] for j in senders]
            relays.append(
                SharesRelay(
                    self.round_id, i, senders,
                    [b[0] for b in boxes], [b[1] for b in boxes], [b[2] for b in boxes],
                    [self.bundle_signatures[(j, i)] for j in senders],
                )
            )
        return relays

    def _judge(self, accuser: int, accused: int, revealed: bytes) -> None:
        """Open the accused bundle with the revealed key, as the accuser did; blame who is wrong."""
        if accused not in self.relayed[accuser]:
            self.blame(accuser, f"accused {accused}, whose shares were never relayed to it")
            return
        try:
            genuine = crypto.public_from_private(revealed) == self.receiving[(accuser, accused)]
        except ValueError:
            genuine = False
        if not genuine:
            self.blame(accuser, f"accused {accused} with a key that is not its receiving key")
            return
        blob, b_commit, s_commit = self.boxes[(accused, accuser)]
        try:
            open_bundle(
                self.params, revealed, blob, accused, accuser, self.s_publics[accused], b_commit, s_commit
            )
        except ValueError as err:
            self.blame(accused, f"sent participant {accuser} a bad share bundle ({err})")
            self.lacking.add((accuser, accused))
            return
        self.blame(accuser, f"accused {accused} falsely: the bundle it received opens and matches")

    def collect_masked(self, inputs: list[MaskedInput]) -> list[SurvivorsRequest]:
        """Stage 4 -> 5: judge accusations, sum masked vectors, ask survivors to sign who survived."""
        self._advance("masked", "consistency")
        arrived = {}
        dtype, length = wire_shape(self.narrow, self.d)
        for i, msg in self._accept(inputs, set(self.relayed), "masked input").items():
            y = msg.masked
            if y.shape != (length,) or y.dtype != dtype:
                self.blame(i, f"masked input is {y.dtype} of shape {y.shape}, expected {dtype} of shape ({length},)")
            elif len(msg.accused) != len(msg.revealed_keys) or len(set(msg.accused)) != len(msg.accused):
                self.blame(i, "malformed accusation lists")
            else:
                arrived[i] = msg
        for i, msg in arrived.items():
            for accused, key in zip(msg.accused, msg.revealed_keys, strict=True):
                self._judge(i, accused, key)
        self.u3 = set(arrived) - set(self.blamed)
        if len(self.u3) < self.threshold:
            raise SecAggAbort(
                f"round {self.round_id}: {len(self.u3)} valid masked inputs, threshold is {self.threshold}"
            )
        self.total = np.zeros(self.d + 1, dtype=np.uint32)
        for i in sorted(self.u3):
            add_packed(self.total, arrived[i].masked, self.narrow)  # wraps mod 2^32
        self.holding = set(self.u3)
        self._check_recoverable()
        return [SurvivorsRequest(self.round_id, i, sorted(self.u3)) for i in sorted(self.u3)]

    def collect_signatures(self, replies: list[SurvivorsSignature]) -> list[UnmaskRequest]:
        """Stage 5 -> 6 (ConsistencyCheck): check each survivor's signature on the survivor set and
        relay every valid one to every signer; abort unless a majority of members (and t) signed."""
        self._advance("consistency", "unmask")
        statement = survivor_statement(self.params, sorted(self.u3))
        signed: dict[int, bytes] = {}
        for i, msg in self._accept(replies, self.u3, "consistency check").items():
            try:
                verify(self.cards[i], msg.signature, statement)
                signed[i] = msg.signature
            except ValueError:
                self.blame(i, "did not sign the survivor set it was sent")
        need = max(self.threshold, len(self.ids) // 2 + 1)
        if len(signed) < need:
            raise SecAggAbort(
                f"round {self.round_id}: {len(signed)} members signed the survivor set; {need} of "
                f"{len(self.ids)} must (a majority, and the threshold) before anyone reveals a share"
            )
        self.holding = set(signed)
        self._check_recoverable()
        requests = []
        for i in sorted(self.holding):
            held = [j for j in self.relayed[i] if (i, j) not in self.lacking]
            survived = [j for j in held if j in self.u3]
            dropped = [j for j in held if j not in self.u3]
            others = [j for j in sorted(signed) if j != i]
            self.asked[i] = UnmaskRequest(
                self.round_id, i, survived, dropped, others, [signed[j] for j in others], [self.identities[j] for j in others]
            )
            requests.append(self.asked[i])
        return requests

    def _check_recoverable(self) -> None:
        """Abort before any share is revealed unless every secret we need has >= t live holders."""
        for u in self.relayed:
            partners = self.u3.intersection(self.relayed[u])
            if u in self.u3 or partners:
                shares = len(self._holders(u)) + (u in self.holding)
                if shares < self.threshold:
                    raise SecAggAbort(
                        f"round {self.round_id}: only {shares} live holders of participant {u}'s "
                        f"shares, threshold is {self.threshold}"
                    )

    def _holders(self, owner: int) -> list[int]:
        """Survivors still holding valid shares of `owner` (its neighbours that did not accuse it)."""
        return [h for h in self.relayed[owner] if h in self.holding and (h, owner) not in self.lacking]

    def _gather(self, responses: list[UnmaskResponse]) -> dict[bytes, dict[int, dict[int, bytes]]]:
        """kind -> owner -> {x of holder: share}, keeping only shares that match their commitment."""
        parts: dict[bytes, dict[int, dict[int, bytes]]] = {b"b": {}, b"s": {}}
        for h, msg in self._accept(responses, set(self.asked), "unmask").items():
            ask = self.asked[h]
            if sorted(msg.b_owners) != sorted([h, *ask.survived]) or sorted(msg.s_owners) != sorted(ask.dropped):
                self.blame(h, "unmask response does not answer exactly what was asked")
                continue
            if len(msg.b_shares) != len(msg.b_owners) or len(msg.s_shares) != len(msg.s_owners):
                self.blame(h, "unmask response lists have different lengths")
                continue
            for kind, owners, shares in ((b"b", msg.b_owners, msg.b_shares), (b"s", msg.s_owners, msg.s_shares)):
                for u, share in zip(owners, shares, strict=True):
                    if u != h and crypto.commit_share(self.params, u, h, kind, share) != self.boxes[(u, h)][1 if kind == b"b" else 2]:
                        self.blame(h, f"revealed a {kind.decode()}-share of {u} that {u} never dealt to it")
                        continue
                    parts[kind].setdefault(u, {})[x_coord(h)] = share
        return parts

    def _recover(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        """Decode from every share; shares off the polynomial were dealt wrong by the owner."""
        if len(shares) < self.threshold:
            raise SecAggAbort(
                f"round {self.round_id}: {len(shares)} valid shares of participant {owner}'s {what}, "
                f"threshold is {self.threshold}"
            )
        try:
            result = shamir.reconstruct(shares, self.threshold)
        except ValueError as err:
            self.blame(owner, f"dealt shares of its {what} that do not reconstruct ({err})")
            raise SecAggAbort(f"round {self.round_id}: {what} of {owner} cannot be recovered: {err}") from None
        if result.bad:
            holders = [x - 1 for x in result.bad]
            self.blame(owner, f"dealt inconsistent shares of its {what} to {holders}")
        return result.secret

    def collect_unmask(self, responses: list[UnmaskResponse]) -> SumResult:
        """Stage 5: reconstruct b of survivors and s_sk of dropped neighbours; unmask the sum."""
        self._advance("unmask", "done")
        parts = self._gather(responses)
        for u in sorted(self.u3):
            b_seed = self._recover(u, parts[b"b"].get(u, {}), "self-mask seed")
            if crypto.commit_seed(self.params, u, b_seed) != self.commitments[u]:
                self.blame(u, "its self-mask seed does not match its commitment")
                raise SecAggAbort(f"round {self.round_id}: self-mask of {u} cannot be removed")
            apply_mask(self.total, b_seed, -1)
        for j in sorted(set(self.relayed) - self.u3):
            partners = [i for i in self.relayed[j] if i in self.u3]
            if not partners:
                continue
            s_private = self._recover(j, parts[b"s"].get(j, {}), "masking key")
            if len(s_private) != crypto.KEY_BYTES or crypto.public_from_private(s_private) != self.s_publics[j]:
                self.blame(j, "its shared masking key does not match its public key")
                raise SecAggAbort(f"round {self.round_id}: pairwise masks of {j} cannot be removed")
            for i in partners:  # i added mask_sign(i, j) * PRG(s_ij): take it out
                seed = crypto.pairwise_seed(s_private, self.s_publics[i], self.params)
                apply_mask(self.total, seed, -mask_sign(i, j))
        n = len(self.u3)
        if int(self.total[-1]) != n:
            raise SecAggAbort(
                f"round {self.round_id}: the unmasked count slot reads {int(self.total[-1])}, not {n}: "
                "the members did not derive the same masks (inconsistent public parameters?); sum refused"
            )
        total = narrowed(self.total[:-1], self.narrow)
        return SumResult(
            total=decode(total, self.scale, np.float32, self.narrow),
            sum_u32=total,
            count=n,
            survivors=sorted(self.u3),
            dropped=sorted(set(self.ids) - self.u3),
            scale=self.scale,
            error_bound=error_bound(n, self.scale),
            blamed=dict(self.blamed),
            narrow=self.narrow,
        )
