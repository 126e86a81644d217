"""Secure aggregation in the coordinator's round: SecAgg+ per bucket, over Flower messages.

After the train exchange (participants reply with metadata only and keep their update), the
round's participants are shuffled into buckets (`secagg.bucket_size`) by a secret drawn from the
OS CSPRNG now that they are known (`fedlora.secagg.buckets`: nothing a participant received or
chose predicts who shares its bucket; the secret is in the round's row and audit record), and one
`fedlora.secagg.SecAggServer` per bucket is driven through its stages: each stage is one
`grid.send_and_receive` of `query.secagg_<stage>` messages for all buckets at once. The
coordinator only ever holds masked vectors and, at the end, one sum per bucket: a
`fedlora.aggregate.Unit` with the example-weighted sum of its survivors' clipped updates and
their total weight, both out of the same secure sum (see `fedlora.secagg.plan`).

Failure handling, per bucket:
- a participant that does not answer a stage in `secagg.timeout_s`, fails, or sends a
  malformed reply is dropped at that stage; after its masked input arrived (at the consistency
  check or unmask) it is still in the sum, recovered from its neighbours' shares;
- a participant the protocol convicts of a violation (bad or copied key, bad share bundle,
  false accusation, bad share at unmask; see `fedlora.secagg.server`) is named in the
  bucket's `blamed` and, unless its masked input is already in the sum, left out of it;
  nothing restarts, since every participant masks at most once per round;
- a `SecAggAbort` (too few participants left for the threshold) aborts the bucket.
`gather_secure` hands the completed buckets to the round pipeline as units, like the
plaintext gatherer's units of one.

Distributed DP (`privacy` with noise_multiplier > 0): every participant counts once (the bound
weight reference is 1, so a bucket's unit is the unweighted sum of its survivors' clipped
updates plus their Skellam noise shares, and its weight is its member count), and the bucket's
fixed-point scale leaves room for the noise (`fedlora.secagg.plan.check_fixed_point`). The
coordinator adds no noise of its own and never sees a sum without the participants' noise.
Members that drop after setup but before their masked input arrives take their noise shares
with them: a sum holding fewer than k (1 - privacy.dropout_margin) shares is below the planned
noise, so it is discarded (status `discarded`), never combined into the adapter, and its members
are charged at its real noise in the view against the coordinator, who saw it (`seen_noise`).

Every instance's context binds the hashes of the run configuration and of the global adapter that
the round's train instructions carried (`fedlora.secagg.plan.RunBinding`): each participant
compares them with what it received itself and refuses a setup that differs, and members told
different hashes derive unrelated keys, so a member given another model cannot be summed with
the rest (participant/terms.py checks every other setup parameter against the site's terms).

The 16-bit wire (`secagg.wire_bits = 16`, `fedlora.secagg.narrow`): the update's coordinates
travel rotated, in 16 bits, and are rotated back when the sum is decoded. A unit's `error_bound`
then bounds each coordinate of the rotated sum, not of the sum itself; sqrt(d) times it bounds
the sum's L2 error on either wire, which is how screening uses it (and `mean_error_bound` in the
metrics is per rotated coordinate).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from coordinator.gather import Gathered, Member, Rejection, error_reason
from fedlora.aggregate import Unit
from fedlora.aggregate.weights import secure_weight_reference
from fedlora.config import PrivacySection, SecaggSection
from fedlora.privacy.ledger import meets, present_noise_multiplier
from fedlora.secagg import SecAggAbort, SecAggProtocolError, SecAggServer, assign_named_buckets, decode, draw_bucket_secret
from fedlora.secagg.identity import Roster
from fedlora.secagg.plan import (
    RunBinding, check_fixed_point, input_clip_norm, neighbourhood_degree, participant_skellam_mu, resolve_threshold, round_context, split_weighted_sum,
)
from fedlora.secure_wire import STAGE, STAGES, content_bytes, protocol_content, read_protocol

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger("fedlora.coordinator")
NEXT = {stage.name: nxt.name for stage, nxt in zip(STAGES, STAGES[1:])}


@dataclass
class SecureSum:
    buckets: list[Unit] = field(default_factory=list)  # one unit per completed bucket: its survivors' sum
    layout: list[dict[str, Any]] = field(default_factory=list)  # per bucket: members, survivors, status, blamed
    skipped: list[Rejection] = field(default_factory=list)  # updates in no sum, with the reason
    recovered: list[dict[str, str]] = field(default_factory=list)  # vanished after masking, still summed
    aborted: list[str] = field(default_factory=list)
    bucket_secret: bytes = b""  # what drew the buckets (none for one bucket): recorded, so anyone can recompute them
    bytes_up: int = 0
    bytes_down: int = 0


class _Bucket:
    """One bucket's secure sum: a `SecAggServer` driven stage by stage over Flower messages."""

    def __init__(
        self, index: int, members: list[Member], sec: SecaggSection, clip_norm: float, server_round: int, length: int, run_tag: str,
        privacy: PrivacySection | None = None, binding: RunBinding = RunBinding(), roster: Roster | None = None,
        weight_ref: float = 1.0,
    ) -> None:
        self.index, self.members, self.sec, self.clip_norm = index, members, sec, clip_norm
        self.server_round, self.length = server_round, length
        self.status, self.reason = "running", ""
        self.result: Unit | None = None
        self.dropped: dict[str, str] = {}
        self.recovered: dict[str, str] = {}
        self.bytes_up = self.bytes_down = 0
        self.by_id = dict(enumerate(members))
        noise = (privacy.noise_multiplier, privacy.dropout_margin) if privacy and privacy.noise_multiplier > 0 else (0.0, 0.0)
        # Under DP each participant counts once (n_ref = 1: w = 1); otherwise as robust.weighting says.
        self.weight_ref = 1.0 if noise[0] else weight_ref
        self.noise, self.noise_std, self.noise_multiplier = noise, 0.0, 0.0
        self.survivors: list[str] = []  # whose masked inputs a discarded sum held
        self.round_id = f"{run_tag}/round-{server_round}/bucket-{index}"
        self.stage = "setup"
        self.server: SecAggServer | None = None
        try:
            if len(members) < 2:
                raise ValueError("a secure sum needs at least 2 participants")
            k = neighbourhood_degree(len(members), sec.degree)
            self.server = SecAggServer(
                self.round_id, list(self.by_id), length + 1, input_clip_norm(clip_norm),
                degree=k, threshold=resolve_threshold(sec.threshold, k),
                scale=check_fixed_point(clip_norm, len(members), *noise, update_length=length, wire_bits=sec.wire_bits),
                context=round_context(server_round, self.weight_ref, *noise, binding), wire_bits=sec.wire_bits,
                names=[m.name for m in members], roster=roster,
            )
            self.requests: list[Any] = self.server.setup()
        except ValueError as err:
            self._fail(f"cannot run with {len(members)} participants: {err}")

    def _fail(self, reason: str) -> None:
        self.status, self.reason = "aborted", f"bucket {self.index}: {reason}"

    def blamed(self) -> dict[str, str]:
        """Members the protocol convicted of a violation, with the reason."""
        if self.server is None:
            return {}
        return {self.by_id[i].name: why for i, why in self.server.blamed.items() if i in self.by_id}

    def outgoing(self) -> list[Message]:
        messages = []
        for request in self.requests:
            content = protocol_content(request, {"server_round": self.server_round})
            self.bytes_down += content_bytes(content)
            node = self.by_id[request.receiver].node
            messages.append(Message(content, dst_node_id=node, message_type=STAGE[self.stage].message_type, group_id=str(self.server_round)))
        return messages

    def _drop(self, member: Member, why: str) -> None:
        reason = f"secure aggregation, stage {self.stage}: {why}"
        if self.stage in ("consistency", "unmask"):  # its masked input is in the sum: recovered from shares
            self.recovered[member.name] = reason
        else:
            self.dropped[member.name] = reason

    def receive(self, replies: dict[int, Message], timeout_s: float) -> None:
        stage = STAGE[self.stage]
        parsed = []
        for request in self.requests:
            member = self.by_id[request.receiver]
            reply = replies.get(member.node)
            if reply is None:
                self._drop(member, f"no reply within {timeout_s:g} s")
                continue
            if reply.has_error():
                self._drop(member, error_reason(reply.error.reason))
                continue
            self.bytes_up += content_bytes(reply.content)
            try:
                msg = read_protocol(reply.content, stage.reply, sender=request.receiver)
            except (SecAggProtocolError, KeyError, TypeError, ValueError) as err:
                self._drop(member, f"malformed reply ({err})")
                continue
            if msg.sender != request.receiver:  # the authenticated node answers for its reply, never the one it names
                self.server.blame(request.receiver, f"sent a reply claiming to be participant {msg.sender}")
                continue
            parsed.append(msg)
        assert self.server is not None  # a bucket without a server is never running
        collect = {
            "setup": self.server.collect_keys,
            "share_keys": self.server.collect_shares,
            "mask_input": self.server.collect_masked,
            "consistency": self.server.collect_signatures,
            "unmask": self.server.collect_unmask,
        }[self.stage]
        try:
            out = collect(parsed)
        except SecAggAbort as err:
            self._fail(err.reason)
            return
        if self.stage != "unmask":
            self.requests, self.stage = out, NEXT[self.stage]
            return
        total, weight = split_weighted_sum(decode(out.sum_u32, out.scale, np.float64, out.narrow), self.clip_norm, self.weight_ref)
        if not weight > 0:
            self._fail(f"the secure sum of example weights is {weight}")
            return
        survivors = tuple(self.by_id[i].name for i in out.survivors)
        # The weight is decoded from the weight slot (scale C): its error is the sum's over C.
        bound = out.error_bound * self.weight_ref
        z, margin = self.noise
        if z:  # the survivors' noise shares, each of variance 2 mu, in update units
            k, summed = len(self.members), len(out.survivors)
            mu = participant_skellam_mu(z, self.clip_norm, out.scale, k, margin, self.length)
            self.noise_std = float(np.sqrt(2.0 * mu * summed) / out.scale)
            # Relative to the rounded sensitivity: z while at least k (1 - m) shares are in the sum.
            self.noise_multiplier = present_noise_multiplier(z, k, summed, margin)
            if not meets(self.noise_multiplier, z):  # members took their shares away before masking
                self.survivors, self.status, self.reason = list(survivors), "discarded", (
                    f"bucket {self.index}: {summed} of {k} masked inputs arrived, fewer than k (1 - privacy.dropout_margin) = "
                    f"{k * (1 - margin):g}: its sum carries noise multiplier {self.noise_multiplier:.4g}, below the run's {z:g}; "
                    "discarded, so the adapter carries the planned noise (charged against the coordinator, who saw it)"
                )
                log.warning("round %d, %s", self.server_round, self.reason)
                return
        self.result = Unit.from_total(survivors, total, weight, bound, bound / self.clip_norm, self.noise_std)
        self.status = "ok"

    def skipped(self) -> list[Rejection]:
        """Members whose update is in no sum, with the reason."""
        included = set(self.result.members) if self.result else set()
        blamed = self.blamed()
        out = []
        for member in self.members:
            if member.name in included:
                continue
            reason = (
                f"secure aggregation: excluded for a protocol violation: {blamed[member.name]}" if member.name in blamed
                else self.dropped.get(member.name) or (
                    f"secure aggregation {'discarded' if self.status == 'discarded' else 'aborted'} ({self.reason})" if self.status != "ok"
                    else "secure aggregation: left out, too few of its neighbours stayed to recover its masks"
                )
            )
            out.append(Rejection(member.name, reason, fault=member.name in blamed))
        return out


