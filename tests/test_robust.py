"""Robust rules over unit means: each holds below its breakdown point, on inputs where the mean breaks."""

import numpy as np
import pytest

from fedlora.aggregate.robust import (
    RULE_FORMS,
    CenteredClip,
    CoordinateMedian,
    GeometricMedian,
    MeanRule,
    MultiKrum,
    SpecForm,
    TrimmedMean,
    capacity_warning,
    check_rule_fits,
    make_rule,
    parse_spec,
    touched_units,
)

D = 400
UNITS = 10
ATTACKS = ("scaled", "sign-flipped", "colluding")
ALL_SPECS = ("mean", "trimmed-mean:0.2", "median", "multi-krum:2", "geomedian", "centered-clip:1.0")


def attacked_round(attack: str, adversaries: int, seed: int = 0) -> tuple[list[np.ndarray], list[float], np.ndarray, float]:
    """UNITS unit means, the last `adversaries` of them attackers, and example-count weights.

    Honest means are mu + noise with ||mu|| ~ 5 and ||noise|| ~ 1. Attackers send 100 times an
    honest mean (`scaled`), minus 100 times one (`sign-flipped`), or all the same point 100 honest
    spreads away from the honest mean (`colluding`: they back each other up, the hard case for
    distance-based rules). Each attacker claims the honest units' average weight: the weighted rules'
    breakdown points count units of comparable weight. Returns units, weights, the weighted honest
    mean and the honest spread (the mean distance of an honest unit from that mean).
    """
    rng = np.random.default_rng(seed)
    mu = 5.0 * rng.normal(size=D) / np.sqrt(D)
    honest = [(mu + rng.normal(size=D) / np.sqrt(D)).astype(np.float32) for _ in range(UNITS - adversaries)]
    honest_weights = rng.uniform(50, 150, size=len(honest)).tolist()
    weights = honest_weights + [float(np.mean(honest_weights))] * adversaries
    target = np.average(np.stack(honest).astype(np.float64), axis=0, weights=honest_weights)
    spread = float(np.mean([np.linalg.norm(h - target) for h in honest]))
    if attack == "scaled":
        bad = [100.0 * honest[j] for j in range(adversaries)]
    elif attack == "sign-flipped":
        bad = [-100.0 * honest[j] for j in range(adversaries)]
    else:
        direction = rng.normal(size=D)
        bad = [(target + 100.0 * spread * direction / np.linalg.norm(direction)).astype(np.float32)] * adversaries
    return honest + bad, weights, target, spread


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(
    ("spec", "adversaries"),
    [("trimmed-mean:0.2", 2), ("multi-krum:2", 2), ("median", 4), ("geomedian", 4), ("centered-clip:1.0", 4)],
)
def test_a_robust_rule_stays_near_the_honest_mean_with_adversaries_below_its_breakdown_point(
    spec: str, adversaries: int, attack: str
) -> None:
    units, weights, target, spread = attacked_round(attack, adversaries)
    rule = make_rule(spec)
    assert adversaries <= rule.breakdown(UNITS)
    result = rule.aggregate(units, weights)
    # Bound: twice the honest spread. The honest units alone scatter by one spread; the coordinate-wise
    # median and geometric median of 6 honest + 4 colluding units sit about one spread off (measured 0.5-1.1).
    assert np.linalg.norm(result.vector - target) < 2.0 * spread


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_mean_is_dragged_far_from_the_honest_mean_by_the_same_adversaries(attack: str) -> None:
    units, weights, target, spread = attacked_round(attack, adversaries=2)
    result = make_rule("mean").aggregate(units, weights)
    # two attackers among ten move the mean by about 20 (colluding) to 100 (scaled) honest spreads
    assert np.linalg.norm(result.vector - target) > 10.0 * spread


def test_the_mean_weights_each_unit_by_its_weight() -> None:
    units = [np.array([0.0, 0.0], np.float32), np.array([3.0, 6.0], np.float32)]
    np.testing.assert_array_equal(make_rule("mean").aggregate(units, [1.0, 2.0]).vector, [2.0, 4.0])


