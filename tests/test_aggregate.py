import numpy as np
import pytest

from fedlora.aggregate import Unit, combine_units, single_units, weighted_mean


def test_weighted_mean_matches_hand_computation() -> None:
    a = np.array([1.0, 2.0, -4.0], dtype=np.float32)
    b = np.array([3.0, 0.0, 8.0], dtype=np.float32)
    c = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    # (10*a + 30*b + 60*c) / 100 written out by hand
    expected = np.array([(10 * 1 + 30 * 3 + 60 * 0.5) / 100, (10 * 2 + 0 + 60 * 0.5) / 100, (10 * -4 + 30 * 8 + 60 * 0.5) / 100])
    np.testing.assert_allclose(weighted_mean([a, b, c], [10, 30, 60]), expected, rtol=1e-6)


def test_weighted_mean_is_order_independent() -> None:
    rng = np.random.default_rng(0)
    updates = [rng.normal(size=1000).astype(np.float32) for _ in range(7)]
    weights = rng.integers(1, 100, size=7).tolist()
    forward = weighted_mean(updates, weights)
    backward = weighted_mean(updates[::-1], weights[::-1])
    np.testing.assert_array_equal(forward, backward)


def test_weighted_mean_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="shapes differ"):
        weighted_mean([np.zeros(3, np.float32), np.zeros(4, np.float32)], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean([np.zeros(3, np.float32)], [0])


def test_plaintext_units_and_bucket_sums_combine_to_the_same_weighted_mean() -> None:
    # The pipeline's promise: a bucket of members contributes exactly what its members would.
    rng = np.random.default_rng(3)
    deltas = [rng.normal(size=6) for _ in range(4)]
    weights = [5.0, 1.0, 3.0, 7.0]
    singles = single_units(["a", "b", "c", "d"], deltas, weights)
    buckets = [
        Unit.from_total(("a", "b"), singles[0].total + singles[1].total, 6.0),
        Unit.from_total(("c", "d"), singles[2].total + singles[3].total, 10.0),
    ]
    one, two = combine_units(singles), combine_units(buckets)
    np.testing.assert_allclose(one.delta, np.average(deltas, axis=0, weights=weights), rtol=1e-6)
    np.testing.assert_allclose(two.delta, one.delta, rtol=1e-6)
    assert [r["participant"] for r in one.metrics["participant_updates"]] == ["a", "b", "c", "d"]
    assert [r["members"] for r in two.metrics["bucket_updates"]] == [["a", "b"], ["c", "d"]]
    assert "mean_error_bound" not in one.metrics


def test_the_error_bound_of_combined_secure_sums_covers_sum_and_weight_errors() -> None:
    units = [Unit.from_total(("a", "b"), np.array([4.0, -8.0]), 4.0, error_bound=0.01, weight_error=0.001)]
    combined = combine_units(units)
    # (0.01 + |mean|_max * 0.001) / 4 with mean = [1, -2]
    assert combined.metrics["mean_error_bound"] == pytest.approx((0.01 + 2.0 * 0.001) / 4.0)
    with pytest.raises(ValueError, match="no units"):
        combine_units([])
