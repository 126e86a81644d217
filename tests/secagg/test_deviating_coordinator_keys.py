"""Issue 22, attack 1, written as the attacker: a coordinator that substitutes keys or adds members.

Before identities, a coordinator relayed its own receiving keys in place of the target's
neighbours' keys, opened the target's share bundles, re-sealed them to the real neighbours and
later unmasked the target. Now every advertised key is signed with its owner's signing key,
certified by its registered node key, and every site checks certificate, signature and roster
fingerprint: the target refuses, blames the coordinator with evidence in its events.jsonl, and
seals nothing under the substituted keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedlora.pki import CURVE, key_fingerprint, load_node_public_key
from fedlora.secagg import crypto
from fedlora.secagg.identity import certify, key_statement, make_card, open_card
from fedlora.secagg.messages import KeysAdvert, KeysRelay
from participant.site import KNOWN_CARDS, SIGNING_KEY, site_identity
from tests.secagg.deviating import Federation, events

TARGET = 0


def _coordinator_card(node_public: ec.EllipticCurvePublicKey | None = None) -> tuple[ed25519.Ed25519PrivateKey, bytes, ec.EllipticCurvePrivateKey]:
    """A signing key of the coordinator's and its card, certified by the coordinator's own node key;
    presented under `node_public` (someone else's roster key) when given, so the certificate is forged."""
    node, signing = ec.generate_private_key(CURVE()), ed25519.Ed25519PrivateKey.generate()
    return signing, make_card(node_public or node.public_key(), signing.public_key(), certify(node, signing.public_key())), node


def _substitute(fed: Federation, relay: KeysRelay, resign: str) -> KeysRelay:
    """The target's relay with the coordinator's own receiving keys; `resign`: "no" keeps the real
    signatures, "own-card" signs with a card of the coordinator's own, "forged-card" with a card
    that names each neighbour's real node key over a certificate the coordinator made."""
    ours = [crypto.generate_keypair()[1] for _ in relay.ids]
    if resign == "no":
        return dataclasses.replace(relay, c_publics=ours)
    cards, signatures = [], []
    for j, s, c in zip(relay.ids, relay.s_publics, ours, strict=True):
        victim = load_node_public_key(fed.sites[j] / "node.pub") if resign == "forged-card" else None
        signing, card, _ = _coordinator_card(victim)
        cards.append(card)
        signatures.append(signing.sign(key_statement(fed.server.params, j, TARGET, s, c)))
    return dataclasses.replace(relay, c_publics=ours, identities=cards, signatures=signatures)


@pytest.mark.parametrize("resign", ["no", "own-card", "forged-card"])
def test_receiving_keys_substituted_by_the_coordinator_are_refused_and_blamed_on_it(tmp_path: Path, resign: str) -> None:
    fed = Federation(tmp_path)
    adverts = fed.answers("setup", fed.send("setup", fed.server.setup()))
    relays = fed.server.collect_keys(adverts)
    assert not fed.server.blamed  # every honest advert is signed by a roster key
    target = next(r for r in relays if r.receiver == TARGET)
    relays[relays.index(target)] = _substitute(fed, target, resign)
    replies = fed.send("share_keys", relays)
    # The target seals nothing to the substituted keys: its reply is a refusal naming the coordinator.
    assert replies[TARGET].has_error() and "coordinator" in replies[TARGET].error.reason
    why = {"no": "signature does not verify", "own-card": "not 'participant-", "forged-card": "certificate does not verify"}[resign]
    assert why in replies[TARGET].error.reason
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
    signing, card, node = _coordinator_card()
    adverts[2] = dataclasses.replace(adverts[2], identity=card, signatures=[signing.sign(b"anything") for _ in adverts[2].signatures])
    relays = fed.server.collect_keys(adverts)
    assert list(fed.server.blamed) == [2] and key_fingerprint(node.public_key()) in fed.server.blamed[2]
    assert all(2 not in r.ids for r in relays)


def test_an_honest_coordinator_completes_with_pinned_rosters_and_dropouts(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=5)
    result = fed.honest_sum({(1, "mask_input"), (3, "unmask")})
    (unit,) = result.buckets
    assert sorted(unit.members) == ["participant-0", "participant-2", "participant-3", "participant-4"]
    assert [r["participant"] for r in result.recovered] == ["participant-3"]
    assert not any(events(site) for site in fed.sites.values())
    # Each site signed with its own signing key, kept private, and the same card every time
    # (a deterministic certificate); it remembers the cards it checked, so a new process does
    # not check their certificates again.
    cards = {i: site_identity(directory).card for i, directory in fed.sites.items()}
    for i, directory in fed.sites.items():
        assert (directory / SIGNING_KEY).stat().st_mode & 0o777 == 0o600
        identity = site_identity(directory)
        assert identity.card == cards[i]
        assert set(identity.known) == {cards[j] for j in cards if j != i}  # complete graph: every other member
        assert sorted(json.loads((directory / KNOWN_CARDS).read_text())) == sorted(c.hex() for c in identity.known)


def test_a_truncated_or_foreign_card_is_refused(tmp_path: Path) -> None:
    signing, card, _ = _coordinator_card()
    for bad in (card[:20], card[:40], card[:-5]):
        with pytest.raises(ValueError):
            open_card(bad, {})
    assert open_card(card, {}).signing_key.public_bytes_raw() == signing.public_key().public_bytes_raw()