def test_the_mean_equals_numpy_average() -> None:
    rng = np.random.default_rng(1)
    units = [rng.normal(size=50).astype(np.float32) for _ in range(7)]
    weights = rng.uniform(1, 100, size=7).tolist()
    expected = np.average(np.stack(units).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(make_rule("mean").aggregate(units, weights).vector, expected, rtol=1e-6)


def test_trimmed_mean_with_beta_zero_is_the_unweighted_mean() -> None:
    rng = np.random.default_rng(2)
    units = [rng.normal(size=50) for _ in range(6)]
    result = make_rule("trimmed-mean:0").aggregate(units, rng.uniform(1, 100, size=6).tolist())
    np.testing.assert_allclose(result.vector, np.mean(units, axis=0), rtol=1e-6)
    assert result.metrics == {"trimmed_per_side": 0}


def test_trimmed_mean_drops_the_largest_and_smallest_values_of_each_coordinate_whatever_the_weights() -> None:
    columns = np.array([[1.0, 2.0, 3.0, 4.0, 100.0], [-50.0, 0.0, 1.0, 2.0, 3.0]])
    units = [columns[:, i].astype(np.float32) for i in range(5)]
    result = make_rule("trimmed-mean:0.2").aggregate(units, [1.0, 1.0, 1.0, 1.0, 1000.0])
    np.testing.assert_allclose(result.vector, [3.0, 1.0])  # means of (2, 3, 4) and (0, 1, 2)
    assert result.metrics == {"trimmed_per_side": 1}


def test_median_is_taken_per_coordinate_and_ignores_the_weights() -> None:
    units = [np.array(u, np.float32) for u in ([1, 10], [2, 30], [3, 20], [4, 0])]
    np.testing.assert_array_equal(make_rule("median").aggregate(units, [1.0, 1.0, 1.0, 1000.0]).vector, [2.5, 15.0])


def test_multi_krum_drops_the_adversaries_and_reports_which_units_it_kept() -> None:
    units, weights, _, _ = attacked_round("colluding", adversaries=2)
    result = make_rule("multi-krum:2").aggregate(units, weights)
    assert result.metrics == {"selected": list(range(8)), "dropped": [8, 9]}
    expected = np.average(np.stack(units[:8]).astype(np.float64), axis=0, weights=weights[:8])
    np.testing.assert_allclose(result.vector, expected, rtol=1e-5, atol=1e-7)


def test_geomedian_in_one_dimension_is_the_weighted_median() -> None:
    points = [np.array([x], np.float32) for x in (0.0, 1.0, 10.0)]
    np.testing.assert_allclose(make_rule("geomedian").aggregate(points, [1.0, 1.0, 1.0]).vector, [1.0], atol=1e-4)
    np.testing.assert_allclose(make_rule("geomedian").aggregate(points, [1.0, 1.0, 3.0]).vector, [10.0], atol=1e-4)


def test_geomedian_minimises_the_weighted_sum_of_distances() -> None:
    units, weights, _, spread = attacked_round("scaled", adversaries=4)
    result = make_rule("geomedian").aggregate(units, weights)
    assert result.metrics["converged"] and 1 <= result.metrics["iterations"] <= GeometricMedian.max_iterations
    stacked, w = np.stack(units).astype(np.float64), np.asarray(weights)

    def objective(v: np.ndarray) -> float:
        return float(w @ np.linalg.norm(stacked - v, axis=1))

    best = objective(result.vector.astype(np.float64))
    rng = np.random.default_rng(3)
    for _ in range(20):  # no step of 1% of the honest spread in a random direction does better
        step = rng.normal(size=D)
        assert best <= objective(result.vector + 0.01 * spread * step / np.linalg.norm(step))
    assert best < objective(np.median(stacked, axis=0)) and best < objective(np.average(stacked, axis=0, weights=w))


def test_geomedian_breaks_when_a_minority_of_units_holds_most_of_the_weight() -> None:
    # weights are claimed by participants: four units that claim 10x the honest weight break the
    # weighted geometric median although they are fewer than its breakdown count
    units, weights, target, spread = attacked_round("colluding", adversaries=4)
    inflated = weights[:6] + [10.0 * w for w in weights[6:]]
    assert np.linalg.norm(make_rule("geomedian").aggregate(units, inflated).vector - target) > 10.0 * spread


def test_centered_clip_moves_at_most_tau_per_iteration_from_the_coordinate_wise_median() -> None:
    units, weights, _, _ = attacked_round("colluding", adversaries=4)
    rule = CenteredClip(0.05)
    result = rule.aggregate(units, weights)
    start = np.median(np.stack(units).astype(np.float64), axis=0)
    assert np.linalg.norm(result.vector - start) <= rule.iterations * rule.tau * (1 + 1e-6)
    assert result.metrics == {"iterations": 3, "clipped": list(range(UNITS))}


def test_centered_clip_with_a_tau_larger_than_every_distance_is_the_weighted_mean() -> None:
    units, weights, _, _ = attacked_round("scaled", adversaries=0)
    result = CenteredClip(1e6).aggregate(units, weights)
    expected = np.average(np.stack(units).astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(result.vector, expected, rtol=1e-5, atol=1e-7)
    assert result.metrics["clipped"] == []


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_rule_returns_the_common_vector_exactly_when_all_units_are_identical(spec: str, dtype: type) -> None:
    common = np.random.default_rng(4).normal(size=D).astype(np.float32)
    units = [common.astype(dtype) for _ in range(7)]
    result = make_rule(spec).aggregate(units, [float(k) for k in range(1, 8)])
    assert result.vector.dtype == np.float32
    np.testing.assert_array_equal(result.vector, common)


@pytest.mark.parametrize(
    ("spec", "kind", "name"),
    [
        ("mean", MeanRule, "mean"),
        ("trimmed-mean:0.2", TrimmedMean, "trimmed-mean:0.2"),
        ("median", CoordinateMedian, "median"),
        ("multi-krum:2", MultiKrum, "multi-krum:2"),
        ("geomedian", GeometricMedian, "geomedian"),
        ("centered-clip:1.0", CenteredClip, "centered-clip:1.0"),
        (" centered-clip:2 ", CenteredClip, "centered-clip:2.0"),
    ],
)
def test_make_rule_parses_every_valid_form_into_a_rule_named_by_its_canonical_spec(spec: str, kind: type, name: str) -> None:
    rule = make_rule(spec)
    assert isinstance(rule, kind) and rule.name == name
    assert make_rule(rule.name).name == name


@pytest.mark.parametrize(
    "spec",
    ["", "krum", "trimmed-mean", "trimmed-mean:", "trimmed-mean:0.5", "trimmed-mean:-0.1", "trimmed-mean:nan",
     "median:3", "geomedian:", "multi-krum:1.5", "multi-krum:-1", "multi-krum:two", "centered-clip:0", "centered-clip:inf"],
)
def test_make_rule_rejects_a_bad_spec_and_lists_every_valid_form(spec: str) -> None:
    with pytest.raises(ValueError) as err:
        make_rule(spec)
    message = str(err.value)
    assert message.startswith(f"robust.rule: {spec!r}")
    for form in RULE_FORMS:
        assert form.usage() in message
    assert "trimmed-mean:<beta> (0 <= beta < 0.5)" in message and "multi-krum:<f> (integer f >= 0)" in message


def test_parse_spec_serves_any_registry_with_its_own_key_and_forms() -> None:
    forms = (SpecForm("iid"), SpecForm("dirichlet", "alpha", low=0.0, low_open=True), SpecForm("shards", "k", low=1, integer=True))
    assert parse_spec("iid", forms, "data.partition") == ("iid", None)
    assert parse_spec("dirichlet:0.3", forms, "data.partition") == ("dirichlet", 0.3)
    name, k = parse_spec("shards:4", forms, "data.partition")
    assert (name, k, type(k)) == ("shards", 4, int)
    with pytest.raises(ValueError, match=r"data.partition: 'dirichlet:0' needs alpha > 0.*iid, dirichlet:<alpha>"):
        parse_spec("dirichlet:0", forms, "data.partition")


@pytest.mark.parametrize(
    ("spec", "units"),
    [("multi-krum:2", 6), ("trimmed-mean:0.4", 2), ("trimmed-mean:0.2", 4), ("median", 2), ("geomedian", 2)],
)
def test_check_rule_fits_refuses_too_few_units_and_says_what_to_change(spec: str, units: int) -> None:
    rule = make_rule(spec)
    with pytest.raises(ValueError, match=rf"{rule.name}.*needs at least {rule.min_units()} units.*got {units}") as err:
        check_rule_fits(rule, units)
    assert "smaller buckets" in str(err.value) and "fewer adversaries" in str(err.value)


@pytest.mark.parametrize(
    ("spec", "units"),
    [("mean", 1), ("trimmed-mean:0", 1), ("trimmed-mean:0.4", 3), ("trimmed-mean:0.2", 5), ("median", 3),
     ("multi-krum:2", 7), ("multi-krum:0", 3), ("geomedian", 3), ("centered-clip:1.0", 3)],
)
def test_check_rule_fits_accepts_the_fewest_units_each_rule_needs(spec: str, units: int) -> None:
    rule = make_rule(spec)
    check_rule_fits(rule, units)
    assert rule.min_units() == units


def test_a_rule_refuses_to_aggregate_fewer_units_than_it_needs() -> None:
    units = [np.zeros(3, np.float32) for _ in range(6)]
    with pytest.raises(ValueError, match="multi-krum:2.*at least 7 units"):
        make_rule("multi-krum:2").aggregate(units, [1.0] * 6)


@pytest.mark.parametrize(
    ("spec", "units", "tolerated"),
    [("mean", 10, 0), ("trimmed-mean:0.2", 10, 2), ("trimmed-mean:0.2", 14, 2), ("trimmed-mean:0.3", 10, 3),
     ("trimmed-mean:0.29", 100, 29), ("median", 10, 4), ("median", 11, 5), ("multi-krum:2", 10, 2),
     ("geomedian", 9, 4), ("centered-clip:1.0", 10, 4)],
)
def test_breakdown_is_the_number_of_adversarial_units_tolerated(spec: str, units: int, tolerated: int) -> None:
    assert make_rule(spec).breakdown(units) == tolerated


def _unit(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize(
    ("means", "weights", "error"),
    [
        ([], [], "no units"),
        ([_unit(1, 2)] * 7, [1.0] * 6, "7 unit means but 6 weights"),
        ([_unit(1, 2)] * 6 + [_unit(1, 2, 3)], [1.0] * 7, "unit 6 has length 3"),
        ([_unit(1, 2)] * 7, [1.0] * 6 + [0.0], "weights must be finite and > 0"),
        ([_unit(1, 2)] * 7, [1.0] * 6 + [-2.0], "weights must be finite and > 0"),
        ([_unit(1, 2)] * 7, [1.0] * 6 + [float("nan")], "weights must be finite and > 0"),
        ([_unit(1, 2)] * 6 + [_unit(1, np.nan)], [1.0] * 7, "unit 6 has non-finite values"),
        ([_unit(np.inf, 2)] + [_unit(1, 2)] * 6, [1.0] * 7, "unit 0 has non-finite values"),
        ([np.array([1, 2])] * 7, [1.0] * 7, "1-D float numpy array"),
        ([np.ones((2, 2), np.float32)] * 7, [1.0] * 7, "1-D float numpy array"),
    ],
)
def test_every_rule_rejects_invalid_units(spec: str, means: list, weights: list, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make_rule(spec).aggregate(means, weights)


@pytest.mark.parametrize(("overrides", "clipped"), [([], False), (["robust.rule=median"], True), (["secagg.enabled=true"], True)])
def test_a_participant_clips_its_upload_to_robust_clip_norm_whenever_a_bound_is_relied_on(overrides: list, clipped: bool) -> None:
    from fedlora.adapter import adapter_vector
    from fedlora.config import load_config
    from participant.runtime import get_runtime, train_round
    from tests.conftest import SMALL

    cfg = load_config(None, [*SMALL, "federation.participants=4", "train.lr=0.05", "robust.clip_norm=0.01", *overrides])
    runtime = get_runtime(cfg, {"partition-id": 0, "num-partitions": 4}, own_rank=True)
    start, _ = adapter_vector(runtime.loaded.model)
    upload, _ = train_round(runtime, cfg, start.copy(), server_round=1)
    norm = float(np.linalg.norm(upload))
    assert upload.dtype == np.float32
    assert (norm <= 0.01 * (1 + 1e-6)) if clipped else (norm > 0.01)


def test_after_screening_the_rule_keeps_the_most_tolerance_the_kept_units_support() -> None:
    from fedlora.aggregate.robust import rule_after_screening

    krum = make_rule("multi-krum:2")  # tolerates 2 adversarial units, needs 7
    rule, why = rule_after_screening(krum, kept=5, screened=2)  # two sacrificed units must not disable the rule
    assert rule.name == "multi-krum:1" and "set aside 2 of 7" in why and "multi-krum:2" in why
    rule, _ = rule_after_screening(krum, kept=5, screened=1)  # one may remain: 5 units still drop one
    assert rule.name == "multi-krum:1"
    assert rule_after_screening(krum, kept=4, screened=3)[0].name == "multi-krum:0"  # 4 units tolerate none; none remain
    assert rule_after_screening(krum, kept=7, screened=2) == (krum, "")  # enough units: the rule runs
    kept_too_few = rule_after_screening(make_rule("multi-krum:3"), kept=4, screened=1)
    assert kept_too_few[0].name == "multi-krum:3" and kept_too_few[1] == ""  # 2 may remain, 4 units tolerate 0: skipped
    median = make_rule("median")
    assert rule_after_screening(median, kept=2, screened=2)[0].name == "mean"  # 4 units tolerate 1; 2 were set aside
    assert rule_after_screening(median, kept=2, screened=1)[0].name == "mean"  # 3 units tolerate 1, and 1 was set aside
    assert rule_after_screening(median, kept=0, screened=3) == (median, "")


def test_sacrificing_units_to_screening_does_not_let_an_outlier_through() -> None:
    from fedlora.aggregate.robust import rule_after_screening

    honest = [np.full(6, 1.0) + 0.01 * k for k in range(4)]
    outlier = np.full(6, -50.0)
    rule, _ = rule_after_screening(make_rule("multi-krum:2"), kept=5, screened=2)
    result = rule.aggregate([*honest, outlier], [1.0] * 5)
    assert result.metrics["dropped"] == [4] and np.all(result.vector > 0.9)


@pytest.mark.parametrize(
    ("rule", "attackers", "participants", "bucket", "verdict"),
    [
        ("geomedian", 0.2, 15, 1, ""),  # 3 of 15 plaintext units, 7 tolerated
        ("geomedian", 0.2, 20, 5, "buckets of 2 would hold"),  # 2.7 of 4 buckets touched, 1 tolerated
        ("median", 0.33, 15, 2, "no smaller bucket holds it"),  # 3.9 of 7 touched, 3 tolerated; plaintext would
        ("multi-krum:2", 0.2, 15, 1, "no smaller bucket holds it"),  # 3 attackers, 2 tolerated
    ],
)
def test_a_rule_that_cannot_hold_the_expected_attackers_is_named_with_a_bucket_size_that_would(rule, attackers, participants, bucket, verdict) -> None:
    warning = capacity_warning(make_rule(rule), attackers, participants, bucket)
    assert (verdict in warning) and (bool(warning) == bool(verdict))
    if bucket > 1:
        units = participants // bucket
        assert touched_units(attackers, bucket, units) == pytest.approx(units * (1 - (1 - attackers) ** bucket))


def test_a_run_warns_when_its_buckets_hold_more_attackers_than_its_rule_tolerates() -> None:
    from fedlora.config import load_config

    cfg = load_config(None, ["secagg.enabled=true", "secagg.bucket_size=5", "federation.participants=20", "robust.rule=geomedian",
                             "robust.expected_attackers=0.2"])
    assert "buckets of 2 would hold" in cfg.robustness_warning()
    assert load_config(None, ["robust.rule=geomedian", "robust.expected_attackers=0.2"]).robustness_warning() == ""
