"""Aggregation weights a participant cannot inflate (fedlora/aggregate/weights.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.aggregate import combine_units
from fedlora.aggregate.robust import make_rule
from fedlora.aggregate.units import single_units
from fedlora.aggregate.weights import claimed_average, score_average, secure_weight_reference, unit_weights
from fedlora.config import ConfigError, load_config

RULES = ["mean", "geomedian", "centered-clip:1.0", "multi-krum:1", "median", "trimmed-mean:0.2"]


def test_a_claim_weighs_at_most_the_cap_times_the_median_claim() -> None:
    assert unit_weights([60, 60, 80, 10**6], "capped", 2.0) == [60, 60, 80, 140]  # median 70
    assert unit_weights([60, 30, 90], "capped", 2.0) == [60, 30, 90]  # honest proportions within the cap stay
    assert unit_weights([60, 10**6], "equal", 2.0) == [1.0, 1.0]
    assert unit_weights([60, 10**6], "claimed", 2.0) == [60, 10**6]


@pytest.mark.parametrize("weighting", ["capped", "equal", "claimed"])
def test_a_secure_buckets_reference_gives_each_member_its_plaintext_weight(weighting: str) -> None:
    # Members of a secure bucket weigh themselves w = min(n / ref, 1) and the bucket's weight is
    # ref * sum(w): with the reference the coordinator binds, that is unit_weights, liar included.
    round_claims = [60, 55, 70, 65, 10**6, 40]
    bucket = [55, 10**6, 40]
    ref = secure_weight_reference(round_claims, bucket, weighting, 2.0)
    expected = unit_weights(round_claims, weighting, 2.0)
    by_claim = dict(zip(round_claims, expected))
    factor = min(round_claims) if weighting == "equal" else 1.0  # the same for every bucket of the round
    assert [min(n / ref, 1.0) * ref for n in bucket] == pytest.approx([by_claim[n] * factor for n in bucket])


def test_reported_metrics_are_averaged_with_the_weights_their_counts_give_updates() -> None:
    assert claimed_average([0.5, 0.5, 1.0], [60, 60, 10**6], "capped", 2.0) == pytest.approx((30 + 30 + 120) / 240)
    assert claimed_average([0.5, 0.5, 1.0], [60, 60, 10**6], "claimed", 2.0) > 0.9999


def test_a_reported_score_that_cannot_be_one_is_refused_and_a_nan_is_not_computed() -> None:
    nan, inf = float("nan"), float("inf")
    scores = [0.5, 5.0, nan, inf, 0.7, -0.1, 0.9, [1.0]]
    average, refused = score_average(scores, [60, 60, 60, 60, 60, 60, 0, 60], "capped", 2.0)
    assert refused == [1, 3, 5, 6, 7]  # out of [0, 1], infinite, below 0, over no records, not a number
    assert average == pytest.approx(0.6)  # the two honest scores; the NaN (not computed) is simply left out
    assert score_average([0.2, 1.0], [60, 10**6], "capped", 2.0)[0] == claimed_average([0.2, 1.0], [60, 10**6], "capped", 2.0)
    average, refused = score_average([nan, nan], [60, 60], "capped", 2.0)
    assert math.isnan(average) and refused == []


def test_a_reported_loss_may_exceed_one_but_not_be_negative_or_infinite() -> None:
    inf = float("inf")
    average, refused = score_average([0.3, -1.0, inf, 2.5, -inf], [60] * 5, "capped", 2.0, upper=inf)
    assert refused == [1, 2, 4] and average == pytest.approx(1.4)


@pytest.mark.parametrize("claims", [[60, 0], [60, -5], [60, float("nan")], [60, float("inf")]])
def test_claims_that_are_no_example_counts_are_refused(claims) -> None:
    with pytest.raises(ValueError, match="positive and finite"):
        unit_weights(claims, "capped", 2.0)


def honest_and_one_liar(claim: float, n: int = 15, d: int = 64) -> tuple[list[np.ndarray], list[float]]:
    """n - 1 honest updates around +direction, one update of the same norm pointing against it."""
    rng = np.random.default_rng(0)
    direction = np.ones(d) / np.sqrt(d)
    honest = [(direction + 0.3 * rng.standard_normal(d) / np.sqrt(d)).astype(np.float32) for _ in range(n - 1)]
    liar = (-direction * np.linalg.norm(honest[0])).astype(np.float32)  # norm of an honest one: passes every screen
    return [*honest, liar], [60.0] * (n - 1) + [claim]


@pytest.mark.parametrize("rule", RULES)
def test_claiming_a_million_examples_moves_no_rule_beyond_its_capped_weight(rule: str) -> None:
    updates, claims = honest_and_one_liar(1e6)
    names = [f"p{i}" for i in range(len(updates))]
    lying = combine_units(single_units(names, updates, unit_weights(claims, "capped", 2.0)), make_rule(rule)).delta
    at_cap = combine_units(single_units(names, updates, unit_weights(claims[:-1] + [120.0], "capped", 2.0)), make_rule(rule)).delta
    np.testing.assert_allclose(lying, at_cap, rtol=1e-6, atol=1e-7)  # the lie buys nothing beyond the cap
    direction = np.ones(updates[0].size)
    assert float(lying @ direction) > 0  # still along the honest direction


def test_trusting_claims_lets_one_liar_turn_the_mean_around() -> None:
    """The attack the cap stops, shown with `claimed` weights: the issue's cosine -1."""
    updates, claims = honest_and_one_liar(1e6)
    names = [f"p{i}" for i in range(len(updates))]
    trusted = combine_units(single_units(names, updates, unit_weights(claims, "claimed", 2.0)), make_rule("mean")).delta
    assert float(trusted @ np.ones(updates[0].size)) < 0


