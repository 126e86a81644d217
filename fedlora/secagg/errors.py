"""Exceptions raised by the secure-aggregation protocol.

A *protocol error* is what a participant raises when a request or a relayed message is
invalid; it names the party held responsible where the participant can tell. (The server does
not raise it: it books a violation in `SecAggServer.blamed` and treats the sender as dropped.)
An *abort* means too few participants remain for the threshold to hold, so the round must end
with the global state unchanged (Bonawitz et al., CCS 2017, §4).
"""

from __future__ import annotations

from typing import Any


class SecAggError(Exception):
    """Base class of every secure-aggregation failure."""


class SecAggProtocolError(SecAggError):
    """A message broke the protocol; `participant` names the sender held responsible."""

    def __init__(self, participant: int | None, message: str) -> None:
        self.participant = participant
        who = f"participant {participant}" if participant is not None else "protocol"
        super().__init__(f"{who}: {message}")


class SecAggAbort(SecAggError):
    """The round cannot complete securely (e.g. fewer than `threshold` survivors)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class SecAggCoordinatorFault(SecAggError):
    """What the coordinator relayed proves it deviated (a key not signed by its roster owner,
    survivor sets that differ): the participant aborts the instance. `evidence` is plain JSON that
    lets a third party check the claim (signatures, keys, the instance's parameter digest)."""

    def __init__(self, message: str, evidence: dict[str, Any]) -> None:
        self.evidence = evidence
        super().__init__(f"coordinator: {message}")
