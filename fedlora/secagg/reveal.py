"""Participant stage 5: reveal shares for the server to unmask the sum, then forget every secret."""

from __future__ import annotations

import dataclasses

from .errors import SecAggAbort, SecAggProtocolError
from .guards import check_ids, expect
from .messages import ParticipantState, UnmaskRequest, UnmaskResponse


def unmask(state: ParticipantState, request: UnmaskRequest) -> tuple[ParticipantState, UnmaskResponse]:
    """Stage 5: b-shares of survivors (and own), s-shares of dropped; never both for one."""
    me = state.participant_id
    if state.stage == "unmasked":
        raise SecAggProtocolError(
            None, f"participant {me} already answered an unmask request; refusing a second"
        )
    expect(state, "masked", request.round_id, request.receiver)
    survived = [j for j in request.survived if j != me]
    check_ids(survived, "survivors")
    check_ids(request.dropped, "dropped")
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
    return erase_secrets(state), response


def erase_secrets(state: ParticipantState, stage: str = "unmasked") -> ParticipantState:
    """The state after unmask (or an abort): public facts only, so a later leak of it reveals nothing."""
    return dataclasses.replace(
        state,
        stage=stage,
        s_private=b"",
        c_privates=[],
        b_seed=b"",
        own_b_share=b"",
        held_b_shares=[],
        held_s_shares=[],
    )
