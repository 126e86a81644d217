"""Distributed user-level DP under secure aggregation: Skellam noise added in shares before masking.

The stages run in-process over Flower messages (`coordinator.local_grid.LocalGrid`), as in
tests/test_secure_federation.py, on synthetic updates of 20000 coordinates, so that the
statistics of one bucket's noise are tight: the sample std of 20000 Gaussian-like draws has a
standard error of 1/sqrt(2 * 20000) = 0.5%, and the tests allow 3% (6 standard errors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from flwr.clientapp import ClientApp
from scipy import stats

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from coordinator.secure import secure_sum
from fedlora.aggregate.screen import noise_norm_bound, screen_units
from fedlora.config import ConfigError, PrivacySection, SecaggSection, load_config
from fedlora.privacy.accountant import RoundAccountant
from fedlora.privacy.noise import SKELLAM_MU_MAX, SKELLAM_SUM_MU_MAX, secret_rng, skellam, skellam_mu
from fedlora.secagg import clip
from fedlora.secagg.plan import check_fixed_point, participant_skellam_mu, sum_noise_std
from fedlora.secure_wire import STAGE
from participant import secure as participant_secure
from participant.app import app as participant_app
from participant.terms import Terms
from tests.conftest import SMALL

D = 20_000
TOLERANCE = 0.03  # relative, on a std estimated from D draws (standard error 0.5%)


def _federation(n: int, z: float, margin: float = 0.0, seed: int = 0, key: bytes | None = None):
    """n nodes holding updates for round 3 (half of them longer than C = 1), configured for DP."""
    app = ClientApp()
    participant_secure.register(app)
    nodes = [5000 + 3 * i for i in range(n)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    rng = np.random.default_rng(seed)
    updates = {}
    for i, node in enumerate(nodes):
        updates[node] = (rng.normal(size=D) * (0.02 if i % 2 else 0.002)).astype(np.float32)  # norms ~2.8 and ~0.28
        participant_secure.keep_update(
            grid.contexts[node], updates[node], int(rng.integers(5, 200)), 3, key or os.urandom(32),
            Terms.of(SecaggSection(enabled=True), PrivacySection(noise_multiplier=z, dropout_margin=margin), 1.0),
        )
    members = [Member(node, f"participant-{i}", 10) for i, node in enumerate(nodes)]
    return grid, members, updates


def _noise(result, updates, members, names=None):
    """The decoded bucket sum minus the exact (unweighted) sum of its members' clipped updates."""
    (unit,) = result.buckets
    names = set(unit.members) if names is None else names
    exact = sum(clip(updates[m.node], 1.0) for m in members if m.name in names)
    return unit, unit.total - exact


def _run(grid, members, z: float, margin: float = 0.0):
    privacy = PrivacySection(noise_multiplier=z, dropout_margin=margin)
    return secure_sum(grid, members, SecaggSection(enabled=True, timeout_s=1.0), server_round=3, length=D,
                      run_tag="t", clip_norm=1.0, privacy=privacy)


def test_each_bucket_sum_carries_noise_of_std_z_c_on_the_update_coordinates_only() -> None:
    z = 1.3
    grid, members, updates = _federation(4, z)
    result = _run(grid, members, z)
    assert not result.aborted and result.layout[0]["status"] == "ok"  # the count slot check passed
    unit, noise = _noise(result, updates, members)
    assert sorted(unit.members) == sorted(m.name for m in members)
    # The std is z C, up to the rounding term of the sensitivity (C scale + sqrt(d)) / (C scale).
    assert noise.std() == pytest.approx(z, rel=TOLERANCE)
    assert noise.std() == pytest.approx(result.layout[0]["noise_std"], rel=TOLERANCE)
    assert result.layout[0]["noise_std"] == pytest.approx(z, rel=0.005)
    assert abs(noise.mean()) < 5 * z / math.sqrt(D)
    assert abs(stats.kurtosis(noise)) < 0.2  # Gaussian-like (standard error of the excess kurtosis: 0.035)
    # Each participant counts once (weight reference 1): the weight slot decodes to the member count,
    # within the fixed point's error (~1e-4), where noise on it would move it by ~z.
    assert abs(unit.weight - 4) <= unit.weight_error < 1e-3