def secure_sum(
    grid: Grid, members: list[Member], sec: SecaggSection, server_round: int, length: int, run_tag: str, clip_norm: float,
    privacy: PrivacySection | None = None, binding: RunBinding = RunBinding(), roster: Roster | None = None,
    weighting: tuple[str, float] = ("capped", 2.0),
) -> SecureSum:
    """Sum the members' held updates securely, per bucket; stages of all buckets run in lockstep.

    `privacy` with a noise multiplier: distributed DP (module docstring). `binding`: the hashes of
    the run configuration and global adapter the round's train instructions carried (module docstring).
    `roster` (name -> fingerprint, the participant book's): advertised identities are checked against
    it, so a participant signing with another key is blamed here rather than relayed to neighbours
    who would blame the coordinator. `weighting` (robust.weighting, robust.weight_cap): the weight
    reference each bucket binds, so that a member's weight is what it would be in plaintext, a
    claim above the cap included (`secure_weight_reference`).
    """
    ordered = sorted(members, key=lambda m: m.name)
    result = SecureSum()
    if len(ordered) < max(2, sec.bucket_size):
        reason = f"{len(ordered)} participants trained, fewer than a bucket of max(2, secagg.bucket_size={sec.bucket_size})"
        result.aborted.append(reason)
        result.skipped = [Rejection(m.name, f"secure aggregation not run: {reason}") for m in ordered]
        return result
    if sec.bucket_size == 0:
        groups = [ordered]
    else:  # drawn only now that the members are fixed, fresh every round (a resumed round too)
        result.bucket_secret = draw_bucket_secret()
        by_name = {m.name: m for m in ordered}
        groups = [[by_name[name] for name in names] for names in assign_named_buckets(list(by_name), sec.bucket_size, result.bucket_secret)]
    buckets = [
        _Bucket(b, group, sec, clip_norm, server_round, length, run_tag, privacy, binding, roster,
                secure_weight_reference([m.num_examples for m in ordered], [m.num_examples for m in group], *weighting))
        for b, group in enumerate(groups)
    ]
    while running := [b for b in buckets if b.status == "running"]:
        messages = [msg for bucket in running for msg in bucket.outgoing()]
        replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages, timeout=sec.timeout_s)}
        for bucket in running:
            bucket.receive(replies, sec.timeout_s)
    for bucket in buckets:
        result.bytes_up += bucket.bytes_up
        result.bytes_down += bucket.bytes_down
        result.skipped += bucket.skipped()
        result.recovered += [{"participant": name, "reason": why} for name, why in sorted(bucket.recovered.items())]
        result.layout.append(
            {
                "members": [m.name for m in bucket.members],
                "survivors": list(bucket.result.members) if bucket.result else bucket.survivors,
                "status": bucket.status,
                **({"blamed": bucket.blamed()} if bucket.blamed() else {}),
                **({"reason": bucket.reason} if bucket.reason else {}),
                **({"error_bound": bucket.result.error_bound} if bucket.result else {}),
                **({"noise_std": bucket.noise_std, "noise_multiplier": bucket.noise_multiplier} if bucket.noise_std else {}),
            }
        )
        if bucket.result:
            result.buckets.append(bucket.result)
        else:
            result.aborted.append(bucket.reason)
    return result


