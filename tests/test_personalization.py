"""federation.personalization='finetune:<steps>' (participant/personal.py): each site also scores its own fine-tune."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.adapter import adapter_vector, load_peft_dir
from fedlora.config import ConfigError, load_config
from participant.app import app
from participant.personal import keep_latest, personalise
from participant.runtime import get_runtime
from tests.conftest import SMALL

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
    plain = Coordinator(load_config(None, [*SMALL, "data.partition=dirichlet:0.3"]), tmp_path / "plain").run(LocalGrid(app, nodes(cfg.federation.participants)))
    assert [row["eval_loss"] for row in rows] == pytest.approx([row["eval_loss"] for row in plain])  # the aggregate never sees it
    assert not any("eval_personal_loss" in row for row in plain)


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
def test_a_bad_personalization_or_one_with_sample_level_dp_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="federation.personalization"):
        load_config(None, [f"federation.personalization={spec}"])
    with pytest.raises(ConfigError, match="federation.personalization"):
        load_config(None, ["federation.personalization=finetune:3", "privacy.local_noise_multiplier=1.0"])