def test_the_dropout_margin_raises_the_noise_and_a_loss_before_masking_lowers_it() -> None:
    z, margin, k = 1.0, 0.2, 5
    # All members mask: the noise is z C / sqrt(1 - m).
    grid, members, updates = _federation(k, z, margin, seed=1)
    result = _run(grid, members, z, margin)
    _, noise = _noise(result, updates, members)
    assert noise.std() == pytest.approx(z / math.sqrt(1 - margin), rel=TOLERANCE)
    # One member is set up but never sends its masked input: neither its update nor its noise
    # share is in the sum, so the noise is z C sqrt((k - 1) / (k (1 - m))), here exactly z C.
    grid, members, updates = _federation(k, z, margin, seed=2)
    grid.silent.add((members[2].node, STAGE["mask_input"].message_type))
    result = _run(grid, members, z, margin)
    unit, noise = _noise(result, updates, members)
    assert members[2].name not in unit.members and len(unit.members) == k - 1
    assert noise.std() == pytest.approx(z * math.sqrt((k - 1) / (k * (1 - margin))), rel=TOLERANCE)
    assert noise.std() == pytest.approx(result.layout[0]["noise_std"], rel=TOLERANCE)
    assert result.layout[0]["noise_multiplier"] == pytest.approx(z)  # 4 of 5 = k (1 - m): the target just holds
    # One member vanishes after sending its masked input: it is recovered, its noise share with it.
    grid, members, updates = _federation(k, z, margin, seed=3)
    grid.silent.add((members[2].node, STAGE["unmask"].message_type))
    result = _run(grid, members, z, margin)
    unit, noise = _noise(result, updates, members)
    assert [r["participant"] for r in result.recovered] == [members[2].name] and len(unit.members) == k
    assert noise.std() == pytest.approx(z / math.sqrt(1 - margin), rel=TOLERANCE)
    # Without a margin, the same loss before masking leaves the bucket below the target: its sum is
    # discarded (never combined into the adapter), its real noise multiplier reported for the
    # coordinator's view, which saw it.
    grid, members, updates = _federation(k, z, 0.0, seed=4)
    grid.silent.add((members[2].node, STAGE["share_keys"].message_type))
    result = _run(grid, members, z, 0.0)
    (bucket,) = result.layout
    assert not result.buckets and bucket["status"] == "discarded" and "below the run's" in bucket["reason"]
    assert bucket["noise_multiplier"] == pytest.approx(z * math.sqrt((k - 1) / k))
    assert sorted(bucket["survivors"]) == sorted(m.name for m in members if m is not members[2])


def test_the_noise_is_secret_randomness_not_repeated_by_identical_runs() -> None:
    # Same updates, same (fixed) rounding keys: without noise two runs give the same sum exactly.
    sums = {}
    for z in (0.0, 1.0):
        runs = []
        for _ in range(2):
            grid, members, updates = _federation(3, z, key=bytes(32))
            runs.append(_run(grid, members, z).buckets[0].total)
        sums[z] = runs
    np.testing.assert_array_equal(*sums[0.0])
    first, second = sums[1.0]
    assert abs(np.corrcoef(first - sums[0.0][0], second - sums[0.0][0])[0, 1]) < 0.05


def test_skellam_draws_have_variance_2_mu_and_refuse_means_numpy_cannot_draw() -> None:
    mu = participant_skellam_mu(1.0, 1.0, check_fixed_point(1.0, 4, 1.0, 0.0, D), 4, 0.0, D)
    assert 0.5 * SKELLAM_MU_MAX < mu <= SKELLAM_MU_MAX  # small buckets sit at the sampler's bound
    draws = skellam(mu, 200_000, secret_rng())
    assert draws.dtype == np.int64 and draws.var() == pytest.approx(2 * mu, rel=0.02)
    assert skellam_mu(2.0, 3.0, 4, 0.5) == pytest.approx((2.0 * 3.0) ** 2 / (2 * 4 * 0.5))
    with pytest.raises(ValueError, match="inaccurate"):
        skellam(4 * SKELLAM_MU_MAX, 10, secret_rng())


