"""Misbehaving participants are caught and blamed; honest ones are never blamed and never leak.

Each fault ends one of two ways: the party at fault is named in `server.blamed` and the sum of
everyone else comes out exact, or the sum is refused. A deviating coordinator is simulated
where the protocol's safety rests on what every honest participant checks by itself.
"""

import dataclasses
import os

import numpy as np
import pytest

from fedlora.secagg import SecAggAbort, SecAggProtocolError, crypto, shamir
from fedlora.secagg import participant as part
from fedlora.secagg.errors import SecAggCoordinatorFault
from fedlora.secagg.identity import bundle_statement, key_statement, simulated_identity
from fedlora.secagg.messages import KeysRelay, SetupRequest, SharesRelay
from fedlora.secagg.prg import apply_mask
from fedlora.secagg.server import CIPHERTEXT_BYTES
from tests.secagg.test_secagg_primitives import LOW_ORDER
from tests.secagg.test_secagg_sum import _chi2


def _by(msgs, who, attr="receiver"):
    return next(m for m in msgs if getattr(m, attr) == who)


def _replace(msgs, who, attr="sender", **changes):
    old = _by(msgs, who, attr)
    msgs[msgs.index(old)] = dataclasses.replace(old, **changes)


def _signed_by_sender(rnd, upload):
    """A malicious sender signs the bundles it sends, bad ones included (the relay cannot)."""
    state = rnd.states[upload.sender]
    signatures = [
        rnd.identities[upload.sender].sign(bundle_statement(
            state.params, upload.sender, j, state.s_public, rnd.server.receiving[(j, upload.sender)], blob, b_c, s_c))
        for j, blob, b_c, s_c in zip(upload.receivers, upload.ciphertexts, upload.b_share_commitments, upload.s_share_commitments)
    ]
    return dataclasses.replace(upload, signatures=signatures)


# --- keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["masking key", "receiving key"])
@pytest.mark.parametrize("low", LOW_ORDER[:3], ids=["u=0", "u=1", "order-8"])
def test_a_low_order_key_is_blamed_on_its_advertiser_and_the_rest_summed(make_round, which, low):
    rnd = make_round(n=5)
    adverts = rnd.adverts()
    if which == "masking key":
        _replace(adverts, 2, s_public=low)
    else:
        bad = _by(adverts, 2, "sender")
        _replace(adverts, 2, c_publics=[low, *bad.c_publics[1:]])
    relays = rnd.server.collect_keys(adverts)
    assert list(rnd.server.blamed) == [2] and "low order" in rnd.server.blamed[2]
    assert all(2 not in r.ids for r in relays)
    rnd.check_sum(rnd.finish(relays), [0, 1, 3, 4])


def test_a_non_canonical_key_is_blamed_on_its_advertiser(make_round):
    rnd = make_round(n=4)
    adverts = rnd.adverts()
    key = _by(adverts, 1, "sender").s_public
    _replace(adverts, 1, s_public=key[:-1] + bytes([key[-1] | 0x80]))  # the same point, re-encoded
    rnd.server.collect_keys(adverts)
    assert list(rnd.server.blamed) == [1] and "canonical" in rnd.server.blamed[1]


def test_a_copied_key_is_blamed_on_the_copier_never_on_its_owner(make_round):
    rnd = make_round(n=5)
    adverts = rnd.adverts()
    _replace(adverts, 3, s_public=_by(adverts, 1, "sender").s_public)
    relays = rnd.server.collect_keys(adverts)
    assert list(rnd.server.blamed) == [3] and "possession" in rnd.server.blamed[3]
    rnd.check_sum(rnd.finish(relays), [0, 1, 2, 4])


def test_participants_sharing_a_private_key_are_all_blamed(make_round):
    # Both prove possession, so both hold the key: neither is an honest participant.
    rnd = make_round(n=6)
    adverts = rnd.adverts()
    twin = rnd.states[3]
    state = dataclasses.replace(rnd.states[4], s_private=twin.s_private, s_public=twin.s_public)
    rnd.states[4] = state
    proof = crypto.possession_proof([state.s_private, *state.c_privates], rnd.setups[4].server_public, state.params, 4)
    mine = _by(adverts, 4, "sender")
    signatures = [rnd.identities[4].sign(key_statement(state.params, 4, j, twin.s_public, c)) for j, c in zip(mine.c_ids, mine.c_publics)]
    _replace(adverts, 4, s_public=twin.s_public, possession=proof, signatures=signatures)
    relays = rnd.server.collect_keys(adverts)
    assert sorted(rnd.server.blamed) == [3, 4] and "all hold" in rnd.server.blamed[4]
    rnd.check_sum(rnd.finish(relays), [0, 1, 2, 5])


