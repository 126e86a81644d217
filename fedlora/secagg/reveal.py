"""Participant stages 5 and 6: sign the survivor set (ConsistencyCheck), then reveal shares.

A server that tells different neighbours different stories about who dropped can collect
both the self-mask shares of a target (from those told it survived) and the shares that remove
its pairwise masks (from those told its neighbours dropped), and unmask its update alone.
Bonawitz et al. (CCS 2017, round 4 "ConsistencyCheck") stop this: every survivor signs the
survivor set it was told, and reveals a share only after seeing at least t valid signatures on
that same set. Over the sparse graphs of Bell et al. (CCS 2020) the t signatures come from the
participant's own neighbourhood (itself included), whose keys it checked against its roster at
stage 3. The unmask request must then agree with the signed set: b-shares only of members in
it, s-shares only of members not in it. Anything else is the relay's doing (the server checks
every signature before relaying it), so it blames the coordinator, with evidence.
"""

from __future__ import annotations

import dataclasses

from .errors import SecAggAbort, SecAggCoordinatorFault, SecAggProtocolError
from .guards import check_ids, expect
from .identity import Identity, check_signed, survivor_statement
from .messages import ParticipantState, SurvivorsRequest, SurvivorsSignature, UnmaskRequest, UnmaskResponse


def sign_survivors(
    state: ParticipantState, request: SurvivorsRequest, identity: Identity
) -> tuple[ParticipantState, SurvivorsSignature]:
    """Stage 5: sign the survivor set the server states; an honest participant signs only one."""
    expect(state, "masked", request.round_id, request.receiver)
    me = state.participant_id
    check_ids(request.survivors, "survivors")
    if me not in request.survivors:
        raise SecAggProtocolError(None, f"asked {me} to sign a survivor set without itself, after it masked; refusing")
    survivors = sorted(request.survivors)
    signature = identity.sign(survivor_statement(state.params, survivors))
    new = dataclasses.replace(state, stage="signed", survivors=survivors)
    return new, SurvivorsSignature(state.round_id, me, signature)


def _inconsistent(state: ParticipantState, what: str, **evidence: object) -> SecAggCoordinatorFault:
    return SecAggCoordinatorFault(
        f"{what} (participant {state.participant_id}, instance {state.round_id!r}); revealing nothing",
        {"round_id": state.round_id, "params": state.params.hex(), "signed_survivors": list(state.survivors), **evidence},
    )


def signatures_needed(state: ParticipantState) -> int:
    """Valid signatures on the survivor set (its own included) before revealing: a majority of the
    instance's members, and at least t."""
    return max(state.threshold, len(state.members) // 2 + 1)


def check_survivors(state: ParticipantState, request: UnmaskRequest, identity: Identity) -> None:
    """A majority of members' signatures on the set this participant signed, and a request that agrees with it."""
    signed = set(state.survivors)
    disagree = sorted({j for j in request.survived if j not in signed} | {j for j in request.dropped if j in signed})
    if disagree:
        raise _inconsistent(state, f"unmask request treats {disagree} otherwise than the survivor set it signed",
                            survived=list(request.survived), dropped=list(request.dropped))
    if not len(request.signers) == len(request.signatures) == len(request.signer_identities) or len(set(request.signers)) != len(request.signers):
        raise _inconsistent(state, "relayed a malformed list of survivor-set signatures", signers=list(request.signers))
    statement = survivor_statement(state.params, state.survivors)
    for j, signature, card in zip(request.signers, request.signatures, request.signer_identities, strict=True):
        if j not in state.members or j == state.participant_id:
            raise _inconsistent(state, f"relayed a survivor-set signature of {j}, not another member of the instance", signer=j)
        name = state.member_names[state.members.index(j)]
        fault = check_signed(identity.roster, name, card, signature, statement, identity.known)
        if fault:
            raise _inconsistent(
                state, f"member {j} ({name!r}) did not sign the survivor set this participant was told ({fault}): inconsistent views",
                signer=j, signer_name=name, signature=signature.hex(), card=card.hex(),
            )
    need = signatures_needed(state)
    if len(request.signers) + 1 < need:
        raise _inconsistent(state, f"relayed {len(request.signers)} members' signatures on the survivor set; "
                            f"{need} of {len(state.members)} members must have signed it", signers=list(request.signers))


def unmask(state: ParticipantState, request: UnmaskRequest, identity: Identity) -> tuple[ParticipantState, UnmaskResponse]:
    """Stage 6: after the consistency check, b-shares of survivors (and own), s-shares of dropped; never both for one."""
    me = state.participant_id
    if state.stage == "unmasked":
        raise SecAggProtocolError(
            None, f"participant {me} already answered an unmask request; refusing a second"
        )
    expect(state, "signed", request.round_id, request.receiver)
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
    check_survivors(state, request, identity)
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
