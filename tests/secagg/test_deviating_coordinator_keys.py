"""Issue 22, attack 1, written as the attacker: a coordinator that substitutes keys or adds members.

Before identities, a coordinator relayed its own receiving keys in place of the target's
neighbours' keys, opened the target's share bundles, re-sealed them to the real neighbours and
later unmasked the target. Now every advertised key is signed with its owner's registered node
key and every site checks the signature against its pinned roster: the target refuses, blames
the coordinator with evidence in its events.jsonl, and seals nothing under the substituted keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.pki import CURVE
from fedlora.secagg import crypto
from fedlora.secagg.identity import encode_public, fingerprint, key_statement
from fedlora.secagg.messages import KeysAdvert, KeysRelay
from tests.secagg.deviating import Federation, events

TARGET = 0


def _substitute(fed: Federation, relay: KeysRelay, resign: bool) -> KeysRelay:
    """The target's relay with the coordinator's own receiving keys; `resign`: signed with the
    coordinator's own P-384 key (presented as the neighbours' identity), else the real signatures kept."""
    ours = [crypto.generate_keypair()[1] for _ in relay.ids]
    if not resign:
        return dataclasses.replace(relay, c_publics=ours)
    key = ec.generate_private_key(CURVE())
    params = fed.server.params
    signatures = [key.sign(key_statement(params, j, TARGET, s, c), ec.ECDSA(hashes.SHA384())) for j, s, c in zip(relay.ids, relay.s_publics, ours)]
    return dataclasses.replace(relay, c_publics=ours, identities=[encode_public(key.public_key())] * len(ours), signatures=signatures)


@pytest.mark.parametrize("resign", [False, True], ids=["neighbours-signatures-kept", "signed-by-the-coordinator"])
def test_receiving_keys_substituted_by_the_coordinator_are_refused_and_blamed_on_it(tmp_path: Path, resign: bool) -> None:
    fed = Federation(tmp_path)
    adverts = fed.answers("setup", fed.send("setup", fed.server.setup()))
    relays = fed.server.collect_keys(adverts)
    assert not fed.server.blamed  # every honest advert is signed by a roster key
    target = next(r for r in relays if r.receiver == TARGET)
    relays[relays.index(target)] = _substitute(fed, target, resign)
    replies = fed.send("share_keys", relays)
    # The target seals nothing to the substituted keys: its reply is a refusal naming the coordinator.
    assert replies[TARGET].has_error() and "coordinator" in replies[TARGET].error.reason
    assert all(not replies[i].has_error() for i in range(1, fed.n))
    (blame,) = events(fed.sites[TARGET])
    owner = target.ids[0]
    assert blame["evidence"]["owner"] == owner and blame["evidence"]["owner_name"] == f"participant-{owner}"
    assert blame["evidence"]["roster_fingerprint"] == fed.roster.members[f"participant-{owner}"]
    assert blame["evidence"]["c_public"] != target.c_publics[0].hex()
    # The instance is aborted at the target, every secret erased, nothing held for later stages.
    state = fed.state(TARGET)
    assert state["stage"] == "aborted" and state["s_private"] == b"" and state["b_seed"] == b""
    assert all(not events(fed.sites[i]) for i in range(1, fed.n))  # nobody else blames anyone


def test_a_member_not_on_the_roster_is_refused_at_setup(tmp_path: Path) -> None:
    # A Sybil: the coordinator names a member of its own ("mallory") in the instance.
    fed = Federation(tmp_path, n=4)
    setups = fed.server.setup()
    sybil = [dataclasses.replace(s, member_names=[*s.member_names[:-1], "mallory"]) for s in setups[:-1]]
    replies = fed.send("setup", sybil)
    for i in range(3):
        assert replies[i].has_error() and "not on this site's roster" in replies[i].error.reason
        (blame,) = events(fed.sites[i])
        assert blame["evidence"]["not_on_roster"] == ["mallory"]


def test_a_site_named_as_another_member_refuses_to_sign_for_it(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=4)
    setups = fed.server.setup()
    swapped = dataclasses.replace(setups[0], member_names=[setups[0].member_names[1], setups[0].member_names[0], *setups[0].member_names[2:]])
    reply = fed.send("setup", [swapped])[0]
    assert reply.has_error() and "names this participant 'participant-1'" in reply.error.reason


def test_the_checking_server_blames_a_participant_whose_identity_is_not_its_roster_key(tmp_path: Path) -> None:
    # A participant that signs with a key of its own would make honest neighbours blame the
    # coordinator; the honest coordinator checks the roster first and blames the participant.
    fed = Federation(tmp_path, n=4)
    adverts: list[KeysAdvert] = fed.answers("setup", fed.send("setup", fed.server.setup()))
    key = ec.generate_private_key(CURVE())
    adverts[2] = dataclasses.replace(adverts[2], identity=encode_public(key.public_key()))
    relays = fed.server.collect_keys(adverts)
    assert list(fed.server.blamed) == [2] and fingerprint(adverts[2].identity) in fed.server.blamed[2]
    assert all(2 not in r.ids for r in relays)


def test_an_honest_coordinator_completes_with_pinned_rosters_and_dropouts(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=5)
    result = fed.honest_sum({(1, "mask_input"), (3, "unmask")})
    (unit,) = result.buckets
    assert sorted(unit.members) == ["participant-0", "participant-2", "participant-3", "participant-4"]
    assert [r["participant"] for r in result.recovered] == ["participant-3"]
    assert not any(events(site) for site in fed.sites.values())
