"""Issue 22, attack 2, written as the attacker: a coordinator that tells neighbours different survivor sets.

Before the consistency check, a coordinator told some of the target's neighbours that it
survived (they revealed its self-mask shares) and others that it dropped (they revealed the
shares of its masking key), and so unmasked the target alone. Now every survivor signs the set
it was told and reveals a share only with signatures on that same set from a majority of the
bucket (and at least t; Bonawitz et al., CCS 2017, round 4): those told another story refuse,
blame the coordinator with evidence, and the shares that would open the target never leave. On
a sparse graph (Bell et al., CCS 2020) a neighbourhood's t signatures would not do: two regions
of the bucket can each hold t of every member's neighbourhood, but not each a majority.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedlora.secagg.messages import UnmaskRequest
from tests.secagg.deviating import Federation, events

TARGET = 0
TOLD_SURVIVED, TOLD_DROPPED = (0, 1, 2), (3, 4)


def _to_consistency(fed: Federation) -> list:
    """Run setup, key and share exchange and masking honestly; the survivor-set requests."""
    relays = fed.server.collect_keys(fed.answers("setup", fed.send("setup", fed.server.setup())))
    shares = fed.server.collect_shares(fed.answers("share_keys", fed.send("share_keys", relays)))
    return fed.server.collect_masked(fed.answers("mask_input", fed.send("mask_input", shares)))


@pytest.mark.parametrize("relay", ["other-camps-signatures", "own-camp-only"])
def test_survivor_sets_that_differ_between_neighbours_are_refused_before_any_share_of_the_target(tmp_path: Path, relay: str) -> None:
    fed = Federation(tmp_path, n=5)  # complete graph: every member holds shares of the target
    t = fed.server.threshold
    asks = _to_consistency(fed)
    everyone = sorted(asks[0].survivors)
    without_target = [i for i in everyone if i != TARGET]
    told = [dataclasses.replace(a, survivors=everyone if a.receiver in TOLD_SURVIVED else without_target) for a in asks]
    signatures = {s.sender: s.signature for s in fed.answers("consistency", fed.send("consistency", told))}
    assert sorted(signatures) == everyone  # each signs the one story it was told

    def unmask_request(i: int) -> UnmaskRequest:
        camp = TOLD_SURVIVED if i in TOLD_SURVIVED else TOLD_DROPPED
        others = [j for j in everyone if j != i and (relay == "other-camps-signatures" or j in camp)]
        dropped = [TARGET] if i in TOLD_DROPPED else []
        survived = [j for j in everyone if j != i and j not in dropped]
        return UnmaskRequest(fed.server.round_id, i, survived, dropped, others, [signatures[j] for j in others], [fed.server.identities[j] for j in others])

    replies = fed.send("unmask", [unmask_request(i) for i in everyone])
    revealed = {i: fed.answers("unmask", {i: replies[i]})[0] for i in everyone if not replies[i].has_error()}
    # Those told the target dropped refuse, blaming the coordinator with evidence ...
    for i in TOLD_DROPPED:
        assert replies[i].has_error() and "coordinator" in replies[i].error.reason
        (blame,) = events(fed.sites[i])
        assert blame["evidence"]["signed_survivors"] == without_target
        assert fed.state(i)["stage"] == "aborted" and fed.state(i)["held_s_shares"] == []
    # ... so the coordinator holds no share of the target's masking key: its pairwise masks stay on.
    s_shares_of_target = sum(TARGET in r.s_owners for r in revealed.values())
    assert s_shares_of_target == 0 < t
    if relay == "other-camps-signatures":  # those told it survived also see signatures on another set
        assert all(replies[i].has_error() for i in TOLD_SURVIVED) and not revealed
        assert all(events(fed.sites[i]) for i in TOLD_SURVIVED)


def test_an_unmask_request_that_contradicts_the_signed_set_is_refused(tmp_path: Path) -> None:
    # A consistent story at the check, another one at unmask: the target "dropped" after all.
    fed = Federation(tmp_path, n=5)
    asks = _to_consistency(fed)
    fed.server.collect_signatures(fed.answers("consistency", fed.send("consistency", asks)))
    honest = fed.server.asked[3]
    greedy = dataclasses.replace(honest, survived=[j for j in honest.survived if j != TARGET], dropped=[TARGET])
    reply = fed.send("unmask", [greedy])[3]
    assert reply.has_error() and "otherwise than the survivor set it signed" in reply.error.reason
    (blame,) = events(fed.sites[3])
    assert blame["evidence"]["dropped"] == [TARGET]


def test_an_honest_run_completes_when_survivors_vanish_before_and_at_the_consistency_check(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=6)
    result = fed.honest_sum({(1, "mask_input"), (4, "consistency")})
    (unit,) = result.buckets
    assert sorted(unit.members) == [f"participant-{i}" for i in (0, 2, 3, 4, 5)]  # 4 masked: in the sum
    assert [r["participant"] for r in result.recovered] == ["participant-4"]
    assert not any(events(site) for site in fed.sites.values())


@pytest.mark.parametrize("relay", ["other-regions-signatures", "own-region-only"])
def test_a_sparse_bucket_split_into_two_regions_reveals_nothing_of_the_target(tmp_path: Path, relay: str) -> None:
    # 12 members on a degree-4 graph (t = 3): the coordinator tells one half that the target
    # survived, the other half that it dropped, and relays to each only what suits its story.
    fed = Federation(tmp_path, n=12, degree=4)
    asks = _to_consistency(fed)
    everyone = sorted(asks[0].survivors)
    without_target = [i for i in everyone if i != TARGET]
    told_survived = set(everyone[:6])  # the target's half
    told = [dataclasses.replace(a, survivors=everyone if a.receiver in told_survived else without_target) for a in asks]
    signatures = {s.sender: s.signature for s in fed.answers("consistency", fed.send("consistency", told))}

    def unmask_request(i: int) -> UnmaskRequest:
        mine = i in told_survived
        others = [j for j in everyone if j != i and (relay == "other-regions-signatures" or (j in told_survived) == mine)]
        own_neighbours = fed.server.relayed[i]
        dropped = [] if mine else [j for j in own_neighbours if j == TARGET]
        survived = [j for j in own_neighbours if j not in dropped]
        return UnmaskRequest(fed.server.round_id, i, survived, dropped, others, [signatures[j] for j in others], [fed.server.identities[j] for j in others])

    replies = fed.send("unmask", [unmask_request(i) for i in everyone])
    # Six signatures on either story are not the seven (a majority of 12) a member needs: nobody
    # reveals anything, each blames the coordinator, and every secret is erased.
    assert all(replies[i].has_error() and "coordinator" in replies[i].error.reason for i in everyone)
    for i in everyone:
        (blame,) = events(fed.sites[i])
        assert blame["evidence"]["signed_survivors"] == (everyone if i in told_survived else without_target)
        assert fed.state(i)["stage"] == "aborted" and fed.state(i)["held_s_shares"] == [] and fed.state(i)["held_b_shares"] == []
    why = "7 of 12 members must have signed it" if relay == "own-region-only" else "inconsistent views"
    assert all(why in replies[i].error.reason for i in everyone)
