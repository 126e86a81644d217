"""Secure aggregation in the coordinator's round: SecAgg+ per bucket, over Flower messages.

After the train exchange (participants reply with metadata only and keep their update), the
round's participants are shuffled into buckets (`secagg.bucket_size`), and one
`fedlora.secagg.SecAggServer` per bucket is driven through its stages: each stage is one
`grid.send_and_receive` of `query.secagg_<stage>` messages for all buckets at once. The
coordinator only ever holds masked vectors and, at the end, one sum per bucket
(`BucketSum`): the example-weighted sum of its survivors' clipped updates and their total
weight, both out of the same secure sum (see `fedlora.secagg.plan`).

Failure handling, per bucket:
- a participant that does not answer a stage in `secagg.timeout_s`, fails, or sends a
  malformed reply is dropped at that stage; after its masked input arrived it is still in
  the sum, recovered from its neighbours' shares;
- a participant the protocol convicts of a violation (bad or copied key, bad share bundle,
  false accusation, bad share at unmask; see `fedlora.secagg.server`) is named in the
  bucket's `blamed` and, unless its masked input is already in the sum, left out of it;
  nothing restarts, since every participant masks at most once per round;
- a `SecAggAbort` (too few participants left for the threshold) aborts the bucket.
The round is applied from the buckets that completed, when they hold at least
`federation.min_participants` updates; otherwise the global adapter stays unchanged and the
row in metrics.jsonl says why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from coordinator.screen import Rejection
from fedlora.aggregate import apply_mean, weighted_mean
from fedlora.config import SecaggSection
from fedlora.secagg import SecAggAbort, SecAggProtocolError, SecAggServer, assign_buckets, decode
from fedlora.secagg.plan import input_clip_norm, neighbourhood_degree, resolve_threshold, round_context, split_weighted_sum
from fedlora.secure_wire import STAGE, STAGES, content_bytes, protocol_content, read_protocol
from fedlora.wire import read_reply

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from coordinator.rounds import Coordinator

log = logging.getLogger("fedlora.coordinator")
NEXT = {stage.name: nxt.name for stage, nxt in zip(STAGES, STAGES[1:])}


@dataclass(frozen=True)
class Member:
    """A participant that trained this round and holds its update for the secure sum."""

    node: int
    name: str
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BucketSum:
    """What the coordinator learns from one bucket: a sum, never an individual update."""

    members: list[str]
    survivors: list[str]  # whose updates are in the sum
    total: np.ndarray  # float64: sum over survivors of num_examples * clip(update)
    weight: float  # sum over survivors of num_examples (from the secure sum)
    error_bound: float  # max abs fixed-point error per coordinate of `total`

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight


@dataclass
class SecureSum:
    buckets: list[BucketSum] = field(default_factory=list)
    layout: list[dict[str, Any]] = field(default_factory=list)  # per bucket: members, survivors, status, blamed
    skipped: list[Rejection] = field(default_factory=list)  # updates in no sum, with the reason
    recovered: list[dict[str, str]] = field(default_factory=list)  # vanished after masking, still summed
    aborted: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0


class _Bucket:
    """One bucket's secure sum: a `SecAggServer` driven stage by stage over Flower messages."""

    def __init__(self, index: int, members: list[Member], sec: SecaggSection, server_round: int, length: int, run_tag: str) -> None:
        self.index, self.members, self.sec = index, members, sec
        self.server_round, self.length = server_round, length
        self.status, self.reason = "running", ""
        self.result: BucketSum | None = None
        self.dropped: dict[str, str] = {}
        self.recovered: dict[str, str] = {}
        self.bytes_up = self.bytes_down = 0
        self.by_id = dict(enumerate(members))
        self.weight_ref = float(max((m.num_examples for m in members), default=1))
        self.round_id = f"{run_tag}/round-{server_round}/bucket-{index}"
        self.stage = "setup"
        self.server: SecAggServer | None = None
        try:
            if len(members) < 2:
                raise ValueError("a secure sum needs at least 2 participants")
            k = neighbourhood_degree(len(members), sec.degree)
            self.server = SecAggServer(
                self.round_id, list(self.by_id), length + 1, input_clip_norm(sec.clip_norm),
                degree=k, threshold=resolve_threshold(sec.threshold, k),
                context=round_context(server_round, self.weight_ref),
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
        if self.stage == "unmask":  # its masked input is in the sum: recovered from shares
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
                self._drop(member, f"participant failed: {reply.error.reason}")
                continue
            self.bytes_up += content_bytes(reply.content)
            try:
                msg = read_protocol(reply.content, stage.reply, sender=request.receiver)
                if msg.sender != request.receiver:
                    raise SecAggProtocolError(request.receiver, f"signed its reply as participant {msg.sender}")
            except (SecAggProtocolError, KeyError, TypeError, ValueError) as err:
                self._drop(member, f"malformed reply ({err})")
                continue
            parsed.append(msg)
        assert self.server is not None  # a bucket without a server is never running
        collect = {
            "setup": self.server.collect_keys,
            "share_keys": self.server.collect_shares,
            "mask_input": self.server.collect_masked,
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
        total, weight = split_weighted_sum(decode(out.sum_u32, out.scale, np.float64), self.sec.clip_norm, self.weight_ref)
        if not weight > 0:
            self._fail(f"the secure sum of example weights is {weight}")
            return
        survivors = [self.by_id[i].name for i in out.survivors]
        self.result = BucketSum([m.name for m in self.members], survivors, total, weight, out.error_bound * self.weight_ref)
        self.status = "ok"

    def skipped(self) -> list[Rejection]:
        """Members whose update is in no sum, with the reason."""
        included = set(self.result.survivors) if self.result else set()
        blamed = self.blamed()
        out = []
        for member in self.members:
            if member.name in included:
                continue
            reason = (
                f"secure aggregation: excluded for a protocol violation: {blamed[member.name]}" if member.name in blamed
                else self.dropped.get(member.name) or (
                    f"secure aggregation aborted ({self.reason})" if self.status != "ok"
                    else "secure aggregation: left out, too few of its neighbours stayed to recover its masks"
                )
            )
            out.append(Rejection(member.name, reason))
        return out


def secure_sum(grid: Grid, members: list[Member], sec: SecaggSection, seed: int, server_round: int, length: int, run_tag: str) -> SecureSum:
    """Sum the members' held updates securely, per bucket; stages of all buckets run in lockstep."""
    ordered = sorted(members, key=lambda m: m.name)
    result = SecureSum()
    if len(ordered) < max(2, sec.bucket_size):
        reason = f"{len(ordered)} participants trained, fewer than a bucket of max(2, secagg.bucket_size={sec.bucket_size})"
        result.aborted.append(reason)
        result.skipped = [Rejection(m.name, f"secure aggregation not run: {reason}") for m in ordered]
        return result
    ids = list(range(len(ordered)))
    groups = [ids] if sec.bucket_size == 0 else assign_buckets(ids, sec.bucket_size, f"{seed}/{server_round}".encode())
    buckets = [_Bucket(b, [ordered[i] for i in group], sec, server_round, length, run_tag) for b, group in enumerate(groups)]
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
                "survivors": bucket.result.survivors if bucket.result else [],
                "status": bucket.status,
                **({"blamed": bucket.blamed()} if bucket.blamed() else {}),
                **({"reason": bucket.reason} if bucket.reason else {}),
                **({"error_bound": bucket.result.error_bound} if bucket.result else {}),
            }
        )
        if bucket.result:
            result.buckets.append(bucket.result)
        else:
            result.aborted.append(bucket.reason)
    return result


