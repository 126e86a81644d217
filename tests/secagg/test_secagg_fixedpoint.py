import math
import os

import numpy as np
import pytest

from fedlora.secagg import check_no_overflow, choose_scale, decode, encode, error_bound
from fedlora.secagg.fixedpoint import coordinate_bound, widest_clip
from fedlora.secagg.plan import check_fixed_point

KEY = bytes(range(32))  # a fixed rounding key: tests repeat exactly


def test_round_trip_within_one_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000).astype(np.float32)
    x *= 0.9 / np.linalg.norm(x)
    scale = choose_scale(1.0, 4)
    back = decode(encode(x, 1.0, scale, KEY), scale, np.float64)
    assert np.max(np.abs(back - x)) <= error_bound(1, scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clips_to_clip_norm_without_touching_the_input(dtype):
    x = np.full(100, 10.0, dtype=dtype)
    scale = choose_scale(2.0, 1)
    back = decode(encode(x, 2.0, scale, KEY), scale, np.float64)
    assert np.linalg.norm(back) == pytest.approx(2.0, rel=1e-6)
    assert np.all(x == 10.0)


@pytest.mark.parametrize("n", [1, 3, 100, 10_000])
def test_worst_case_sum_does_not_overflow(n):
    # All of the norm on one coordinate is the extreme case, positive and negative.
    clip_norm = 0.5
    scale = choose_scale(clip_norm, n)
    x = np.array([clip_norm, 0.0, 0.0], dtype=np.float32)
    y = np.array([0.0, -clip_norm, 0.0], dtype=np.float32)
    acc_pos = np.zeros(3, np.uint32)
    acc_neg = np.zeros(3, np.uint32)
    for _ in range(n):
        acc_pos += encode(x, clip_norm, scale, os.urandom(32))
        acc_neg += encode(y, clip_norm, scale, os.urandom(32))
    assert decode(acc_pos, scale, np.float64)[0] == pytest.approx(
        n * clip_norm, abs=error_bound(n, scale)
    )
    assert decode(acc_neg, scale, np.float64)[1] == pytest.approx(
        -n * clip_norm, abs=error_bound(n, scale)
    )


def test_choose_scale_is_the_largest_safe_scale():
    scale = choose_scale(1.0, 1000)
    check_no_overflow(1.0, 1000, scale)
    with pytest.raises(ValueError, match="overflow"):
        check_no_overflow(1.0, 1000, scale * 1.001)


CLIP_NORMS = [1e-6, 0.01, 0.1, 0.5, 1.0, math.sqrt(2), 3.0, 10.0, 10 * math.sqrt(2), 14.142135623730951, 100.0, 12345.678]


@pytest.mark.parametrize("clip_norm", CLIP_NORMS)
def test_every_scale_chosen_is_accepted_by_the_overflow_check(clip_norm):
    # The float planning once picked scales its own exact-bound check refused (n = 13, 26, 43 ...).
    for n in range(2, 10_001):
        scale = choose_scale(clip_norm, n)
        check_no_overflow(clip_norm, n, scale)
        assert n * coordinate_bound(clip_norm, scale) <= 2**31 - 1
        # ... and it is the largest such float: one ulp up would use more than the budget.
        assert coordinate_bound(clip_norm, math.nextafter(scale, math.inf)) >= coordinate_bound(clip_norm, scale)


@pytest.mark.parametrize("n", [13, 26, 43, 52, 70, 83, 86])
def test_bucket_sizes_the_float_planning_refused_now_plan(n):
    check_fixed_point(10.0, n)  # the default clip norm, sqrt(2) C on the wire


@pytest.mark.parametrize("n", [2, 13, 43, 9_999])
def test_worst_case_inputs_at_the_chosen_scale_reach_but_never_pass_the_range(n):
    # Every participant puts its whole (slightly over-clipped) norm on one coordinate.
    clip_norm = 14.142135623730951
    scale = choose_scale(clip_norm, n)
    edge = clip_norm * (1 + 1e-12)
    ones = [encode(np.array(v), clip_norm, scale, KEY).view(np.int32)[k] for k, v in enumerate([[edge, 0.0], [0.0, -edge]])]
    worst = n * np.abs(np.array(ones, dtype=np.int64))
    assert np.all(worst <= 2**31 - 1)
    assert np.all(worst >= (2**31 - 1) - 2 * n)  # the budget is used, not wasted


def test_impossible_configuration_refused():
    with pytest.raises(ValueError, match="participants"):
        choose_scale(1.0, 2**31)
    with pytest.raises(ValueError, match="overflow"):
        check_no_overflow(1.0, 10, 2.0**30)


@pytest.mark.parametrize("value", [0.3, -0.7, 2.25])
def test_stochastic_rounding_is_unbiased(value):
    x = np.full(200_000, value, dtype=np.float64)
    q = decode(encode(x, 1e9, 1.0, os.urandom(32)), 1.0, np.float64)
    assert set(np.unique(q)) == {np.floor(value), np.ceil(value)}
    assert abs(q.mean() - value) < 0.005  # ~ 4.5 standard errors


def test_rounding_is_repeated_by_its_key_and_only_by_it():
    x = np.full(10_000, 0.5, dtype=np.float64)
    a, b = encode(x, 1e9, 1.0, KEY), encode(x, 1e9, 1.0, os.urandom(32))
    np.testing.assert_array_equal(a, encode(x, 1e9, 1.0, KEY))
    assert 0.4 < np.mean(a != b) < 0.6  # independent coin flips disagree half the time


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_rejected(bad, word):
    x = np.zeros(10, dtype=np.float32)
    x[3] = bad
    with pytest.raises(ValueError, match=word):
        encode(x, 1.0, 1.0, KEY)


@pytest.mark.parametrize("n", [2, 13, 500])
def test_the_widest_clip_is_the_whole_range_one_vector_may_use(n):
    scale = choose_scale(1.0, n)
    widest = widest_clip(scale)
    check_no_overflow(widest, 1, scale)
    with pytest.raises(ValueError, match="overflow"):
        check_no_overflow(widest * (1 + 1e-6), 1, scale)
    assert n * 0.99 < widest < n * 1.01  # one participant may take everyone's share of the range


def test_an_honest_input_caps_its_weight_and_clips_and_an_attackers_lies_anywhere_within_the_widest_norm():
    from fedlora.secagg.plan import weighted_input

    update = np.array([30.0, 40.0])  # norm 50
    np.testing.assert_allclose(weighted_input(update, 500, 100.0, 1.0), [0.6, 0.8, 1.0])  # weight min(5, 1), clipped to C
    np.testing.assert_allclose(weighted_input(update, 50, 100.0, 1.0, widest=1000.0), [15.0, 20.0, 0.5])  # within the range: as claimed
    lie = weighted_input(update, 10**6, 100.0, 1.0, widest=8.0)  # weight 10^4: the whole vector cut to the widest norm
    assert np.linalg.norm(lie) == pytest.approx(8.0) and lie[2] / lie[0] == pytest.approx(1.0 / 30.0)  # the same mean update