def test_weighting_settings_are_checked_at_load_time() -> None:
    with pytest.raises(ConfigError, match="robust.weighting"):
        load_config(None, ["robust.weighting=biggest"])
    with pytest.raises(ConfigError, match="robust.weight_cap"):
        load_config(None, ["robust.weight_cap=0.5"])


def test_a_participant_claiming_a_million_examples_is_weighed_as_the_cap_allows_in_a_real_round(tmp_path) -> None:
    """Its update, its train loss and its evaluation scores all weigh the cap, and its claim is shown."""
    from flwr.clientapp import ClientApp

    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from fedlora.wire import read_reply, reply_content
    from participant import app as participant_app
    from tests.conftest import SMALL

    lying_app = ClientApp()
    trained, evaluated = {}, {}  # what each participant reported, by partition id (the last evaluation)

    @lying_app.train()
    def train(msg, context):
        reply = participant_app.train(msg, context)
        vector, metrics = read_reply(reply.content)
        if metrics["partition_id"] == 0:  # the claims are all the participant controls here
            metrics["num-examples"], metrics["train_loss"] = 10**6, 0.0
        trained[metrics["partition_id"]] = metrics
        return type(reply)(reply_content(metrics, np.array(vector)), reply_to=msg)

    @lying_app.evaluate()
    def evaluate(msg, context):
        reply = participant_app.evaluate_global(msg, context)
        _, metrics = read_reply(reply.content)
        if metrics["partition_id"] == 0:
            metrics["num-examples"], metrics["eval_accuracy"] = 10**6, 1.0
        evaluated[metrics["partition_id"]] = metrics
        return type(reply)(reply_content(metrics), reply_to=msg)

    cfg = load_config(None, [*SMALL, "federation.rounds=1"])
    grid = LocalGrid(lying_app, {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)})
    (row,) = [r for r in Coordinator(cfg, tmp_path).run(grid) if r["round"] == 1]
    units = {u["participant"]: u for u in row["participant_updates"]}
    honest = sorted(u["weight"] for name, u in units.items() if name != "participant-0")
    assert units["participant-0"]["weight"] == pytest.approx(2.0 * float(np.median([*honest, 10**6])))  # capped, not 10^6
    assert units["participant-0"]["claimed_examples"] == 10**6  # the lie, shown beside its cap

    def average(reports: dict, key: str, weighting: str = "capped") -> float:
        ordered = [reports[p] for p in sorted(reports)]
        return claimed_average([m[key] for m in ordered], [m["num-examples"] for m in ordered], weighting, 2.0)

    assert row["train_loss"] == pytest.approx(average(trained, "train_loss"), rel=1e-9)
    assert row["eval_accuracy"] == pytest.approx(average(evaluated, "eval_accuracy"), rel=1e-9)
    assert average(evaluated, "eval_accuracy", "claimed") > 0.999 > row["eval_accuracy"] + 0.05  # trusted, the liar's 1.0 would be the score


def test_a_simulated_attacker_inflating_its_count_reaches_the_weights_in_a_real_round(tmp_path) -> None:
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from fedlora.attacks import choose_adversaries
    from participant import app as participant_app
    from tests.conftest import SMALL

    overrides = ["federation.rounds=1", "robust.rule=median", "robust.weighting=capped", "robust.clip_norm=0.001", "simulation.adversaries=0.34", "simulation.attack=count-inflation:1000000"]
    cfg = load_config(None, [*SMALL, *overrides])
    (bad,) = choose_adversaries(3, 0.34, cfg.federation.seed)
    grid = LocalGrid(participant_app.app, {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)})
    (row,) = [r for r in Coordinator(cfg, tmp_path).run(grid) if r["round"] == 1]
    units = {u["participant"]: u for u in row["participant_updates"]}
    liar = units.pop(f"participant-{bad}")
    assert not row["skipped"] and liar["claimed_examples"] == 10**6
    assert liar["update_norm"] == pytest.approx(0.001, rel=1e-5)  # at the clip bound: no screen sets it aside
    assert liar["weight"] == pytest.approx(2.0 * float(np.median([u["claimed_examples"] for u in units.values()] + [10**6])))
    assert liar["cosine_to_aggregate"] < 0 < min(u["cosine_to_aggregate"] for u in units.values())


def test_auto_weighting_is_equal_under_a_robust_rule_and_capped_under_the_mean() -> None:
    # A robust rule's tolerance counts units of equal weight; capped claims let 20% of attackers
    # weigh 33% (docs/decisions.md, "Robust rules weigh every participant once").
    assert load_config(None, []).robust.weighting == "capped"
    for rule in ("geomedian", "median", "multi-krum:1", "centered-clip:1.0", "trimmed-mean:0.2"):
        assert load_config(None, [f"robust.rule={rule}", "federation.participants=10"]).robust.weighting == "equal"
    assert load_config(None, ["robust.rule=geomedian", "robust.weighting=capped"]).robust.weighting == "capped"