@pytest.mark.parametrize("members", [2, 10, 100, 1000])
def test_the_plan_leaves_ten_sigma_of_the_noise_above_the_worst_case_sum(members: int) -> None:
    for z, margin in ((0.5, 0.0), (1.0, 0.0), (1.0, 0.3), (4.0, 0.1)):
        scale = check_fixed_point(1.0, members, z, margin, D)
        bound = math.ceil(math.sqrt(2.0) * (1 + 1e-9) * scale)  # one member's largest coordinate
        assert members * bound + 10 * sum_noise_std(z, 1.0, scale, margin, D) <= 2**31 - 1
        mu = participant_skellam_mu(z, 1.0, scale, members, margin, D)
        assert mu <= SKELLAM_MU_MAX and members * mu <= SKELLAM_SUM_MU_MAX  # numpy draws it accurately
        assert scale <= check_fixed_point(1.0, members)  # noise never buys a finer scale


def test_an_honest_participant_refuses_a_setup_that_weights_it_or_changes_the_noise() -> None:
    # A coordinator without DP settings binds example weights and no noise: DP participants refuse.
    grid, members, _ = _federation(3, 1.0)
    result = secure_sum(grid, members, SecaggSection(enabled=True, timeout_s=1.0), server_round=3, length=D,
                        run_tag="t", clip_norm=1.0)
    assert not result.buckets and {r.participant for r in result.skipped} == {m.name for m in members}
    assert "noise_multiplier=0" in result.skipped[0].reason
    # One bound with a different noise multiplier than they were configured with: refused too.
    grid, members, _ = _federation(3, 1.0)
    result = _run(grid, members, 0.5)
    assert not result.buckets and "noise_multiplier=0.5" in result.skipped[0].reason


def test_dp_with_secure_aggregation_loads_and_an_impossible_noise_plan_is_refused() -> None:
    cfg = load_config(None, [*SMALL, "federation.participants=4", "secagg.enabled=true", "privacy.noise_multiplier=1.0"])
    assert cfg.secagg.enabled and cfg.privacy.noise_multiplier == 1.0
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, "federation.participants=4", "secagg.enabled=true", "privacy.noise_multiplier=1e9"])
    message = str(err.value)
    assert message.startswith("privacy.noise_multiplier")
    assert all(key in message for key in ("secagg.bucket_size", "robust.clip_norm", "32-bit fixed point"))


def test_a_whole_distributed_dp_round_reports_epsilon_and_the_coordinator_adds_no_noise(tmp_path: Path) -> None:
    cfg = load_config(None, [
        *SMALL, "federation.participants=4", "federation.fraction=1.0", "federation.rounds=1",
        "secagg.enabled=true", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5",
    ])
    grid = LocalGrid(participant_app, {p + 1: {"partition-id": p, "num-partitions": 4} for p in range(4)})
    run = Coordinator(cfg, tmp_path)
    assert run.dp is not None and run.dp.noisy.noise_std == 0  # the participants add the noise
    rows = run.run(grid)
    (row,) = [r for r in rows if r["round"] == 1]
    reference = RoundAccountant(1e-5)
    reference.compose(1.0, 1.0)
    assert row["applied"] and row["participants"] == 4
    assert row["epsilon"] == pytest.approx(reference.epsilon(), rel=1e-9)
    assert row["dp"]["noise_std"] == 0
    (bucket,) = row["secagg"]["buckets"]
    inflated = 1.0 / math.sqrt(1.0 - cfg.privacy.dropout_margin)  # every member masked: the margin's extra noise is present
    assert bucket["status"] == "ok" and bucket["noise_std"] == pytest.approx(inflated * cfg.robust.clip_norm, rel=0.01)
    # Against the coordinator: one unamplified Gaussian round at the noise present, for every member.
    seen = dp_accounting.rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(inflated)).get_epsilon(1e-5)
    assert row["epsilon_coordinator"] == pytest.approx(seen, rel=1e-9)  # q = 1 here: the margin's extra noise shows
    assert run.dp.coordinator_epsilons() == pytest.approx({f"participant-{p}": seen for p in range(4)}, rel=1e-9)
    # What is published (the signed manifests) under DP: epsilon and delta, no counts, no un-noised metrics.
    for version in ("round-0000", "round-0001", "final"):
        facts = json.loads((tmp_path / "adapters" / version / "manifest.json").read_text())["facts"]
        assert not {"participants", "metrics", "train_loss", "eval_loss", "eval_accuracy"} & set(facts)
    assert facts["epsilon"] == pytest.approx(row["epsilon"]) and "train_loss" not in row  # sites keep their losses under DP
    # Clipped updates alone move the adapter by at most C (the mean of 4 over q N = 4); the
    # participants' noise, of std z C / (q N) per coordinate, moves it far more.
    assert row["update_norm"] > 10 * cfg.robust.clip_norm