def _signed_by_owner(rnd, relay, m, s_public):
    """`relay` with its m-th owner's masking key replaced by `s_public`, signed by that owner."""
    j, params = relay.ids[m], rnd.states[relay.receiver].params
    signature = rnd.identities[j].sign(key_statement(params, j, relay.receiver, s_public, relay.c_publics[m]))
    swap = lambda xs, x: [*xs[:m], x, *xs[m + 1:]]  # noqa: E731
    return dataclasses.replace(relay, s_publics=swap(relay.s_publics, s_public), signatures=swap(relay.signatures, signature))


def test_a_participant_refuses_relayed_keys_that_are_not_distinct(make_round):
    # The owner signed the copied key, so it is blamed (not the relay).
    rnd = make_round(n=4)
    relay = _by(rnd.server.collect_keys(rnd.adverts()), 0)
    doubled = _signed_by_owner(rnd, relay, 1, relay.s_publics[0])
    with pytest.raises(SecAggProtocolError, match="not distinct") as err:
        part.share_keys(rnd.states[0], doubled, rnd.identities[0])
    assert err.value.participant == relay.ids[1]
    own = _signed_by_owner(rnd, relay, 0, rnd.states[0].s_public)
    with pytest.raises(SecAggProtocolError, match="not distinct") as err:
        part.share_keys(rnd.states[0], own, rnd.identities[0])
    assert err.value.participant == relay.ids[0]


# --- share bundles -----------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["garbage ciphertext", "replayed ciphertext", "broken commitment"])
def test_a_bad_bundle_to_one_neighbour_is_blamed_on_its_sender(make_round, fault):
    rnd = make_round(n=6)  # complete graph, t = 4
    uploads = rnd.uploads(rnd.server.collect_keys(rnd.adverts()))
    up = _by(uploads, 2, "sender")
    pos = up.receivers.index(0)
    if fault == "broken commitment":
        commits = list(up.b_share_commitments)
        commits[pos] = os.urandom(32)
        _replace(uploads, 2, b_share_commitments=commits)
    else:
        cts = list(up.ciphertexts)
        cts[pos] = os.urandom(CIPHERTEXT_BYTES) if fault == "garbage ciphertext" else up.ciphertexts[up.receivers.index(1)]
        _replace(uploads, 2, ciphertexts=cts)
    _replace(uploads, 2, signatures=_signed_by_sender(rnd, _by(uploads, 2, "sender")).signatures)
    masked = rnd.masked(rnd.server.collect_shares(uploads))
    assert _by(masked, 0, "sender").accused == [2]
    asks = rnd.asks(masked)
    assert list(rnd.server.blamed) == [2] and "bad share bundle" in rnd.server.blamed[2]
    assert 2 not in _by(asks, 0).dropped  # 0 is never asked for shares it does not hold
    rnd.check_sum(rnd.server.collect_unmask(rnd.responses(asks)), [0, 1, 3, 4, 5])


@pytest.mark.parametrize("evidence", ["its real key", "a made-up key"])
def test_a_false_accusation_is_blamed_on_the_accuser(make_round, evidence):
    rnd = make_round(n=6)
    masked = rnd.masked(rnd.to_share_relays())
    state = rnd.states[0]
    key = state.c_privates[state.neighbours.index(2)] if evidence == "its real key" else crypto.generate_keypair()[0]
    _replace(masked, 0, accused=[2], revealed_keys=[key])
    asks = rnd.asks(masked)
    assert list(rnd.server.blamed) == [0]
    rnd.check_sum(rnd.server.collect_unmask(rnd.responses(asks)), [1, 2, 3, 4, 5])


def test_a_bundle_that_does_not_open_is_left_out_and_its_sender_accused(make_round):
    rnd = make_round(n=4)
    relays = rnd.to_share_relays()
    to0 = _by(relays, 0)
    pos = to0.senders.index(2)
    blob = bytearray(to0.ciphertexts[pos])
    blob[60] ^= 1
    cts = list(to0.ciphertexts)
    cts[pos] = bytes(blob)
    sigs = list(to0.signatures)  # its sender signed it: the bundle is the sender's fault
    s2 = rnd.states[2]
    receiving = crypto.public_from_private(rnd.states[0].c_privates[rnd.states[0].neighbours.index(2)])
    sigs[pos] = rnd.identities[2].sign(bundle_statement(s2.params, 2, 0, s2.s_public, receiving, bytes(blob), to0.b_share_commitments[pos], to0.s_share_commitments[pos]))
    state, y = part.mask_input(rnd.states[0], dataclasses.replace(to0, ciphertexts=cts, signatures=sigs), rnd.vectors[0])
    assert y.accused == [2] and 2 not in state.share_owners
    assert crypto.public_from_private(y.revealed_keys[0]) != state.s_public  # a receiving key, not the masking key


