import numpy as np
import pytest

from fedlora.secagg import check_no_overflow, choose_scale, decode, encode, error_bound


def test_round_trip_within_one_step():
    rng = np.random.default_rng(0)
    x = rng.normal(size=10_000).astype(np.float32)
    x *= 0.9 / np.linalg.norm(x)
    scale = choose_scale(1.0, 4)
    back = decode(encode(x, 1.0, scale, rng), scale, np.float64)
    assert np.max(np.abs(back - x)) <= error_bound(1, scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clips_to_clip_norm_without_touching_the_input(dtype):
    x = np.full(100, 10.0, dtype=dtype)
    scale = choose_scale(2.0, 1)
    back = decode(encode(x, 2.0, scale, np.random.default_rng(0)), scale, np.float64)
    assert np.linalg.norm(back) == pytest.approx(2.0, rel=1e-6)
    assert np.all(x == 10.0)


@pytest.mark.parametrize("n", [1, 3, 100, 10_000])
def test_worst_case_sum_does_not_overflow(n):
    # All of the norm on one coordinate is the extreme case, positive and negative.
    clip_norm, rng = 0.5, np.random.default_rng(1)
    scale = choose_scale(clip_norm, n)
    x = np.array([clip_norm, 0.0, 0.0], dtype=np.float32)
    y = np.array([0.0, -clip_norm, 0.0], dtype=np.float32)
    acc_pos = np.zeros(3, np.uint32)
    acc_neg = np.zeros(3, np.uint32)
    for _ in range(n):
        acc_pos += encode(x, clip_norm, scale, rng)
        acc_neg += encode(y, clip_norm, scale, rng)
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


def test_impossible_configuration_refused():
    with pytest.raises(ValueError, match="participants"):
        choose_scale(1.0, 2**31)
    with pytest.raises(ValueError, match="overflow"):
        check_no_overflow(1.0, 10, 2.0**30)


@pytest.mark.parametrize("value", [0.3, -0.7, 2.25])
def test_stochastic_rounding_is_unbiased(value):
    rng = np.random.default_rng(2)
    x = np.full(200_000, value, dtype=np.float64)
    q = decode(encode(x, 1e9, 1.0, rng), 1.0, np.float64)
    assert set(np.unique(q)) == {np.floor(value), np.ceil(value)}
    assert abs(q.mean() - value) < 0.005  # ~ 4.5 standard errors


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_rejected(bad, word):
    x = np.zeros(10, dtype=np.float32)
    x[3] = bad
    with pytest.raises(ValueError, match=word):
        encode(x, 1.0, 1.0, np.random.default_rng(0))
