"""Contribution values: Shapley values of units, members' values from overlapping buckets, anomaly scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.contributions import (
    HARM_THRESHOLD,
    anomaly_scores,
    exact_shapley,
    flagged,
    gtg_shapley,
    harm_scores,
    member_values,
    robust_z,
    shapley_values,
)


def additive(worth: list[float]):
    return lambda subset: float(sum(worth[k] for k in subset))


def test_exact_shapley_of_an_additive_game_is_each_players_own_worth() -> None:
    worth = [0.3, -0.2, 0.05, 0.0, 1.0]
    np.testing.assert_allclose(exact_shapley(5, additive(worth)), worth, atol=1e-12)


def test_exact_shapley_splits_a_pure_synergy_equally_and_sums_to_the_whole() -> None:
    # Only the pair {0, 1} is worth anything; player 2 adds nothing: 0.5, 0.5, 0.
    game = lambda s: 1.0 if {0, 1} <= s else 0.0
    values = exact_shapley(3, game)
    np.testing.assert_allclose(values, [0.5, 0.5, 0.0], atol=1e-12)


def test_gtg_shapley_recovers_an_additive_game_and_truncation_saves_evaluations() -> None:
    worth = list(np.linspace(-0.5, 1.0, 12))
    calls = []

    def counted(subset):
        calls.append(subset)
        return additive(worth)(subset)

    values = gtg_shapley(12, counted, np.random.default_rng(0), permutations=24, tolerance=0.0)
    np.testing.assert_allclose(values, worth, atol=1e-9)  # additive: every order gives each its own worth
    untruncated = len(calls)
    # A game whose gain comes from player 0 alone: after it, every prefix is within tolerance.
    calls.clear()
    gtg_shapley(12, lambda s: counted(s) * 0 + (1.0 if 0 in s else 0.0), np.random.default_rng(0), permutations=24, tolerance=0.01)
    assert len(calls) < 0.7 * untruncated  # a permutation stops once player 0 is in


def test_shapley_values_is_exact_when_enumeration_is_within_the_budget() -> None:
    worth = [1.0, 2.0, 3.0, 4.0]
    calls = []
    values = shapley_values(4, lambda s: calls.append(s) or additive(worth)(s), np.random.default_rng(0), permutations=20)
    np.testing.assert_allclose(values, worth)
    assert len(set(calls)) == 16  # all subsets: the exact path


def test_least_squares_recovers_member_values_from_random_overlapping_buckets() -> None:
    rng = np.random.default_rng(1)
    names = [f"participant-{k}" for k in range(10)]
    truth = dict(zip(names, rng.normal(0.0, 1.0, size=10)))
    units = []
    for _ in range(6):  # six rounds of five random buckets of two
        order = rng.permutation(names)
        for pair in order.reshape(5, 2):
            units.append((tuple(pair), truth[pair[0]] + truth[pair[1]] + rng.normal(0.0, 0.01)))
    estimate = member_values(units)
    assert estimate.identifiable.all() and estimate.rank == 10
    np.testing.assert_allclose(estimate.value, [truth[n] for n in estimate.names], atol=0.05)
    assert 0.002 < estimate.residual_std < 0.03  # the noise put in, recovered from the residuals
    assert np.all(estimate.stderr < 0.03) and np.all(estimate.stderr > 0)


def test_a_member_always_bucketed_with_the_same_partner_is_not_identifiable() -> None:
    units = [(("a", "b"), 1.0), (("a", "b"), 1.2), (("c", "d"), 0.5), (("c", "e"), 0.7), (("d", "e"), 0.4)]
    estimate = member_values(units)
    by_name = dict(zip(estimate.names, estimate.identifiable))
    assert by_name == {"a": False, "b": False, "c": True, "d": True, "e": True}
    assert math.isnan(estimate.value[estimate.names.index("a")])
    # c + d = 0.5, c + e = 0.7, d + e = 0.4: c = 0.4, d = 0.1, e = 0.3, exactly (no residual left)
    np.testing.assert_allclose(estimate.value[2:], [0.4, 0.1, 0.3])


def test_plaintext_units_give_each_participant_the_mean_of_its_round_values() -> None:
    estimate = member_values([(("a",), 1.0), (("a",), 3.0), (("b",), -1.0)])
    np.testing.assert_allclose(estimate.value, [2.0, -1.0])


def test_robust_z_is_measured_against_the_median_and_mad_of_the_others() -> None:
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, -2.0, -3.0, 0.2]
    z = robust_z(values)
    assert abs(z[0]) < 0.5 and z[7] < -10 and z[8] < -10
    scores = anomaly_scores(values)
    assert flagged(scores).tolist() == [False] * 7 + [True, True, True]  # 0.2 is far below a tight median too
    assert not flagged(scores, threshold=100.0).any()


def test_anomaly_takes_the_worse_of_value_and_cosine_and_never_flags_the_unknown() -> None:
    value = [1.0, 1.05, 1.1, 0.9, 0.95]
    cosine = [0.9, 0.85, 0.88, 0.9, -0.5]
    assert flagged(anomaly_scores(value, cosine)).tolist() == [False, False, False, False, True]
    assert not flagged(anomaly_scores([1.0, math.nan, 1.1, 0.9])).any()
    assert flagged(anomaly_scores([1.0, 1.0, 1.0, 0.99])).tolist() == [False, False, False, True]  # MAD 0: any departure is infinite
    assert not flagged(anomaly_scores([1.0, 1.0, 1.0, 0.99], value_floor=0.01)).any()  # ... unless below what the metric resolves


@pytest.mark.parametrize("players", [1, 3])
def test_shapley_values_sum_to_the_whole_rounds_gain(players: int) -> None:
    game = lambda s: len(s) ** 2 / 9
    assert sum(shapley_values(players, game, np.random.default_rng(0), 10)) == pytest.approx(game(set(range(players))))


def test_harm_is_a_value_below_zero_beyond_its_standard_error() -> None:
    harm = harm_scores([-0.3, -0.05, 0.2, -1.0], [0.1, 0.1, 0.1, math.nan])
    assert flagged(harm, HARM_THRESHOLD).tolist() == [True, False, False, False]  # no error known: no evidence


def test_aggregate_shares_sum_to_one_and_a_buckets_share_is_its_members_sum() -> None:
    from fedlora.contributions import aggregate_shares, alignment_deficits

    rng = np.random.default_rng(3)
    direction = rng.normal(size=50)
    updates = np.stack([direction + 0.3 * rng.normal(size=50) for _ in range(6)] + [-direction, rng.normal(size=50)])  # honest, flipped, other
    weights = np.full(8, 10.0)
    alone = aggregate_shares(weights, updates)
    assert alone.sum() == pytest.approx(1.0) and alone[6] < 0 < min(alone[:6]) and abs(alone[7]) < min(alone[:6])
    pairs = [(0, 6), (1, 7), (2, 3), (4, 5)]  # the same round as buckets of 2: each bucket's mean and weight
    bucket = aggregate_shares(np.full(4, 20.0), np.stack([(updates[a] + updates[b]) / 2 for a, b in pairs]))
    assert bucket == pytest.approx([alone[a] + alone[b] for a, b in pairs])
    deficits = alignment_deficits([0.1, 0.12, 0.11, -0.05], [0.01, 0.01, 0.01, 0.01])
    assert deficits[3] == pytest.approx(-15.5) and deficits[1] > 0
    assert np.isnan(alignment_deficits([0.1, 0.2], [0.0, np.nan])).all()  # no error, no verdict
