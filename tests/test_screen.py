"""Screening sets aside units that cannot be combined, with a reason, and never fails the round."""

from pathlib import Path

import numpy as np
import pytest

from coordinator.gather import Gathered, Member
from coordinator.rounds import Coordinator
from fedlora.aggregate import Unit
from fedlora.aggregate.screen import screen_units
from fedlora.config import load_config
from tests.conftest import SMALL


def _unit(name: str, vector: np.ndarray, weight: float = 2.0) -> Unit:
    return Unit((name,), np.asarray(vector, dtype=np.float64), weight)


def _honest(count: int, d: int = 8, seed: int = 0) -> list[Unit]:
    rng = np.random.default_rng(seed)
    return [_unit(f"p{i}", rng.normal(size=d)) for i in range(count)]


def test_nan_inf_wrong_length_and_bad_weights_are_set_aside_with_their_reason() -> None:
    bad = [
        _unit("nan", np.full(8, np.nan)),
        _unit("inf", np.r_[np.ones(7), np.inf]),
        _unit("short", np.ones(7)),
        Unit(("weightless",), np.ones(8), 0.0),
    ]
    kept, rejected = screen_units(_honest(4) + bad, 8, 10.0)
    assert [u.members[0] for u in kept] == ["p0", "p1", "p2", "p3"]
    reasons = {r.members[0]: r.reason for r in rejected}
    assert "non-finite" in reasons["nan"] and "non-finite" in reasons["inf"]
    assert "shape (7,)" in reasons["short"] and "weight 0.0" in reasons["weightless"]


def test_an_update_far_outside_the_rounds_norms_is_set_aside() -> None:
    units = _honest(5) + [_unit("huge", np.full(8, 100.0))]
    kept, rejected = screen_units(units, 8, 10.0)
    assert [r.members for r in rejected] == [("huge",)] and "exceeds 10 x the round's median" in rejected[0].reason
    assert len(kept) == 5
    assert len(screen_units(units, 8, 0.0)[0]) == 6  # 0 switches norm screening off


def test_with_fewer_than_three_units_there_is_no_norm_distribution_to_screen_against() -> None:
    units = _honest(1) + [_unit("huge", np.full(8, 100.0))]
    assert len(screen_units(units, 8, 10.0)[0]) == 2


@pytest.mark.parametrize("ratio", [0.5, 1.0, -2.0])
def test_a_norm_ratio_that_would_reject_typical_updates_is_refused(ratio) -> None:
    with pytest.raises(Exception, match="robust.max_norm_ratio"):
        load_config(None, [f"robust.max_norm_ratio={ratio}"])


def test_screened_units_are_listed_in_the_round_row_and_the_round_goes_on(tmp_path: Path) -> None:
    coordinator = Coordinator(load_config(None, SMALL + ["federation.participants=5", "lora.mode=frozen-a"]), tmp_path)
    length = coordinator.server_length
    rng = np.random.default_rng(0)
    members = [Member(i, f"participant-{i}", 10, {"train_loss": 1.0}) for i in range(5)]
    units = [_unit(m.name, rng.normal(size=length) * 1e-3, 10) for m in members[:3]]
    units += [_unit("participant-3", np.full(length, np.nan), 10), _unit("participant-4", np.ones(length), 10)]
    row = coordinator.apply(1, 5, Gathered(units, members, []))
    assert row["applied"] and row["participants"] == 3
    skipped = {s["participant"]: s["reason"] for s in row["skipped"]}
    assert set(skipped) == {"participant-3", "participant-4"}
    assert "non-finite" in skipped["participant-3"] and "median" in skipped["participant-4"]


def test_a_unit_longer_than_the_clip_bound_is_set_aside_whatever_the_others_sent() -> None:
    clipped = np.array([0.6, 0.8])  # norm 1 = C
    bucket = Unit.from_total(("a", "b"), clipped * 3 + np.array([0.0, 1.0]) * 5, 8.0)  # weighted mean of two clipped updates
    over = Unit.from_total(("c", "attacker"), clipped * 2 + np.array([10.0, 0.0]) * 2, 4.0)  # one member skipped clipping
    kept, rejected = screen_units([bucket, over], 2, 0.0, clip_norm=1.0)  # two units: no distribution, still caught
    assert kept == [bucket] and rejected[0].members == ("c", "attacker") and "robust.clip_norm=1" in rejected[0].reason
    assert len(screen_units([bucket, over], 2, 0.0)[0]) == 2  # without clipping there is no bound to hold units to


def test_the_clip_bound_allows_for_the_secure_sums_fixed_point_error() -> None:
    edge = Unit.from_total(("a", "b"), np.array([2.0 + 1e-3, 0.0]), 2.0, error_bound=1e-3)  # mean 1 + 5e-4 within the error
    assert screen_units([edge], 2, 0.0, clip_norm=1.0)[0] == [edge]
    exact = Unit.from_total(("a", "b"), np.array([2.0 + 1e-3, 0.0]), 2.0)
    assert screen_units([exact], 2, 0.0, clip_norm=1.0)[0] == []


@pytest.mark.parametrize(("rule", "screened"), [("median", True), ("mean", False)])
def test_the_coordinator_holds_units_to_the_clip_bound_when_participants_clip(tmp_path: Path, rule: str, screened: bool) -> None:
    cfg = load_config(None, SMALL + ["federation.participants=5", "lora.mode=frozen-a", f"robust.rule={rule}", "robust.clip_norm=0.5"])
    coordinator = Coordinator(cfg, tmp_path)
    length = coordinator.server_length
    rng = np.random.default_rng(0)
    members = [Member(i, f"participant-{i}", 10, {"train_loss": 1.0}) for i in range(5)]
    units = [_unit(m.name, rng.normal(size=length) * 1e-3, 10) for m in members[:4]]
    units.append(_unit("participant-4", np.full(length, 0.5 / np.sqrt(length) * 1.5), 10))  # 1.5 C: not clipped
    row = coordinator.apply(1, 5, Gathered(units, members, []))
    skipped = {s["participant"]: s["reason"] for s in row["skipped"]}
    assert ("participant-4" in skipped and "robust.clip_norm" in skipped["participant-4"]) == screened
