"""Server side of SecAgg+: validate, relay, and finally unmask the sum.

One `SecAggServer` runs one instance (one bucket of one round): Bonawitz et
al. (CCS 2017) stages over the sparse graph of Bell et al. (CCS 2020). Each
`collect_*` method takes the replies that arrived for a stage, validates them
(blaming the sender in a `SecAggProtocolError`), treats silent participants as
dropped, and returns the requests for the next stage. Fewer than `threshold`
live participants anywhere a secret must be recovered raises `SecAggAbort`.
The server is trusted to relay honestly (no PKI signatures on keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import crypto, shamir
from .errors import SecAggAbort, SecAggProtocolError
from .fixedpoint import check_no_overflow, choose_scale, decode, error_bound
from .graph import check_ids, communication_graph, default_degree, default_threshold
from .messages import (
    KeysAdvert,
    KeysRelay,
    MaskedInput,
    SetupRequest,
    SharesRelay,
    SharesUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from .participant import BUNDLE_BYTES, mask_sign, x_coord
from .prg import apply_mask

CIPHERTEXT_BYTES = crypto.NONCE_BYTES + BUNDLE_BYTES + crypto.TAG_BYTES


@dataclass(frozen=True)
class SumResult:
    """Decoded sum of the survivors' clipped inputs."""

    total: np.ndarray  # float32, length vector_length
    sum_u32: np.ndarray  # the unmasked sum in Z_{2^32}, for exact re-decoding
    count: int
    survivors: list[int]
    dropped: list[int]
    scale: float
    error_bound: float  # per coordinate, before float32 rounding of `total`


class _Reply(Protocol):
    @property
    def round_id(self) -> str: ...
    @property
    def sender(self) -> int: ...


