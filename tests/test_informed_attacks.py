"""Attacks that know the defence (fedlora/attacks.py `Knowledge`) and lie about more than their update,
run through the coordinator's plaintext path: attack, gather (weights from claims), screen, rule."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from coordinator.gather import Member, as_sent, gather_plaintext
from fedlora.aggregate import Unit, combine_units
from fedlora.aggregate.robust import make_rule, rule_after_screening
from fedlora.aggregate.screen import screen_units
from fedlora.aggregate.weights import unit_weights
from fedlora.attacks import Knowledge, alie_z, attack_updates, resolve_attack

RULES = ["mean", "geomedian", "centered-clip:1.0", "median", "trimmed-mean:0.2", "multi-krum:1"]
C = 1.0  # robust.clip_norm
D = 64
CLAIM = 60  # every honest participant's example count
LIAR = "p14"


def honest_updates(count: int = 14, seed: int = 0) -> list[np.ndarray]:
    """Clipped updates around one direction, each of norm below C, as honest participants send them."""
    rng = np.random.default_rng(seed)
    direction = np.ones(D) / np.sqrt(D)
    return [(0.6 * direction + 0.3 * rng.standard_normal(D) / np.sqrt(D)).astype(np.float32) for _ in range(count)]


HONEST = honest_updates()
HONEST_MEAN = np.mean(HONEST, axis=0, dtype=np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def received(
    spec: str, weighting: str = "capped", rule: str = "mean", attackers: tuple[str, ...] = (LIAR,), honest: list[np.ndarray] = HONEST
) -> tuple[list[Member], list[Unit], list[str]]:
    """What the coordinator combines when `attackers` (the last names) run `spec`: the members as
    received, the units that passed screening (C, max_norm_ratio 10) and the screened names."""
    own = honest_updates(len(attackers), seed=1)  # what the attackers trained
    vectors = [*honest, *own]
    members = [Member(i, f"p{i:02d}", CLAIM, {"train_loss": 1.0, "partition_id": i}, v) for i, v in enumerate(vectors)]
    knowledge = Knowledge(rule=rule, clip_norm=C, clip_screen=True, max_norm_ratio=10.0)
    sent = attack_updates({m.name: m.vector for m in members}, set(attackers), resolve_attack(spec), np.random.default_rng(0), knowledge)
    members = as_sent(members, sent)
    gathered = gather_plaintext(members, lambda m: D, lambda ms: [m.vector for m in ms], lambda claims: unit_weights(claims, weighting, 2.0))
    kept, rejected = screen_units(gathered.units, D, 10.0, C)
    return members, kept, [name for r in rejected for name in r.members]


@pytest.mark.parametrize("rule", RULES)
def test_one_attacker_claiming_a_million_examples_weighs_exactly_the_cap_and_turns_no_rule(rule: str) -> None:
    members, units, screened = received("count-inflation:1000000", rule=rule)
    assert members[-1].num_examples == 10**6 and not screened  # the lie arrived, and passed every screen
    (liar,) = [u for u in units if u.members == (LIAR,)]
    assert np.linalg.norm(liar.mean) == pytest.approx(C, rel=1e-6)
    assert cosine(liar.mean, HONEST_MEAN) == pytest.approx(-1.0)
    assert liar.weight == 2.0 * CLAIM  # robust.weight_cap times the median claim, not 10^6
    delta = combine_units(units, make_rule(rule)).delta.astype(np.float64)
    assert cosine(delta, HONEST_MEAN) > 0
    # The lie buys nothing beyond the cap: the same round with an honest claim of the cap.
    _, at_cap, _ = received(f"count-inflation:{int(2 * CLAIM)}", rule=rule)
    np.testing.assert_allclose(delta, combine_units(at_cap, make_rule(rule)).delta, rtol=1e-6, atol=1e-7)
    if rule == "mean":  # it moves the mean by its weight share of its distance to the honest mean, no more
        share = liar.weight / sum(u.weight for u in units)
        assert np.linalg.norm(delta - HONEST_MEAN) <= share * (C + np.linalg.norm(HONEST_MEAN)) * (1 + 1e-6)


def test_with_claimed_weights_the_same_attacker_turns_the_mean_around() -> None:
    _, units, screened = received("count-inflation:1000000", weighting="claimed")
    assert not screened
    assert cosine(combine_units(units).delta.astype(np.float64), HONEST_MEAN) < -0.9


def test_ipm_clip_sends_exactly_the_clip_bound_against_the_honest_mean_and_passes_the_clip_screen() -> None:
    members, units, screened = received("ipm-clip")
    sent = members[-1].vector.astype(np.float64)
    assert abs(np.linalg.norm(sent) - C) <= 1e-5 and not screened and len(units) == 15
    assert cosine(sent, HONEST_MEAN) == pytest.approx(-1.0)
    assert members[-1].num_examples == CLAIM  # it claims what it trained on


def test_blind_ipm_clip_points_against_its_own_update_at_the_clip_bound() -> None:
    own = np.array([3.0, 4.0], np.float32)
    sent = resolve_attack("ipm-clip")(own, [], np.random.default_rng(0), Knowledge(clip_norm=2.5, secure=True)).update
    np.testing.assert_allclose(sent, [-1.5, -2.0], rtol=1e-6)


@pytest.mark.parametrize(("n", "m", "quantile"), [(50, 12, 36 / 50), (15, 3, 10 / 15), (8, 5, 7 / 8)])
def test_alie_auto_takes_z_from_the_participants_and_attackers_as_baruch_et_al(n: int, m: int, quantile: float) -> None:
    # s = floor(n/2 + 1) - m supporters: 26 - 12 = 14, 8 - 3 = 5; 5 - 5 = 0 needs none: taken as s = 1.
    assert alie_z(n, m) == pytest.approx(NormalDist().inv_cdf(quantile), abs=1e-12)
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)  # the paper's example, z ~ 0.58


def test_alie_auto_sends_the_honest_mean_minus_z_deviations_for_the_rounds_coalition() -> None:
    honest = honest_updates(4)
    updates = {"a": honest[0], "b": honest[1], "c": honest[2], "d": honest[3], "x": honest[0], "y": honest[1]}
    sent = attack_updates(updates, {"x", "y"}, resolve_attack("alie-auto"), np.random.default_rng(0))
    stacked = np.stack(honest).astype(np.float64)
    z = alie_z(6, 2)  # floor(4) - 2 = 2 supporters: Phi^-1(4 / 6)
    np.testing.assert_allclose(sent["x"].update, stacked.mean(axis=0) - z * stacked.std(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(sent["x"].update, sent["y"].update)


def test_alie_auto_stays_within_the_clip_bound_it_knows() -> None:
    spread = [np.array([4.0, 0.0], np.float32), np.array([-4.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32)]
    sent = resolve_attack("alie-auto")(spread[0], spread, np.random.default_rng(0), Knowledge(clip_norm=1.0, clip_screen=True, participants=4))
    assert np.linalg.norm(sent.update) == pytest.approx(1.0, rel=1e-6)


def test_sacrificed_attackers_are_screened_and_force_the_fallback_which_still_holds() -> None:
    # multi-krum:2 needs 7 units; of 8 with 3 attackers, 8 - 7 + 1 = 2 sacrifice themselves.
    attackers = ("p05", "p06", "p07")
    members, units, screened = received("sacrifice", rule="multi-krum:2", attackers=attackers, honest=HONEST[:5])
    assert screened == ["p05", "p06"]
    assert [np.linalg.norm(m.vector) for m in members[5:7]] == pytest.approx([2 * C, 2 * C], rel=1e-6)  # twice the clip bound
    rule, why = rule_after_screening(make_rule("multi-krum:2"), len(units), len(screened))
    assert rule.name == "multi-krum:1" and "screening set aside 2 of 8 units" in why
    # The one attacker left (alie-auto among 6 units) is within the tolerance of the rule it forced.
    honest_mean = np.mean(HONEST[:5], axis=0, dtype=np.float64)
    delta = combine_units(units, rule).delta.astype(np.float64)
    assert np.linalg.norm(delta - honest_mean) <= max(np.linalg.norm(h - honest_mean) for h in HONEST[:5])
    assert cosine(delta, honest_mean) > 0.9


def test_blind_sacrifice_sends_far_beyond_the_encoding_and_the_rest_ipm_clip() -> None:
    attack, own = resolve_attack("sacrifice:1"), np.array([3.0, 4.0], np.float32)
    knowledge = Knowledge(clip_norm=2.0, clip_screen=True, participants=10, attackers=3, secure=True)
    sacrificed = attack(own, [], np.random.default_rng(0), knowledge).update
    attacking = attack(own, [], np.random.default_rng(0), Knowledge(clip_norm=2.0, participants=10, attackers=3, index=1, secure=True)).update
    assert np.linalg.norm(sacrificed) == pytest.approx(2e6, rel=1e-6)
    np.testing.assert_allclose(attacking, [-1.2, -1.6], rtol=1e-6)
