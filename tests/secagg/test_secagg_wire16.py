"""The 16-bit wire (secagg.wire_bits = 16): rotation, narrowing, the secure sum, bytes, blame, config.

The update's coordinates are randomly rotated (signs + orthonormal DCT-II, Kairouz et al.,
ICML 2021), clipped to each member's share of the signed 16-bit range and sent as their low 16
bits; masking stays in Z_{2^32}. What must hold: the rotation is orthonormal and keyed by the
instance, the honest sum never wraps, the decoded sum is within the reported bound of the
float64 sum, the upload is <= 2 bytes per parameter, and a malformed upload is blamed.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest
import ray.cloudpickle
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import secure_sum
from fedlora.config import ConfigError, PrivacySection, SecaggSection, load_config
from fedlora.secagg import SecAggProtocolError, run_secure_sum
from fedlora.secagg import participant as part
from fedlora.secagg.fixedpoint import clip, coordinate_bound, decode
from fedlora.secagg.identity import simulated_identity
from fedlora.secagg.messages import MaskedInput
from fedlora.secagg.narrow import NARROW_MAX, narrowing
from fedlora.secagg.plan import check_fixed_point, input_clip_norm
from fedlora.secagg.rotation import rotate, rotated_bound, signs, unrotate
from fedlora.secagg.server import SecAggServer
from fedlora.secure_wire import STAGE
from fedlora.simulation import simulate
from participant import secure as participant_secure
from participant.terms import Terms
from tests.conftest import SMALL

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LENGTHS = [1, 2, 7, 64, 1000, 1009, 4096, 65_537]  # odd, even, prime, powers of two and not


# --- the rotation ----------------------------------------------------------------------

@pytest.mark.parametrize("d", LENGTHS)
def test_the_rotation_is_orthonormal_for_any_length(d):
    x = np.random.default_rng(d).normal(size=d)
    seed = os.urandom(32)
    y = rotate(x, seed)
    assert y.shape == (d,)
    assert abs(np.linalg.norm(y) - np.linalg.norm(x)) <= 1e-9 * np.linalg.norm(x)
    assert np.max(np.abs(unrotate(y, seed) - x)) <= 1e-9 * np.max(np.abs(x))
    if d <= 1009:  # the whole matrix: R R^T = I
        matrix = np.stack([rotate(e, seed) for e in np.eye(d)])
        assert np.max(np.abs(matrix @ matrix.T - np.eye(d))) <= 1e-9


def test_signs_are_balanced_and_repeat_only_with_their_seed():
    seed = os.urandom(32)
    s = signs(seed, 100_000)
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.02  # sd 0.003
    np.testing.assert_array_equal(s, signs(seed, 100_000))
    assert 0.45 < np.mean(s != signs(os.urandom(32), 100_000)) < 0.55


@pytest.mark.parametrize("d", [100, 10_007, 1_000_000])
def test_no_rotated_coordinate_leaves_the_bound(d):
    # The flattest vector (random signs make it the most Gaussian) and the spikiest (one coordinate).
    bound = rotated_bound(1.0, d)
    for x in (np.full(d, 1 / np.sqrt(d)), np.eye(1, d).ravel()):
        for _ in range(5):
            assert np.max(np.abs(rotate(x, os.urandom(32)))) <= bound
    assert bound < 3 * np.sqrt(np.log(2 * d * 1e9) / d)  # 2 sqrt(ln(2d/delta)/d): 0.012 of the norm at d = 1M


def test_both_sides_derive_the_same_rotation_and_each_round_its_own():
    servers = [SecAggServer(f"run/round-{r}/bucket-0", [0, 1, 2], 1001, 1.0, wire_bits=16) for r in (1, 2)]
    state, _ = part.setup(servers[0].setup()[1], simulated_identity("participant-1", servers[0].names))
    mine = narrowing(state.wire_bits, state.vector_length, len(state.members), state.params)
    assert mine == servers[0].narrow and mine.length == 1000 and mine.cap == NARROW_MAX // 3
    first, second = (signs(server.narrow.seed, 1000) for server in servers)
    assert 0.4 < np.mean(first != second) < 0.6  # another round: other signs
    assert SecAggServer("run/round-1/bucket-0", [0, 1, 2], 1001, 1.0).narrow is None  # 32 bits: none


def test_a_wire_other_than_32_or_16_bits_is_refused_by_both_sides():
    with pytest.raises(ValueError, match="wire_bits must be one of"):
        SecAggServer("r", [0, 1, 2], 11, 1.0, wire_bits=24)
    request = dataclasses.replace(SecAggServer("r", [0, 1, 2], 11, 1.0, wire_bits=16).setup()[0], wire_bits=24)
    with pytest.raises(SecAggProtocolError, match="refused the wire"):
        part.setup(request, simulated_identity("participant-0", request.member_names))


# --- the secure sum --------------------------------------------------------------------

def _vectors(n, d, seed):
    rng = np.random.default_rng(seed)
    # Half longer than C = 1 (clipped), half well inside it; a structured component on top.
    ramp = np.linspace(-1, 1, d) / np.sqrt(d)
    return {10 + i: ((rng.normal(size=d) + 3 * ramp) * (0.02 if i % 2 else 0.002)).astype(np.float32) for i in range(n)}


def _sum_problems(result, expected):
    """What is wrong with a 16-bit secure sum (empty when it is within its bound)."""
    got = decode(result.sum_u32, result.scale, np.float64, result.narrow)
    error = got - expected
    m = result.narrow.length
    problems = []
    rotated = np.max(np.abs(rotate(error[:m], result.narrow.seed)))
    if rotated > result.error_bound * (1 + 1e-9):
        problems.append(f"rotated coordinate off by {rotated:.3g} > bound {result.error_bound:.3g}")
    if np.linalg.norm(error) > np.sqrt(error.size) * result.error_bound:
        problems.append(f"L2 error {np.linalg.norm(error):.3g} > sqrt(d) x bound")
    if abs(error[-1]) > result.error_bound:  # the wide slot: exact up to rounding
        problems.append(f"last (32-bit) coordinate off by {abs(error[-1]):.3g}")
    return problems


@pytest.mark.parametrize("d", [2, 1001, 4096])
@pytest.mark.parametrize("when", ["nobody", "drop_before_masking", "drop_before_unmask"])
def test_a_16_bit_secure_sum_is_within_its_bound_with_dropouts(d, when):
    vecs = _vectors(6, d, d)
    gone = {} if when == "nobody" else {when: {12, 15}}
    result = run_secure_sum(vecs, 1.0, wire_bits=16, seed=d, **gone)
    members = [i for i in vecs if when != "drop_before_masking" or i not in (12, 15)]
    assert result.survivors == members
    expected = sum(clip(vecs[i], 1.0) for i in members)
    assert _sum_problems(result, expected) == []
    assert np.max(np.abs(result.total - decode(result.sum_u32, result.scale, np.float64, result.narrow))) <= 1e-6


def test_an_update_on_one_rotated_axis_is_clipped_there_not_wrapped(make_round):
    # All of the norm on one rotated coordinate: the rotation cannot spread it, so the
    # per-coordinate clip must hold it at the member's cap, or n of them wrap the 16-bit sum.
    rnd = make_round(n=5, d=4001, wire_bits=16)
    narrow = rnd.server.narrow
    spike = np.zeros(narrow.length)
    spike[17] = 1.0
    for i in range(rnd.n):
        rnd.vectors[i] = np.append(unrotate(spike, narrow.seed) * 0.99, 0.1)
    result = rnd.finish(rnd.server.collect_keys(rnd.adverts()))
    rotated = rotate(decode(result.sum_u32, result.scale, np.float64, narrow)[:-1], narrow.seed)
    cap = rnd.n * narrow.cap / result.scale
    assert cap < 0.99 * rnd.n  # the spike was clipped ...
    assert abs(rotated[17] - cap) <= result.error_bound  # ... to the cap, positive: no wrap
    assert np.max(np.abs(np.delete(rotated, 17))) <= result.error_bound
    assert abs(decode(result.sum_u32, result.scale, np.float64)[-1] - 0.5) <= result.error_bound  # the 32-bit slot


def test_the_plan_fits_n_rotated_coordinates_in_16_bits_and_the_weight_slot_in_32():
    for n in (2, 3, 10, 50, 1000):
        for d in (1, 1000, 10**6, 10**8):
            scale = check_fixed_point(1.0, n, update_length=d, wire_bits=16)
            assert n * coordinate_bound(rotated_bound(1.0, d), scale) <= NARROW_MAX
            assert n * coordinate_bound(input_clip_norm(1.0), scale) <= 2**31 - 1
    with pytest.raises(ValueError, match="16-bit wire"):
        check_fixed_point(1.0, 10, 1.0, update_length=1000, wire_bits=16)
    with pytest.raises(ValueError, match="32767"):
        check_fixed_point(1.0, NARROW_MAX + 1, wire_bits=16)


# --- over Flower messages: the weighted mean, bytes, blame ---------------------------------

def _federation(n, d, seed=0, wire_bits=16):
    terms = Terms.of(SecaggSection(enabled=True, wire_bits=wire_bits), PrivacySection(), 1.0)
    app = ClientApp()
    participant_secure.register(app)
    nodes = [4000 + 5 * i for i in range(n)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    rng = np.random.default_rng(seed)
    updates, counts = {}, {}
    for i, node in enumerate(nodes):
        updates[node] = (rng.normal(size=d) * (0.02 if i % 2 else 0.004) + 0.002).astype(np.float32)
        counts[node] = int(rng.integers(5, 200))
        participant_secure.keep_update(grid.contexts[node], updates[node], counts[node], 3, os.urandom(32), terms)
    return grid, [Member(node, f"participant-{i}", counts[node]) for i, node in enumerate(nodes)], updates, counts


def test_the_16_bit_weighted_mean_equals_the_float64_one_within_the_bound_with_dropouts():
    d = 30_001
    grid, members, updates, counts = _federation(7, d)
    before, after = members[1], members[4]  # one lost before masking, one after
    grid.silent |= {(before.node, STAGE["mask_input"].message_type), (after.node, STAGE["unmask"].message_type)}
    sec = SecaggSection(enabled=True, wire_bits=16, timeout_s=1.0)
    result = secure_sum(grid, members, sec, server_round=3, length=d, run_tag="t", clip_norm=1.0)
    (unit,) = result.buckets
    assert sorted(unit.members) == sorted(m.name for m in members if m is not before)
    assert [r["participant"] for r in result.recovered] == [after.name]
    summed = [m for m in members if m is not before]
    total = sum(counts[m.node] * clip(updates[m.node], 1.0) for m in summed)
    weight = float(sum(counts[m.node] for m in summed))
    assert np.linalg.norm(unit.total - total) <= np.sqrt(d) * unit.error_bound
    assert abs(unit.weight - weight) <= unit.weight_error
    mean_error = np.linalg.norm(unit.mean - total / weight) / np.linalg.norm(total / weight)
    assert mean_error < 5e-3


def test_the_16_bit_upload_is_at_most_2_bytes_per_parameter():
    d = 200_000
    for bits in (32, 16):
        grid, members, _, _ = _federation(5, d, seed=1, wire_bits=bits)
        sec = SecaggSection(enabled=True, wire_bits=bits)
        result = secure_sum(grid, members, sec, server_round=3, length=d, run_tag="t", clip_norm=1.0)
        assert len(result.buckets) == 1
        per_param = grid.bytes_up / len(members) / d  # serialised Flower messages, all stages
        # plus a fixed 4.5 KiB per member over all stages: keys, cards, commitments and the signatures on keys,
        # share bundles (issue 22: a relay cannot garble a bundle into an accusation) and the survivor set
        assert bits / 8 <= per_param <= bits / 8 + 4608 / d, (bits, per_param)


def test_a_malformed_16_bit_masked_input_is_blamed_on_its_sender(make_round):
    rnd = make_round(n=8, d=500, wire_bits=16)
    inputs = rnd.masked(rnd.to_share_relays())
    good = {m.sender: m.masked for m in inputs}
    assert all(y.dtype == np.uint16 and y.shape == (500 + 3,) for y in good.values())
    faults = {
        1: good[1].astype(np.uint32),  # right length, wrong word
        3: good[3][:-1],  # a word short
        4: np.zeros(501, np.uint32),  # what a 32-bit participant would send
    }
    inputs = [MaskedInput(m.round_id, m.sender, faults.get(m.sender, m.masked), [], []) for m in inputs]
    asks = rnd.asks(inputs)
    assert sorted(rnd.server.blamed) == [1, 3, 4]
    assert all("expected uint16 of shape (503,)" in why for why in rnd.server.blamed.values())
    result = rnd.server.collect_unmask(rnd.responses(asks))
    assert result.survivors == [0, 2, 5, 6, 7]
    expected = sum(clip(rnd.vectors[i], 1.0) for i in result.survivors)
    assert _sum_problems(result, expected.astype(np.float64)) == []


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_masked_words_of_another_type_are_refused_on_arrival(dtype):
    data = MaskedInput("r", 4, np.zeros(8, np.uint16), [], []).to_dict() | {"masked": np.zeros(8, dtype)}
    with pytest.raises(SecAggProtocolError, match="participant 4"):
        MaskedInput.from_dict(data, sender=4)


# --- configuration ---------------------------------------------------------------------

def test_wire_bits_other_than_32_and_16_and_16_with_distributed_dp_are_refused():
    assert load_config(None, SMALL + ["secagg.enabled=true", "secagg.wire_bits=16"]).secagg.wire_bits == 16
    with pytest.raises(ConfigError, match=r"^secagg.wire_bits: must be 32 or 16, got 24"):
        load_config(None, SMALL + ["secagg.enabled=true", "secagg.wire_bits=24"])
    with pytest.raises(ConfigError) as err:
        load_config(None, SMALL + ["secagg.enabled=true", "secagg.wire_bits=16", "privacy.noise_multiplier=1.0"])
    assert str(err.value).startswith("secagg.wire_bits") and "privacy.noise_multiplier" in str(err.value)


# --- a whole federation ----------------------------------------------------------------

@pytest.mark.slow
def test_a_federation_on_the_16_bit_wire_tracks_the_32_bit_one(tmp_path):
    base = SMALL + ["federation.rounds=3", "federation.participants=4", "secagg.enabled=true", "lora.mode=frozen-a"]
    rows = {
        bits: simulate(load_config(None, base + [f"secagg.wire_bits={bits}"]), tmp_path / str(bits))
        for bits in (32, 16)
    }
    assert [r["round"] for r in rows[16]] == [r["round"] for r in rows[32]] == [0, 1, 2, 3]
    first_wide, first_narrow = rows[32][1], rows[16][1]
    # Round 1 starts both runs from the same adapter: the gap is the 16-bit rounding alone.
    assert abs(first_narrow["eval_loss"] - first_wide["eval_loss"]) <= 0.005 * first_wide["eval_loss"]
    for wide, narrow in zip(rows[32][1:], rows[16][1:]):
        assert narrow["applied"] and narrow["participants"] == 4
        # Later rounds train from slightly different adapters and the tiny model's loss falls
        # steeply (8.3 -> 0.9 in 3 rounds), so the gap compounds: 1.2% idle, 3.1% seen in CI.
        assert abs(narrow["eval_loss"] - wide["eval_loss"]) <= 0.10 * wide["eval_loss"]
        assert abs(narrow["eval_accuracy"] - wide["eval_accuracy"]) <= 0.05
    assert rows[16][-1]["eval_loss"] < rows[16][0]["eval_loss"] / 2  # and the 16-bit run learns