class SecAggServer:
    """State machine of one secure-aggregation instance, stage by stage.

    Call `setup`, `collect_keys`, `collect_shares`, `collect_masked`,
    `collect_unmask` in order, each with the replies that arrived in time.
    After any exception the instance is spent: start a new one (new round_id).
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
        graph_seed: bytes | int = 0,
    ) -> None:
        ids = check_ids(list(participant_ids))
        n = len(ids)
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
        if scale is None:
            scale = choose_scale(clip_norm, n)
        check_no_overflow(clip_norm, n, scale)
        self.round_id, self.ids, self.d = round_id, ids, vector_length
        self.clip_norm, self.scale = float(clip_norm), float(scale)
        self.threshold, self.degree = t, k
        self.graph = communication_graph(ids, k, graph_seed)
        self.stage = "setup"
        self.keys: dict[int, tuple[bytes, bytes]] = {}  # id -> (c_public, s_public)
        self.key_relay: dict[int, list[int]] = {}  # id -> neighbours whose keys it got (U1)
        self.commitments: dict[int, bytes] = {}
        self.relayed: dict[int, list[int]] = {}  # id -> neighbours whose shares it holds (U2)
        self.total = np.zeros(0, dtype=np.uint32)
        self.u3: set[int] = set()
        self.asked: dict[int, UnmaskRequest] = {}

    def _advance(self, expected: str, nxt: str) -> None:
        if self.stage != expected:
            raise RuntimeError(f"SecAggServer is at stage {self.stage!r}, cannot run {expected!r}")
        self.stage = nxt

    def _check_sender(self, msg: _Reply, allowed: set[int], seen: set[int]) -> int:
        sender = msg.sender
        if msg.round_id != self.round_id:
            raise SecAggProtocolError(
                sender, f"message for round {msg.round_id!r}, expected {self.round_id!r}"
            )
        if sender not in allowed:
            raise SecAggProtocolError(sender, "unknown or unexpected sender at this stage")
        if sender in seen:
            raise SecAggProtocolError(sender, "sent two replies for the same stage")
        seen.add(sender)
        return sender

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

    def setup(self) -> list[SetupRequest]:
        """Stage 1: one request per participant with its neighbours and the round parameters."""
        self._advance("setup", "keys")
        return [
            SetupRequest(
                self.round_id, i, self.graph[i], self.threshold, self.d, self.clip_norm, self.scale
            )
            for i in self.ids
        ]

    def collect_keys(self, adverts: list[KeysAdvert]) -> list[KeysRelay]:
        """Stage 2 -> 3: record public keys, relay each participant its live neighbours' keys."""
        self._advance("keys", "shares")
        seen: set[int] = set()
        for msg in adverts:
            i = self._check_sender(msg, set(self.ids), seen)
            if len(msg.c_public) != crypto.KEY_BYTES or len(msg.s_public) != crypto.KEY_BYTES:
                raise SecAggProtocolError(i, "public keys must be 32 bytes")
            self.keys[i] = (msg.c_public, msg.s_public)
        alive = self._prune(set(seen), "key advertisement")
        relays = []
        for i in sorted(alive):
            nbrs = [j for j in self.graph[i] if j in alive]
            self.key_relay[i] = nbrs
            relays.append(
                KeysRelay(
                    self.round_id,
                    i,
                    nbrs,
                    [self.keys[j][0] for j in nbrs],
                    [self.keys[j][1] for j in nbrs],
                )
            )
        return relays

    def collect_shares(self, uploads: list[SharesUpload]) -> list[SharesRelay]:
        """Stage 3 -> 4: check each upload is addressed to exactly its relayed neighbours, relay."""
        self._advance("shares", "masked")
        seen: set[int] = set()
        boxes: dict[tuple[int, int], bytes] = {}
        for msg in uploads:
            i = self._check_sender(msg, set(self.key_relay), seen)
            if len(msg.receivers) != len(msg.ciphertexts) or len(msg.b_commitment) != 32:
                raise SecAggProtocolError(i, "malformed share upload")
            stray = sorted(set(msg.receivers) - set(self.key_relay[i]))
            if stray:
                raise SecAggProtocolError(
                    i, f"addressed shares to {stray}, not among its neighbours with keys"
                )
            if sorted(msg.receivers) != self.key_relay[i]:
                missing = sorted(set(self.key_relay[i]) - set(msg.receivers))
                raise SecAggProtocolError(
                    i, f"sent no shares (or duplicates) for neighbours {missing}"
                )
            for j, blob in zip(msg.receivers, msg.ciphertexts, strict=True):
                if len(blob) != CIPHERTEXT_BYTES:
                    raise SecAggProtocolError(
                        i, f"ciphertext to {j} is {len(blob)} bytes, expected {CIPHERTEXT_BYTES}"
                    )
                boxes[(i, j)] = blob
            self.commitments[i] = msg.b_commitment
        alive = self._prune(set(seen), "share exchange")
        relays = []
        for i in sorted(alive):
            senders = [j for j in self.key_relay[i] if j in alive]
            self.relayed[i] = senders
            relays.append(SharesRelay(self.round_id, i, senders, [boxes[(j, i)] for j in senders]))
        return relays

    def collect_masked(self, inputs: list[MaskedInput]) -> list[UnmaskRequest]:
        """Stage 4 -> 5: sum masked vectors; ask survivors for exactly one share per neighbour."""
        self._advance("masked", "unmask")
        seen: set[int] = set()
        self.total = np.zeros(self.d, dtype=np.uint32)
        for msg in inputs:
            i = self._check_sender(msg, set(self.relayed), seen)
            y = msg.masked
            if not isinstance(y, np.ndarray) or y.dtype != np.uint32 or y.shape != (self.d,):
                got = getattr(y, "shape", None), getattr(y, "dtype", type(y).__name__)
                raise SecAggProtocolError(
                    i, f"masked input has shape/dtype {got}, expected ({self.d},) uint32"
                )
            np.add(self.total, y, out=self.total)  # wraps mod 2^32
        self.u3 = seen
        t = self.threshold
        for u in self.relayed:  # every secret we may need must have >= t live holders
            holders = self.u3.intersection(self.relayed[u])
            need = u in self.u3 or bool(holders)
            if need and len(holders) + (u in self.u3) < t:
                raise SecAggAbort(
                    f"round {self.round_id}: only {len(holders)} live holders of participant {u}'s "
                    f"shares, threshold is {t}"
                )
        requests = []
        for i in sorted(self.u3):
            survived = [j for j in self.relayed[i] if j in self.u3]
            dropped = [j for j in self.relayed[i] if j not in self.u3]
            self.asked[i] = UnmaskRequest(self.round_id, i, survived, dropped)
            requests.append(self.asked[i])
        return requests

    def collect_unmask(self, responses: list[UnmaskResponse]) -> SumResult:
        """Stage 5: reconstruct b of survivors and s_sk of dropped neighbours; unmask the sum."""
        self._advance("unmask", "done")
        seen: set[int] = set()
        b_parts: dict[int, dict[int, bytes]] = {}
        s_parts: dict[int, dict[int, bytes]] = {}
        for msg in responses:
            h = self._check_sender(msg, self.u3, seen)
            ask = self.asked[h]
            if sorted(msg.b_owners) != sorted([h, *ask.survived]) or sorted(msg.s_owners) != sorted(
                ask.dropped
            ):
                raise SecAggProtocolError(
                    h, "unmask response does not answer exactly what was asked"
                )
            if len(msg.b_shares) != len(msg.b_owners) or len(msg.s_shares) != len(msg.s_owners):
                raise SecAggProtocolError(h, "unmask response lists have different lengths")
            for owners, shares, parts in (
                (msg.b_owners, msg.b_shares, b_parts),
                (msg.s_owners, msg.s_shares, s_parts),
            ):
                for u, share in zip(owners, shares, strict=True):
                    if len(share) != shamir.SHARE_BYTES:
                        raise SecAggProtocolError(h, f"share of {u} is {len(share)} bytes")
                    parts.setdefault(u, {})[x_coord(h)] = share
        for u in sorted(self.u3):
            b_seed = self._recover(u, b_parts.get(u, {}), "self-mask seed")
            if crypto.commit_seed(self.round_id, u, b_seed) != self.commitments[u]:
                raise SecAggProtocolError(
                    None,
                    f"recovered self-mask seed of {u} does not match its commitment: "
                    "a holder sent a bad share",
                )
            apply_mask(self.total, b_seed, -1)
        dropped = sorted(set(self.ids) - self.u3)
        for j in sorted(set(self.relayed) - self.u3):
            partners = [i for i in self.relayed[j] if i in self.u3]
            if not partners:
                continue
            s_private = self._recover(j, s_parts.get(j, {}), "masking key")
            if (
                len(s_private) != crypto.KEY_BYTES
                or crypto.public_from_private(s_private) != self.keys[j][1]
            ):
                raise SecAggProtocolError(
                    None,
                    f"recovered masking key of {j} does not match its public key: "
                    "a holder sent a bad share",
                )
            for i in partners:  # i added mask_sign(i, j) * PRG(s_ij): take it out
                apply_mask(
                    self.total,
                    crypto.pairwise_seed(s_private, self.keys[i][1], self.round_id),
                    -mask_sign(i, j),
                )
        n = len(self.u3)
        return SumResult(
            total=decode(self.total, self.scale),
            sum_u32=self.total,
            count=n,
            survivors=sorted(self.u3),
            dropped=dropped,
            scale=self.scale,
            error_bound=error_bound(n, self.scale),
        )

    def _recover(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecAggAbort(
                f"round {self.round_id}: {len(shares)} shares of participant {owner}'s {what}, "
                f"threshold is {self.threshold}"
            )
        try:
            return shamir.combine(shares, self.threshold)
        except ValueError as err:
            raise SecAggProtocolError(
                None, f"{what} of {owner} could not be recovered: {err}"
            ) from None
