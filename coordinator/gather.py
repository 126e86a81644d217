"""Gathering: a round's train replies -> units (plaintext), with a reason for everything left out.

Gatherers get what they need as arguments and return a `Gathered`; they never see the
coordinator. The plaintext gatherer is here; the secure one (SecAgg+ per bucket) is
`coordinator.secure.gather_secure`. Both end in the same `fedlora.aggregate.Unit`s.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from fedlora.adapter import check_vector
from fedlora.aggregate import Unit, single_units
from fedlora.attacks import Sent
from fedlora.wire import read_reply


@dataclass(frozen=True)
class Member:
    """A participant that trained this round: its reply's metadata and, in plaintext, its update."""

    node: int
    name: str
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None  # None under secure aggregation: the update stays home


def as_sent(members: list[Member], sent: dict[str, Sent]) -> list[Member]:
    """The members as the coordinator receives them when those in `sent` attack (simulation only):
    their updates replaced, and their claims (example count, metrics) with them."""
    out = []
    for member in members:
        lie = sent.get(member.name)
        count = member.num_examples if lie is None or lie.num_examples is None else lie.num_examples
        out.append(member if lie is None else dataclasses.replace(member, vector=lie.update, num_examples=count, metrics=lie.claims(member.metrics)))
    return out


@dataclass(frozen=True)
class Rejection:
    participant: str
    reason: str
    fault: bool = False  # the participant sent something wrong (counts towards quarantine), not a timeout


@dataclass
class Gathered:
    """What a round's gathering produced, for combining and for the metrics row."""

    units: list[Unit]
    included: list[Member]  # whose updates are in the units
    skipped: list[Rejection]
    bytes_up: int = 0
    bytes_down: int = 0  # beyond the global adapter sent with the train messages
    row: dict[str, Any] = field(default_factory=dict)  # gatherer-specific fields of the metrics row
    aborted: list[str] = field(default_factory=list)
    blamed: list[str] = field(default_factory=list)  # protocol violations, whether or not still in a sum


FLOWER_ERROR = re.compile(r"<class '(?P<kind>[\w.]+)'>:<'(?P<message>.*)'>", re.DOTALL)


def error_reason(text: str) -> str:
    """An error reply as 'refused: why' (the participant declined) or 'failed: what' (it broke).

    Flower wraps an exception a ClientApp raised as "<class 'module.Kind'>:<'message'>"; a
    participant's Refusal (participant/site.py) is a decision, anything else a failure.
    """
    match = FLOWER_ERROR.fullmatch(text.strip())
    if not match:
        return f"failed: {text}"
    kind, message = match["kind"].rsplit(".", 1)[-1], match["message"]
    return f"refused: {message}" if kind == "Refusal" else f"failed: {kind}: {message}"


def read_train_replies(
    replies: dict[int, Message | None], name_of: Callable[[int, dict[str, Any] | None], str], timeout_s: float, with_vector: bool
) -> tuple[list[Member], list[Rejection]]:
    """Parse train replies; a missing, failed or malformed one is a rejection with its reason."""
    members, rejected = [], []
    for node, reply in replies.items():
        if reply is None:
            rejected.append(Rejection(name_of(node, None), f"no reply within {timeout_s:g} s"))
        elif reply.has_error():
            rejected.append(Rejection(name_of(node, None), error_reason(reply.error.reason)))
        else:
            try:
                vector, metrics = read_reply(reply.content)
                if with_vector and vector is None:
                    raise KeyError("update")
                members.append(Member(node, name_of(node, metrics), int(metrics["num-examples"]), metrics, vector))
            except (KeyError, TypeError, ValueError) as err:
                rejected.append(Rejection(name_of(node, None), f"malformed reply (missing {err})"))
    return sorted(members, key=lambda m: m.name), rejected


def screen(members: Sequence[Member], size: int | Callable[[Member], int]) -> tuple[list[Member], list[Rejection]]:
    """Split updates into usable ones and rejections (wrong shape, non-finite, no examples).

    `size` is the expected vector length, or a function giving it per member (participants of
    different LoRA ranks send different lengths); a ValueError it raises rejects the update.
    """
    accepted, rejected = [], []
    for member in members:
        try:
            check_vector(member.vector, size(member) if callable(size) else size, "update")
            if member.num_examples <= 0:
                raise ValueError(f"example count {member.num_examples} is not positive")
        except ValueError as err:
            rejected.append(Rejection(member.name, str(err), fault=True))
            continue
        accepted.append(member)
    return accepted, rejected


def gather_plaintext(
    members: list[Member],
    size: Callable[[Member], int],
    server_deltas: Callable[[list[Member]], list[np.ndarray]],
    weights: Callable[[list[int]], list[float]],
) -> Gathered:
    """Screen the members' updates and make each accepted one a unit of one (server coordinates),
    weighted by `weights` of their claimed example counts (fedlora/aggregate/weights.py)."""
    accepted, rejected = screen(members, size)
    units = single_units([m.name for m in accepted], server_deltas(accepted), weights([m.num_examples for m in accepted])) if accepted else []
    uploaded = int(sum(m.vector.nbytes for m in members if isinstance(m.vector, np.ndarray)))
    return Gathered(units, accepted, rejected, bytes_up=uploaded)