def run_tag(grid: Grid) -> str:
    """Part of every instance's round id: unique per run, so keys and masks never repeat across runs."""
    try:
        return f"run-{grid.run.run_id}-{os.urandom(4).hex()}"
    except Exception:  # a Grid without a run (tests): a random tag is as unique
        return f"run-{os.urandom(8).hex()}"


def run_secure_round(coord: Coordinator, server_round: int, sampled: list[int], replies: dict[int, Message | None]) -> dict[str, Any]:
    """The rest of a round after the train exchange, in secure mode; returns the metrics row."""
    cfg = coord.cfg
    fed, sec = cfg.federation, cfg.secagg
    members, rejected = [], []
    for node, reply in replies.items():
        if reply is None:
            rejected.append(Rejection(coord.name(node), f"no reply within {fed.timeout_s:g} s"))
        elif reply.has_error():
            rejected.append(Rejection(coord.name(node), f"participant failed: {reply.error.reason}"))
        else:
            try:
                _, metrics = read_reply(reply.content)
                count = int(metrics["num-examples"])
                if count <= 0:
                    raise ValueError(f"example count {count} is not positive")
                members.append(Member(node, coord.name(node, metrics), count, metrics))
            except (KeyError, TypeError, ValueError) as err:
                rejected.append(Rejection(coord.name(node), f"malformed reply ({err})"))
    length = coord.aggregator.upload_layout(coord.adapter.layout, cfg.lora.r).size
    summed = secure_sum(coord.grid, members, sec, fed.seed, server_round, length, run_tag(coord.grid))
    rejected += summed.skipped
    for rejection in rejected:
        log.warning("round %d: skipped %s: %s", server_round, rejection.participant, rejection.reason)
    included = {name for bucket in summed.buckets for name in bucket.survivors}
    row: dict[str, Any] = {
        "round": server_round,
        "sampled": len(sampled),
        "participants": len(included),
        "skipped": [{"participant": r.participant, "reason": r.reason} for r in rejected],
        "bytes_down": int(coord.adapter.vector.nbytes * len(sampled)) + summed.bytes_down,
        "bytes_up": summed.bytes_up,
        "secagg": {"buckets": summed.layout, "recovered": summed.recovered},
    }
    if summed.aborted:
        row["aborted"] = "; ".join(summed.aborted)
    if len(included) < fed.min_participants or not summed.buckets:
        row["applied"] = False
        log.warning(
            "round %d: secure aggregation gave %d updates (< min_participants=%d); global adapter unchanged (%s)",
            server_round, len(included), fed.min_participants, row.get("aborted", "no bucket completed"),
        )
        return row
    # The mean over bucket means, weighted by example counts (the robust rules replace this).
    mean = weighted_mean([b.mean for b in summed.buckets], [b.weight for b in summed.buckets])
    # Fixed-point error per coordinate of `mean`: the sums' bound over the total weight, plus the
    # same relative error in that weight (its coordinate is encoded like the others, at scale C).
    total_weight = sum(b.weight for b in summed.buckets)
    bound = sum(b.error_bound for b in summed.buckets) / total_weight
    row["secagg"]["mean_error_bound"] = bound * (1.0 + float(np.max(np.abs(mean), initial=0.0)) / sec.clip_norm)
    step = apply_mean(coord.aggregator, coord.server_optimizer, coord.adapter.vector, coord.adapter.layout, mean)
    row["update_norm"] = float(np.linalg.norm(step.vector - coord.adapter.vector))
    coord.adapter.vector = step.vector
    row.update(step.metrics)
    row["applied"] = True
    kept = [m for m in members if m.name in included]
    row["train_loss"] = float(np.average([m.metrics["train_loss"] for m in kept], weights=[m.num_examples for m in kept]))
    return row
