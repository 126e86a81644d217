"""Checks every participant stage makes on a request before acting on it."""

from __future__ import annotations

from .errors import SecAggProtocolError
from .messages import ParticipantState


def check_ids(ids: list[int], what: str) -> None:
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise SecAggProtocolError(None, f"{what} must be distinct non-negative ids, got {ids}")


def expect(state: ParticipantState, stage: str, round_id: str, receiver: int) -> None:
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
