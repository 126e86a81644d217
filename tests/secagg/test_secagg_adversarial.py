"""Misbehaving participants or relays are caught and named; honest ones never leak."""

import dataclasses

import numpy as np
import pytest

from fedlora.secagg import SecAggAbort, SecAggProtocolError, crypto, shamir
from fedlora.secagg import participant as part
from fedlora.secagg.messages import SetupRequest


def _by(msgs, who, attr="receiver"):
    return next(m for m in msgs if getattr(m, attr) == who)


def test_share_addressed_to_non_neighbour(make_round):
    rnd = make_round(n=8, degree=2)
    uploads = rnd.uploads(rnd.server.collect_keys(rnd.adverts()))
    stranger = next(j for j in range(8) if j != 0 and j not in rnd.server.graph[0])
    up = _by(uploads, 0, "sender")
    uploads[uploads.index(up)] = dataclasses.replace(up, receivers=[stranger, *up.receivers[1:]])
    with pytest.raises(SecAggProtocolError, match="participant 0: addressed shares") as err:
        rnd.server.collect_shares(uploads)
    assert err.value.participant == 0


@pytest.mark.parametrize("attack", ["flip", "replay"])
def test_tampered_or_replayed_ciphertext(make_round, attack):
    rnd = make_round(n=4)
    relays = rnd.to_share_relays()
    to0, to1 = _by(relays, 0), _by(relays, 1)
    pos = to0.senders.index(2)
    if attack == "flip":
        blob = bytearray(to0.ciphertexts[pos])
        blob[40] ^= 1
        blob = bytes(blob)
    else:  # relay 2's ciphertext meant for 1 to 0 instead
        blob = to1.ciphertexts[to1.senders.index(2)]
    cts = list(to0.ciphertexts)
    cts[pos] = blob
    with pytest.raises(SecAggProtocolError, match="participant 2: .*failed authentication") as err:
        part.mask_input(
            rnd.states[0],
            dataclasses.replace(to0, ciphertexts=cts),
            rnd.vectors[0],
            np.random.default_rng(0),
        )
    assert err.value.participant == 2


def test_share_for_a_key_the_receiver_never_got(make_round):
    rnd = make_round(n=4)
    key_relays = rnd.server.collect_keys(rnd.adverts())
    # Participant 3 swaps its masking key after advertising (its shares no longer match).
    s_private, s_public = crypto.generate_keypair()
    rnd.states[3] = dataclasses.replace(rnd.states[3], s_private=s_private, s_public=s_public)
    relays = rnd.server.collect_shares(rnd.uploads(key_relays))
    with pytest.raises(SecAggProtocolError, match="did not receive") as err:
        rnd.masked([_by(relays, 0)])
    assert err.value.participant == 3


def test_relay_from_a_sender_without_keys(make_round):
    rnd = make_round(n=8, degree=2)
    relays = rnd.to_share_relays()
    to0 = _by(relays, 0)
    stranger = next(j for j in range(8) if j != 0 and j not in rnd.server.graph[0])
    forged = dataclasses.replace(to0, senders=[stranger, *to0.senders[1:]])
    with pytest.raises(SecAggProtocolError, match=f"participant {stranger}: .*never received"):
        rnd.masked([forged])


def test_request_for_both_shares_is_refused(make_round):
    rnd = make_round(n=5)
    asks = rnd.to_unmask()
    ask = _by(asks, 0)
    greedy = dataclasses.replace(ask, dropped=[ask.survived[0]])
    with pytest.raises(SecAggProtocolError, match="both") as err:
        part.unmask(rnd.states[0], greedy)
    assert err.value.participant == ask.survived[0]
    # An honest answer is given once; a second request (with the other share) is refused.
    state, response = part.unmask(rnd.states[0], ask)
    assert set(response.b_owners).isdisjoint(response.s_owners)
    with pytest.raises(SecAggProtocolError, match="already answered"):
        part.unmask(state, dataclasses.replace(ask, survived=[], dropped=ask.survived[:1]))


def test_insecure_threshold_refused_by_participant():
    req = SetupRequest("r", 0, [1, 2, 3, 4], 2, 10, 1.0, 1.0)
    with pytest.raises(SecAggProtocolError, match="insecure"):
        part.setup(req)


def test_server_rejects_bad_masked_inputs(make_round):
    rnd = make_round(n=4)
    masked = rnd.masked(rnd.to_share_relays())
    wrong = [dataclasses.replace(m, masked=m.masked[:-1]) if m.sender == 1 else m for m in masked]
    with pytest.raises(SecAggProtocolError, match="participant 1: masked input has shape"):
        rnd.server.collect_masked(wrong)
    for bad, match in [
        (dataclasses.replace(masked[0], sender=99), "participant 99: unknown"),
        (masked[0], "participant 0: sent two replies"),
    ]:
        rnd.server.stage = "masked"
        with pytest.raises(SecAggProtocolError, match=match):
            rnd.server.collect_masked([*masked, bad])


def test_bad_share_at_unmask_is_detected(make_round):
    rnd = make_round(n=5)
    responses = rnd.responses(rnd.to_unmask())
    r0 = _by(responses, 0, "sender")
    shares = list(r0.b_shares)
    shares[1] = bytes(65) + b"\x07"  # 0's share of its first surviving neighbour
    responses[responses.index(r0)] = dataclasses.replace(r0, b_shares=shares)
    with pytest.raises(SecAggProtocolError, match="bad share|could not be recovered"):
        rnd.server.collect_unmask(responses)


def test_too_few_unmask_answers_aborts(make_round):
    rnd = make_round(n=5)  # complete graph, t = 3
    responses = rnd.responses(rnd.to_unmask())
    with pytest.raises(SecAggAbort, match="threshold is 3"):
        rnd.server.collect_unmask(responses[:2])


def test_well_formed_but_wrong_share_is_caught_by_commitment(make_round):
    # Shift one share so the reconstruction is off by exactly 1: still a valid-looking secret.
    rnd = make_round(n=5)
    responses = rnd.responses(rnd.to_unmask())
    owner, t, p = 4, rnd.server.threshold, shamir.PRIME
    xs = sorted(part.x_coord(r.sender) for r in responses if owner in r.b_owners)[:t]
    x_h = xs[0]
    lagrange = 1
    for x in xs[1:]:
        lagrange = lagrange * x * pow(x - x_h, -1, p) % p
    r_h = _by(responses, x_h - 1, "sender")
    pos = r_h.b_owners.index(owner)
    y = (int.from_bytes(r_h.b_shares[pos], "big") + pow(lagrange, -1, p)) % p
    shares = list(r_h.b_shares)
    shares[pos] = y.to_bytes(shamir.SHARE_BYTES, "big")
    responses[responses.index(r_h)] = dataclasses.replace(r_h, b_shares=shares)
    with pytest.raises(SecAggProtocolError, match=f"seed of {owner} does not match its commitment"):
        rnd.server.collect_unmask(responses)