# --- unmask --------------------------------------------------------------------------------

def test_one_bad_share_at_unmask_is_blamed_on_its_holder_and_the_sum_completes(make_round):
    rnd = make_round(n=6)
    responses = rnd.responses(rnd.to_unmask())
    r1 = _by(responses, 1, "sender")
    shares = list(r1.b_shares)
    shares[r1.b_owners.index(3)] = os.urandom(shamir.SHARE_BYTES - 1) + b"\x01"
    _replace(responses, 1, b_shares=shares)
    result = rnd.server.collect_unmask(responses)
    assert list(result.blamed) == [1] and "never dealt" in result.blamed[1]
    rnd.check_sum(result, list(range(6)))


def test_shares_dealt_inconsistently_are_blamed_on_their_dealer(make_round):
    # Owner 3 commits to and seals a wrong b-share for holder 1: 1 cannot tell, its revealed share
    # matches the commitment, and decoding over all shares finds it off the polynomial.
    rnd = make_round(n=6)
    key_relays = rnd.server.collect_keys(rnd.adverts())
    uploads = rnd.uploads(key_relays)
    up, owner = _by(uploads, 3, "sender"), rnd.states[3]
    pos = up.receivers.index(1)
    holder = rnd.states[1]
    _, s_share = part.open_bundle(
        owner.params, holder.c_privates[holder.neighbours.index(3)], up.ciphertexts[pos], 3, 1,
        owner.s_public, up.b_share_commitments[pos], up.s_share_commitments[pos],
    )
    wrong = (int.from_bytes(os.urandom(64), "big") % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
    receiving = _by(key_relays, 3).c_publics[_by(key_relays, 3).ids.index(1)]
    cts, commits = list(up.ciphertexts), list(up.b_share_commitments)
    cts[pos] = crypto.seal_bundle(receiving, wrong + s_share, owner.params, 3, 1, owner.s_public)
    commits[pos] = crypto.commit_share(owner.params, 3, 1, b"b", wrong)
    _replace(uploads, 3, ciphertexts=cts, b_share_commitments=commits)
    _replace(uploads, 3, signatures=_signed_by_sender(rnd, _by(uploads, 3, "sender")).signatures)  # the dealer signs what it deals
    asks = rnd.asks(rnd.masked(rnd.server.collect_shares(uploads)))
    result = rnd.server.collect_unmask(rnd.responses(asks))
    assert list(result.blamed) == [3] and "inconsistent" in result.blamed[3]
    rnd.check_sum(result, list(range(6)))


def test_a_dealer_whose_consistent_shares_decode_to_another_seed_than_its_commitment_is_blamed(make_round):
    # Owner 2 deals honest, consistent shares of its self-mask seed but commits to another seed:
    # every share matches, decoding finds nothing off the polynomial, only the commitment check
    # can tell. The seed the shares give would leave 2's real self-mask in the sum, so the bucket
    # aborts, and 2, not a holder, is blamed.
    rnd = make_round(n=5)
    uploads = rnd.uploads(rnd.server.collect_keys(rnd.adverts()))
    _replace(uploads, 2, b_commitment=crypto.commit_seed(rnd.states[2].params, 2, os.urandom(32)))
    asks = rnd.asks(rnd.masked(rnd.server.collect_shares(uploads)))
    with pytest.raises(SecAggAbort, match="self-mask of 2 cannot be removed"):
        rnd.server.collect_unmask(rnd.responses(asks))
    assert list(rnd.server.blamed) == [2] and "does not match its commitment" in rnd.server.blamed[2]


def test_a_sum_whose_masks_do_not_cancel_is_refused_by_the_count_slot(make_round):
    # A participant that masks with anything but its agreed seeds turns the sum into noise; the
    # server cannot tell whose input it was, but it refuses the noise instead of publishing it.
    rnd = make_round(n=5)
    masked = rnd.masked(rnd.to_share_relays())
    noise = np.random.default_rng(0).integers(0, 2**32, size=rnd.d + 1, dtype=np.uint32)
    _replace(masked, 2, masked=noise)
    asks = rnd.asks(masked)
    with pytest.raises(SecAggAbort, match="count slot"):
        rnd.server.collect_unmask(rnd.responses(asks))


def test_malformed_or_unexpected_replies_are_blamed_and_ignored(make_round):
    rnd = make_round(n=5)
    masked = rnd.masked(rnd.to_share_relays())
    wrong = [dataclasses.replace(m, masked=m.masked[:-1]) if m.sender == 1 else m for m in masked]
    stranger = dataclasses.replace(masked[0], sender=99)
    asks = rnd.asks([*wrong, stranger])
    assert sorted(rnd.server.blamed) == [1, 99] and "shape" in rnd.server.blamed[1]
    rnd.check_sum(rnd.server.collect_unmask(rnd.responses(asks)), [0, 2, 3, 4])


def test_a_participant_answering_twice_is_blamed_and_both_answers_ignored(make_round):
    rnd = make_round(n=5)
    masked = rnd.masked(rnd.to_share_relays())
    asks = rnd.asks([*masked, masked[0]])
    assert list(rnd.server.blamed) == [0] and "2 replies" in rnd.server.blamed[0]
    rnd.check_sum(rnd.server.collect_unmask(rnd.responses(asks)), [1, 2, 3, 4])


def test_request_for_both_shares_is_refused(make_round):
    rnd = make_round(n=5)
    asks = rnd.to_unmask()
    ask = _by(asks, 0)
    greedy = dataclasses.replace(ask, dropped=[ask.survived[0]])
    with pytest.raises(SecAggProtocolError, match="both") as err:
        part.unmask(rnd.states[0], greedy, rnd.identities[0])
    assert err.value.participant == ask.survived[0]
    # An honest answer is given once; a second request (with the other share) is refused.
    state, response = part.unmask(rnd.states[0], ask, rnd.identities[0])
    assert set(response.b_owners).isdisjoint(response.s_owners)
    with pytest.raises(SecAggProtocolError, match="already answered"):
        part.unmask(state, dataclasses.replace(ask, survived=[], dropped=ask.survived[:1]), rnd.identities[0])


def test_a_participant_refuses_to_unmask_when_too_few_neighbours_survived(make_round):
    # Told that almost all its neighbours dropped, it would reveal their masking keys while the
    # server holds their masked inputs: below the threshold it answers nothing.
    rnd = make_round(n=5)  # complete graph, t = 3
    ask = _by(rnd.to_unmask(), 0)
    lonely = dataclasses.replace(ask, survived=ask.survived[:1], dropped=[])
    with pytest.raises(SecAggAbort, match="only 1 neighbours survived"):
        part.unmask(rnd.states[0], lonely, rnd.identities[0])


def test_the_server_aborts_before_asking_for_any_share_when_a_secret_lacks_holders(make_round):
    rnd = make_round(n=8, degree=4)  # t = 3: a neighbourhood of 5
    relays = rnd.to_share_relays()
    gone = rnd.server.graph[0][:3]  # three of 0's four neighbours never send their masked input
    masked = rnd.masked([r for r in relays if r.receiver not in gone])
    with pytest.raises(SecAggAbort, match="live holders of participant"):
        rnd.server.collect_masked(masked)


def test_too_few_unmask_answers_aborts(make_round):
    rnd = make_round(n=5)  # complete graph, t = 3
    responses = rnd.responses(rnd.to_unmask())
    with pytest.raises(SecAggAbort, match="threshold is 3"):
        rnd.server.collect_unmask(responses[:2])


# --- secrets ----------------------------------------------------------------------------------

def test_insecure_threshold_refused_by_participant():
    names = [f"participant-{i}" for i in range(5)]
    req = SetupRequest("r", 0, [0, 1, 2, 3, 4], [1, 2, 3, 4], 2, 10, 1.0, 1.0, "", crypto.generate_keypair()[1], names)
    with pytest.raises(SecAggProtocolError, match="insecure"):
        part.setup(req, simulated_identity(names[0], names))


def test_self_mask_seeds_are_fresh_for_every_participant_and_every_call(make_round):
    rnd = make_round(n=4)
    relays = rnd.server.collect_keys(rnd.adverts())
    seeds = [part.share_keys(rnd.states[r.receiver], r, rnd.identities[r.receiver])[0].b_seed for r in relays]
    again = part.share_keys(rnd.states[0], _by(relays, 0), rnd.identities[0])[0].b_seed
    assert len(set(seeds)) == 4 and again != seeds[0]


def test_a_participant_forgets_every_secret_once_it_has_answered_unmask(make_round):
    rnd = make_round(n=4)
    rnd.responses(rnd.to_unmask())
    for state in rnd.states.values():
        assert state.stage == "unmasked"
        assert (state.s_private, state.c_privates, state.b_seed, state.own_b_share) == (b"", [], b"", b"")
        assert (state.held_b_shares, state.held_s_shares) == ([], [])


# --- a coordinator that gives members different public parameters -------------------------

def _relay_without_checks(rnd, adverts):
    """Keys and shares relayed as a coordinator that checks nothing would (complete graph)."""
    by = {a.sender: a for a in adverts}
    key_relays = [
        KeysRelay(rnd.server.round_id, i, nbrs := rnd.server.graph[i],
                  [by[j].c_publics[by[j].c_ids.index(i)] for j in nbrs], [by[j].s_public for j in nbrs],
                  [by[j].identity for j in nbrs], [by[j].signatures[by[j].c_ids.index(i)] for j in nbrs])
        for i in sorted(by)
    ]
    uploads = {u.sender: u for u in rnd.uploads(key_relays)}
    return [
        SharesRelay(
            rnd.server.round_id, i, nbrs := rnd.server.graph[i],
            *[[getattr(uploads[j], f)[uploads[j].receivers.index(i)] for j in nbrs] for f in ("ciphertexts", "b_share_commitments", "s_share_commitments", "signatures")],
        )
        for i in sorted(by)
    ]


def test_members_given_different_parameters_refuse_each_others_signed_keys(make_round):
    rnd = make_round(n=4)
    setups = rnd.server.setup()
    setups[0] = dataclasses.replace(setups[0], context='{"weight_ref": "tiny"}')
    adverts = rnd.adverts(setups)
    by = {a.sender: a for a in adverts}
    for i in range(4):  # every signature binds the signer's digest: across the split none verifies
        nbrs = rnd.server.graph[i]
        relay = KeysRelay(rnd.server.round_id, i, nbrs, [by[j].c_publics[by[j].c_ids.index(i)] for j in nbrs], [by[j].s_public for j in nbrs],
                          [by[j].identity for j in nbrs], [by[j].signatures[by[j].c_ids.index(i)] for j in nbrs])
        with pytest.raises(SecAggCoordinatorFault, match="did not sign"):
            part.share_keys(rnd.states[i], relay, rnd.identities[i])


@pytest.mark.parametrize("tampered", [False, True])
def test_members_given_different_parameters_derive_masks_that_do_not_cancel(make_round, tampered, monkeypatch):
    # The attack: member 0 is told a tiny weight reference, the others a huge one, so that the
    # weighted bucket sum would be member 0's update. Bound into the key schedule, the different
    # parameters leave the pairwise masks uncancelled: even with every self-mask removed the sum
    # is noise, and the count slot (each member adds 1) shows it. Defence in depth: this holds
    # even without the signature check that already stops it (test above), so that check is off here.
    monkeypatch.setattr(part, "_check_signed_keys", lambda *_: None)
    monkeypatch.setattr(part, "_check_signed_bundles", lambda *_: None)  # nor the bundles' signatures
    rnd = make_round(n=4, d=20_000)
    setups = rnd.server.setup()
    if tampered:
        setups[0] = dataclasses.replace(setups[0], context='{"weight_ref": "tiny"}')
    masked = rnd.masked(_relay_without_checks(rnd, rnd.adverts(setups)))
    total = np.zeros(rnd.d + 1, np.uint32)
    for y in masked:
        np.add(total, y.masked, out=total)
    for i, state in rnd.states.items():  # the most unmasking can give: every self-mask seed
        apply_mask(total, state.b_seed, -1)
    if tampered:
        assert int(total[-1]) != 4 and _chi2(total[:-1]) < 400
        assert all(y.accused for y in masked)  # and every bundle across the split failed to open
    else:  # the control: the same procedure with consistent parameters does cancel
        assert int(total[-1]) == 4 and _chi2(total[:-1]) > 10_000


def test_a_member_given_different_parameters_is_left_out_by_the_checking_server(make_round):
    rnd = make_round(n=5)
    setups = rnd.server.setup()
    setups[0] = dataclasses.replace(setups[0], context='{"weight_ref": "tiny"}')
    relays = rnd.server.collect_keys(rnd.adverts(setups))
    assert list(rnd.server.blamed) == [0]  # its proof is bound to parameters the server never sent
    rnd.check_sum(rnd.finish(relays), [1, 2, 3, 4])