def _dp_federation_with_attacker(z: float, attacker: int | None, scale_to: float):
    """4 members under distributed DP; `attacker` (if any) holds an update of norm `scale_to` and masks it unclipped."""
    app = ClientApp()
    participant_secure.register(app)
    nodes = [7000 + i for i in range(4)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    rng = np.random.default_rng(5)
    updates = {}
    for i, node in enumerate(nodes):
        update = rng.normal(size=D)
        updates[node] = (update / np.linalg.norm(update) * (scale_to if i == attacker else 0.5)).astype(np.float32)
        participant_secure.keep_update(
            grid.contexts[node], updates[node], 10, 3, os.urandom(32),
            Terms.of(SecaggSection(enabled=True), PrivacySection(noise_multiplier=z, dropout_margin=0.0), 1.0), adversary=i == attacker,
        )
    return grid, [Member(node, f"participant-{i}", 10) for i, node in enumerate(nodes)]


def test_a_noisy_bucket_sum_is_screened_against_the_clip_bound_with_its_noise_allowed_for() -> None:
    # An honest bucket's noisy mean is far longer than C (noise of std z C on each of 20,000
    # coordinates), so a screen that ignored the noise would reject every honest bucket; with the
    # noise allowed for it passes. A member that masks an input 100 x the noise bound longer than
    # C is caught in the same sum, with its bucket.
    z = 1.0
    grid, members = _dp_federation_with_attacker(z, None, 0.0)
    (honest,) = _run(grid, members, z).buckets
    assert np.linalg.norm(honest.mean) > 10 * 1.0
    kept, rejected = screen_units([honest], D, 0.0, 1.0)
    assert kept == [honest] and not rejected
    assert screen_units([dataclasses.replace(honest, noise_std=0.0)], D, 0.0, 1.0)[1]  # the allowance is what lets it pass
    big = 100 * noise_norm_bound(honest.noise_std, D)
    grid, members = _dp_federation_with_attacker(z, 0, big)
    (attacked,) = _run(grid, members, z).buckets
    kept, rejected = screen_units([attacked], D, 0.0, 1.0)
    assert not kept and "exceeds robust.clip_norm" in rejected[0].reason


def test_a_robust_rule_is_allowed_with_distributed_dp_but_not_with_central_dp() -> None:
    dp = ["privacy.noise_multiplier=1.0", "federation.participants=20", "federation.fraction=1.0", "robust.rule=geomedian"]
    cfg = load_config(None, [*dp, "secagg.enabled=true", "secagg.bucket_size=4"])
    assert cfg.robust.rule == "geomedian" and cfg.norm_screens == (0.0, cfg.robust.clip_norm)
    with pytest.raises(ConfigError, match="central DP"):
        load_config(None, dp)

