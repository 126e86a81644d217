"""federation.personalization='finetune:<steps>' (participant/personal.py): each site also scores its own fine-tune."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.adapter import adapter_vector, load_peft_dir
from fedlora.aggregate.weights import score_average
from fedlora.config import ConfigError, load_config
from participant.app import app
from participant.personal import keep_latest, personalise
from fedlora.privacy.local_dp import sample_rate
from participant.runtime import get_runtime, load_local_accountant
from tests.conftest import SMALL, lying_evaluator

FINETUNE = [*SMALL, "federation.personalization=finetune:6", "data.partition=dirichlet:0.3"]


def nodes(participants: int) -> dict[int, dict]:
    return {p + 1: {"partition-id": p, "num-partitions": participants} for p in range(participants)}


@pytest.mark.slow  # two whole federations
def test_every_evaluation_reports_the_personalised_adapter_beside_the_global_one(tmp_path: Path) -> None:
    cfg = load_config(None, FINETUNE)
    rows = Coordinator(cfg, tmp_path).run(LocalGrid(app, nodes(cfg.federation.participants)))
    for row in rows:
        assert 0.0 <= row["eval_personal_accuracy"] <= 1.0 and np.isfinite(row["eval_personal_loss"])
        assert row["eval_personal_loss"] != row["eval_loss"]  # a fine-tune of it, not the global adapter again
        sites = row["participant_evaluations"]  # each site's own claims, beside the averages made from them
        assert [s["participant"] for s in sites] == [f"participant-{p}" for p in range(3)]
        counts = [s["examples"] for s in sites]
        for key in ("eval_accuracy", "eval_personal_accuracy"):
            average, _ = score_average([s[key] for s in sites], counts, cfg.robust.weighting, cfg.robust.weight_cap)
            assert row[key] == pytest.approx(average)
    plain = Coordinator(load_config(None, [*SMALL, "data.partition=dirichlet:0.3"]), tmp_path / "plain").run(LocalGrid(app, nodes(cfg.federation.participants)))
    assert [row["eval_loss"] for row in rows] == pytest.approx([row["eval_loss"] for row in plain])  # the aggregate never sees it
    assert not any("eval_personal_loss" in row for row in plain)


@pytest.mark.slow  # a whole federation
def test_the_fine_tune_works_under_secure_aggregation_and_distributed_dp(tmp_path: Path) -> None:
    """The fine-tune happens after the global adapter arrives, so masking and noise touch only the shared
    update: the run is secure and accounted, and each evaluation still scores both adapters."""
    cfg = load_config(None, [*FINETUNE, "secagg.enabled=true", "privacy.noise_multiplier=0.8", "robust.clip_norm=1.0"])
    rows = Coordinator(cfg, tmp_path).run(LocalGrid(app, nodes(cfg.federation.participants)))
    assert all(row["secagg"] and 0 < row["epsilon"] < float("inf") for row in rows[1:])
    for row in rows:
        assert 0.0 <= row["eval_personal_accuracy"] <= 1.0 and row["eval_personal_loss"] != row["eval_loss"]


def test_the_fine_tune_starts_from_the_global_adapter_and_stays_at_the_site(tmp_path: Path) -> None:
    cfg = load_config(None, FINETUNE)
    runtime = get_runtime(cfg, nodes(3)[1])
    global_vector, layout = adapter_vector(runtime.loaded.model)
    personal, result = personalise(runtime, cfg, global_vector, server_round=1)
    assert np.abs(personal - global_vector).max() > 0 and result.examples == len(runtime.shard.test)
    again, _ = personalise(runtime, cfg, global_vector, server_round=1)
    np.testing.assert_array_equal(personal, again)  # from the global adapter each time, not from the last fine-tune
    keep_latest(tmp_path, 7, 1, personal, runtime)
    latest = keep_latest(tmp_path, 7, 2, personal, runtime)
    assert [p.name for p in (tmp_path / "personal" / "7").iterdir()] == ["round-0002"]
    np.testing.assert_array_equal(load_peft_dir(latest, layout), personal)


@pytest.mark.parametrize("spec", ["finetune", "finetune:0", "adapt:3"])
def test_a_bad_personalization_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="federation.personalization"):
        load_config(None, [f"federation.personalization={spec}"])


def test_under_dp_sgd_the_fine_tune_is_dp_sgd_charged_to_the_site_and_skipped_past_its_budget() -> None:
    """Its scores leave the site, so the fine-tune's steps are private and accounted like a round's: each
    fine-tune steps the site's own accountant (noise from the OS, so two differ), and one that would pass
    privacy.local_epsilon_budget is not run (the personalised adapter is then the global one)."""
    dp = [*FINETUNE, "privacy.local_noise_multiplier=1.0", "federation.seed=9173"]  # a seed of its own: its own accountant
    cfg = load_config(None, dp)
    runtime = get_runtime(cfg, nodes(3)[1])
    global_vector, _ = adapter_vector(runtime.loaded.model)
    personal, _ = personalise(runtime, cfg, global_vector, server_round=1)
    rate = sample_rate(cfg.train.batch_size, len(runtime.shard.train))
    assert load_local_accountant(cfg, runtime).history == [(1.0, rate, 6)]
    again, _ = personalise(runtime, cfg, global_vector, server_round=1)
    assert not np.array_equal(personal, again)  # the same start and seed: only DP-SGD's noise differs
    spent = load_local_accountant(cfg, runtime)
    assert spent.history == [(1.0, rate, 12)]
    tight = load_config(None, [*dp, f"privacy.local_epsilon_budget={spent.get_epsilon(cfg.privacy.local_delta) * 1.01}"])
    assert personalise(runtime, tight, global_vector, server_round=2) is None
    assert load_local_accountant(cfg, runtime).history == [(1.0, rate, 12)]  # nothing spent on a fine-tune not run


def test_a_site_lying_about_its_personal_scores_or_losses_cannot_corrupt_the_averages(tmp_path: Path) -> None:
    """Personal scores and every loss are claims checked like the global accuracy: participant 0 claims a
    personal accuracy of 7, participant 1 a negative personal loss and an infinite global loss. Each lie is
    refused alone and the row averages the honest reports with the weights their counts give them."""
    import math

    from fedlora.aggregate.weights import claimed_average

    lies = {0: {"eval_personal_accuracy": 7.0, "eval_invented": 5.0}, 1: {"eval_personal_loss": -3.0, "eval_loss": math.inf}}
    reported: dict[int, dict] = {}
    lying_app = lying_evaluator(lies, reported)
    cfg = load_config(None, [*FINETUNE, "federation.rounds=1", "train.local_steps=1", "federation.personalization=finetune:2"])
    rows = Coordinator(cfg, tmp_path).run(LocalGrid(lying_app, nodes(cfg.federation.participants)))
    for key in ("eval_personal_accuracy", "eval_personal_loss", "eval_loss"):
        kept = [reported[p] for p in sorted(reported) if key not in lies.get(p, {})]
        honest = claimed_average([m[key] for m in kept], [m["num-examples"] for m in kept], "capped", 2.0)
        assert rows[-1][key] == pytest.approx(honest, rel=1e-9), key
    assert 0.0 <= rows[-1]["eval_personal_accuracy"] <= 1.0 and rows[-1]["eval_personal_loss"] >= 0.0
    shown = {site["participant"]: site for site in rows[-1]["participant_evaluations"]}
    assert shown["participant-0"]["eval_personal_accuracy"] == 7.0  # the lie is shown as its claim...
    assert "eval_invented" not in shown["participant-0"]  # ...but a key no evaluation sends is not kept
