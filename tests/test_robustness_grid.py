"""The robustness benchmark's grid summary (benchmarks/robustness.py --examples-grid): seeds to
mean and spread, drops against the same seed's clean run, refused attacks, and the verdicts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import robustness  # noqa: E402

TASK, SPLIT = "stress (3 classes)", "iid"
SHAS = {"fedavg": "", "robust": "aaa", "robust-secure": "bbb"}


def cell(config: str, seed: int, accuracy: float | None, attack: str | None = None, fraction: float = 0.0, sha: str | None = None) -> dict[str, Any]:
    out = {"task": TASK, "split": SPLIT, "seed": seed, "config": config, "sha": SHAS[config] if sha is None else sha, "attack": attack,
           "fraction": fraction, "majority_accuracy": 0.36}
    return out | ({"refused": "needs the honest updates"} if accuracy is None else {"final_accuracy": accuracy})


CELLS = [
    cell("fedavg", 0, 0.90), cell("fedavg", 1, 0.92),
    cell("robust", 0, 0.89), cell("robust", 1, 0.90),
    cell("robust", 0, 0.88, "ipm:5", 0.2), cell("robust", 1, 0.86, "ipm:5", 0.2),
    cell("robust", 0, 0.89, "alie", 0.2), cell("robust", 1, 0.90, "alie", 0.2),
    cell("robust", 0, 0.50, "ipm:5", 0.2, sha="old"),  # an older example file: left out
    cell("robust-secure", 0, 0.90), cell("robust-secure", 0, 0.80, "ipm:5", 0.2), cell("robust-secure", 0, None, "alie", 0.2),
]


def test_mean_and_sample_spread() -> None:
    assert robustness.mean_sd([1.0]) == (1.0, 0.0)
    mean, sd = robustness.mean_sd([1.0, 3.0])
    assert mean == 2.0 and sd == pytest.approx(2**0.5)


def test_drops_are_against_the_same_seeds_clean_run_and_refused_attacks_stay_none() -> None:
    summary = robustness.summarise_grid(CELLS, SHAS)
    robust = summary[(TASK, SPLIT, "robust")]
    assert robust["clean"] == {0: 0.89, 1: 0.90}
    assert robust["gap"] == pytest.approx({0: 1.0, 1: 2.0})
    assert robust["drops"][(0.2, "ipm:5")] == pytest.approx({0: 1.0, 1: 4.0})
    assert robustness.worst_drop(robust, 0.2) == ("ipm:5", pytest.approx(2.5))
    secure = summary[(TASK, SPLIT, "robust-secure")]
    assert secure["drops"][(0.2, "alie")] == {0: None}
    assert robustness.worst_drop(secure, 0.2) == ("ipm:5", pytest.approx(10.0))


def test_verdicts_name_the_miss_and_what_was_not_measured() -> None:
    lines = robustness.grid_verdicts(robustness.summarise_grid(CELLS, SHAS), ["ipm:5", "alie"])
    assert "met in all 2" in lines[0]
    assert "robust.toml` at 20%" in lines[1] and "**missed** (stress (3 classes) / iid: +2.5 (ipm:5))" in lines[1]
    assert "not measured" in lines[2]  # robust at 33%
    assert "robust-secure.toml` at 20%" in lines[3] and "**missed**" in lines[3] and "+10.0 (ipm:5)" in lines[3]
    assert "not measured" in lines[4]  # the DP config


def test_a_config_whose_clean_run_learns_nothing_misses_its_target_whatever_it_drops() -> None:
    """At the majority class there is nothing to lose: a 1-point drop is no evidence of robustness."""
    shas = SHAS | {"dp-robust-secure": "ccc"}
    flat = [{**cell("fedavg", 0, 0.90), "sha": ""},
            {**cell("fedavg", 0, 0.37), "config": "dp-robust-secure", "sha": "ccc"},
            {**cell("fedavg", 0, 0.36, "ipm:5", 0.2), "config": "dp-robust-secure", "sha": "ccc"}]
    lines = robustness.grid_verdicts(robustness.summarise_grid(flat, shas), ["ipm:5"])
    dp = next(line for line in lines if "dp-robust-secure.toml` at 20%" in line)
    assert "**missed**" in dp and "the clean run ends +1.0 points from the majority class" in dp


def test_a_key_added_at_its_neutral_default_keeps_old_cells_current_and_any_other_value_makes_them_stale() -> None:
    from fedlora.config import load_config

    plain = load_config(None, []).to_toml()
    targeted = load_config(None, ["privacy.local_epsilon_target=8"]).to_toml()
    assert "local_epsilon_target = 0.0" in plain and "local_epsilon_target" not in robustness.without_neutral_keys(plain)
    assert robustness.without_neutral_keys(targeted) == targeted  # set: part of what the cells ran
    assert robustness.without_neutral_keys(plain).count("\n") == plain.count("\n") - 1  # nothing else goes
