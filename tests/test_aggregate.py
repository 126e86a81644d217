import numpy as np
import pytest

from fedlora.aggregate import weighted_mean


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