def seen_noise(layout: list[dict[str, Any]]) -> dict[str, float]:
    """Each member whose masked input the coordinator unmasked, with the noise multiplier of that sum.

    Discarded sums count too: the coordinator saw them (the privacy view against it).
    """
    return {name: bucket["noise_multiplier"] for bucket in layout if "noise_multiplier" in bucket for name in bucket["survivors"]}


def run_tag(grid: Grid) -> str:
    """Part of every instance's round id: unique per run, so keys and masks never repeat across runs."""
    try:
        return f"run-{grid.run.run_id}-{os.urandom(4).hex()}"
    except Exception:  # a Grid without a run (tests): a random tag is as unique
        return f"run-{os.urandom(8).hex()}"


def gather_secure(
    grid: Grid, members: list[Member], sec: SecaggSection, server_round: int, length: int, run_tag: str, clip_norm: float,
    privacy: PrivacySection | None = None, binding: RunBinding = RunBinding(), roster: Roster | None = None,
    weighting: tuple[str, float] = ("capped", 2.0),
) -> Gathered:
    """The secure gatherer: one unit per bucket that completed, the bucket layout for the row."""
    summed = secure_sum(grid, members, sec, server_round, length, run_tag, clip_norm, privacy, binding, roster, weighting)
    names = {name for unit in summed.buckets for name in unit.members}
    secagg: dict[str, Any] = {"buckets": summed.layout, "recovered": summed.recovered}
    if summed.bucket_secret:
        secagg["bucket_secret"] = summed.bucket_secret.hex()
    return Gathered(
        units=summed.buckets,
        included=[m for m in members if m.name in names],
        skipped=summed.skipped,
        bytes_up=summed.bytes_up,
        bytes_down=summed.bytes_down,
        row={"secagg": secagg},
        aborted=summed.aborted,
        blamed=sorted(name for bucket in summed.layout for name in bucket.get("blamed", {})),
    )
