"""Central user-level DP (DP-FedAvg): the noise, the estimator, Poisson sampling, the budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.aggregate import Unit, combine_units
from fedlora.config import ConfigError, load_config
from fedlora.privacy.accountant import RoundAccountant
from fedlora.privacy.noise import NoisySum, secret_rng
from fedlora.privacy.user_level import UserLevelDP
from participant.app import app
from tests.conftest import SMALL

DP = ["privacy.noise_multiplier=1.0", "federation.participants=4", "federation.fraction=0.5"]


def test_the_added_noise_has_std_z_times_c() -> None:
    z, clip_norm = 1.3, 0.7
    noisy = NoisySum(clip_norm, z * clip_norm, expected_count=1.0)
    noise = noisy.estimate([np.zeros(400_000)], secret_rng())
    assert abs(noise.mean()) < 5 * z * clip_norm / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip_norm, rel=0.01)  # the std's standard error here is 0.1%


def test_the_noise_is_fresh_secret_randomness_not_the_run_seed() -> None:
    noisy = NoisySum(1.0, 1.0, 1.0)
    first, second = (noisy.estimate([np.zeros(64)], secret_rng()) for _ in range(2))
    assert not np.allclose(first, second)


def test_the_estimate_clips_each_participant_and_divides_by_the_expected_count() -> None:
    big, small = np.full(4, 10.0), np.array([0.1, 0.0, 0.0, 0.0])
    units = [Unit.from_total(("a",), big * 50, 50.0), Unit.from_total(("b",), small * 7, 7.0)]  # example weights play no part
    combined = combine_units(units, noisy=NoisySum(1.0, 0.0, expected_count=4.0), rng=secret_rng())
    np.testing.assert_allclose(combined.delta, (big / np.linalg.norm(big) + small) / 4.0, rtol=1e-6)
    assert "participant_updates" not in combined.metrics  # no un-noised per-participant norms are released


def test_poisson_sampling_draws_each_participant_independently_with_rate_q() -> None:
    cfg = load_config(None, [*SMALL, *DP, "federation.participants=100", "federation.fraction=0.1", "privacy.delta=1e-3"])
    dp = UserLevelDP(cfg)
    counts = [len(dp.sample(list(range(1000)))) for _ in range(50)]
    assert abs(np.mean(counts) - 100) < 4 * np.sqrt(1000 * 0.1 * 0.9 / 50)
    assert len(set(counts)) > 1  # the count itself is random, as the analysis assumes
    assert UserLevelDP(cfg).sample(list(range(1000))) != UserLevelDP(cfg).sample(list(range(1000)))  # not from the seed


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["robust.rule=median", "federation.fraction=1.0"], "robust.rule", "only the mean"),
        (["lora.mode=exact"], "lora.mode", "B·A"),
        (["privacy.delta=0.3"], "privacy.delta", "1 / federation.participants"),
        (["privacy.epsilon_budget=0.01"], "privacy.epsilon_budget", "raise privacy.noise_multiplier to at least"),
    ],
)
def test_dp_settings_that_cannot_hold_fail_at_load_time(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, *DP, *overrides])
    assert str(err.value).startswith(key) and words in str(err.value)


def test_dp_defaults_to_frozen_a() -> None:
    assert load_config(None, [*SMALL, *DP]).lora.mode == "frozen-a"


def test_a_run_reports_epsilon_per_round_and_stops_before_its_budget(tmp_path: Path) -> None:
    reference = RoundAccountant(1e-5)
    eps = []
    for _ in range(3):
        reference.compose(0.5, 1.0)
        eps.append(reference.epsilon())
    budget = (eps[1] + eps[2]) / 2  # two rounds fit, the third would not
    cfg = load_config(None, [*SMALL, *DP, "federation.rounds=4", "federation.min_participants=1", f"privacy.epsilon_budget={budget}"])
    grid = LocalGrid(app, {p + 1: {"partition-id": p, "num-partitions": 4} for p in range(4)})
    rows = Coordinator(cfg, tmp_path).run(grid)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["epsilon"] for r in rows[1:3]] == pytest.approx(eps[:2], rel=1e-9)
    assert "privacy budget" in rows[3]["stopped"] and "epsilon_budget" in rows[3]["stopped"]
    assert all(r["epsilon"] <= budget for r in rows[1:3])
    from fedlora.audit import read_records, verify

    assert verify(tmp_path / "audit.jsonl")[0] == []  # the run's audit log: intact, with epsilon and the stop
    events = read_records(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == ["run", "round", "round", "stopped", "ended"]
    assert events[3]["stopped_by"] == "privacy_budget" and events[4]["rounds_applied"] == sum(bool(r.get("applied")) for r in rows)
    assert [e["epsilon"] for e in events[1:3]] == pytest.approx(eps[:2], rel=1e-9) and len(events[1]["adapter_sha256"]) == 64


def test_each_participants_local_epsilon_is_reported_in_the_round_row(tmp_path: Path) -> None:
    from coordinator.gather import Gathered, Member
    from fedlora.aggregate import single_units

    coordinator = Coordinator(load_config(None, [*SMALL, "federation.participants=3", "lora.mode=frozen-a"]), tmp_path)
    members = [Member(i, f"participant-{i}", 10, {"train_loss": 1.0, "local_epsilon": 0.5 + i}) for i in range(3)]
    units = single_units([m.name for m in members], [np.zeros(coordinator.server_length)] * 3, [10] * 3)
    row = coordinator.apply(1, 3, Gathered(units, members, []))
    assert row["local_epsilon"] == {"participant-0": 0.5, "participant-1": 1.5, "participant-2": 2.5}


def test_central_dp_adds_noise_of_std_z_c_to_the_sum_and_divides_by_the_expected_count() -> None:
    cfg = load_config(None, [*SMALL, *DP, "privacy.noise_multiplier=1.7", "robust.clip_norm=0.3"])
    noisy = UserLevelDP(cfg).noisy
    assert noisy.noise_std == pytest.approx(1.7 * 0.3) and noisy.expected_count == pytest.approx(0.5 * 4)
