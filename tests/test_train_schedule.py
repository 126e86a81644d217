"""train.lr_schedule and train.warmup_steps: the rate each round and each local step trains at."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.rounds import initial_adapter
from fedlora.config import ConfigError, TrainSection, load_config
from fedlora.train import round_lr, warmup_factor
from participant.runtime import get_runtime, train_round
from tests.conftest import SMALL


def test_cosine_falls_from_the_rate_to_its_floor_over_the_planned_rounds() -> None:
    train = TrainSection(lr=1e-2, lr_schedule="cosine", lr_floor=0.1)
    rates = [round_lr(train, r, 9) for r in range(1, 10)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-3)
    assert rates[4] == pytest.approx(1e-2 * (0.1 + 0.9 / 2))  # halfway down the half cosine
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert round_lr(train, 12, 9) == pytest.approx(1e-3)  # a round past the plan stays at the floor
    assert round_lr(TrainSection(lr=1e-2), 9, 9) == 1e-2  # constant is the default
    assert round_lr(train, 1, 1) == 1e-2


def test_warmup_rises_linearly_to_the_full_rate() -> None:
    assert [warmup_factor(s, 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def _first_step_norm(*overrides: str, server_round: int = 1) -> float:
    cfg = load_config(None, [*SMALL, "model.task=classification", "train.local_steps=1", "federation.rounds=5", *overrides])
    runtime = get_runtime(cfg, {"partition-id": 0, "num-partitions": cfg.federation.participants})
    upload, _ = train_round(runtime, cfg, initial_adapter(cfg).vector, server_round)  # the same start every time
    return float(np.linalg.norm(upload))


def test_a_round_trains_at_its_scheduled_and_warmed_up_rate() -> None:
    """AdamW's first step moves every trained entry by about the rate, whatever its gradient, so one
    step's length is proportional to the rate that step was taken at."""
    full = _first_step_norm()
    assert _first_step_norm("train.lr_schedule=cosine", "train.lr_floor=0.2", server_round=5) / full == pytest.approx(0.2, rel=0.02)
    assert _first_step_norm("train.lr_schedule=cosine", server_round=1) / full == pytest.approx(1.0, rel=1e-6)
    assert _first_step_norm("train.warmup_steps=3") / full == pytest.approx(0.25, rel=0.02)


@pytest.mark.parametrize(
    ("override", "key"),
    [("train.lr_schedule=linear", "train.lr_schedule"), ("train.lr_floor=1.5", "train.lr_floor"), ("train.warmup_steps=-1", "train.warmup_steps")],
)
def test_a_bad_schedule_setting_is_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
    assert math.isfinite(TrainSection().lr)
