"""Aggregation modes on the real NF4 model: frozen A, FedProx, and whole simulated federations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from fedlora.adapter import adapter_vector, load_adapter_vector
from fedlora.config import DataSection, LoraSection, ModelSection, TrainSection, load_config
from fedlora.data import load_examples
from fedlora.model import load_model
from fedlora.simulation import simulate
from fedlora.train import train_local
from tests.conftest import SMALL


def lora_tensors(run_dir: Path, name: str, kind: str) -> dict[str, np.ndarray]:
    tensors = load_file(str(run_dir / "adapters" / name / "adapter_model.safetensors"))
    return {key: value for key, value in tensors.items() if f".lora_{kind}." in key}


def test_frozen_a_trains_only_b_and_fedprox_pulls_towards_the_start() -> None:
    loaded = load_model(ModelSection(task="generation", quantization="none"), LoraSection(mode="frozen-a"), [], seed=0)
    model = loaded.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in name for name in trainable)
    examples = load_examples(DataSection(max_examples=32))
    start, layout = adapter_vector(model)
    a_mask = ~layout.trainable_mask("frozen-a")

    distances = {}
    for mu in (0.0, 50.0):
        load_adapter_vector(model, start, layout)
        cfg = TrainSection(local_steps=4, batch_size=4, lr=1e-2, fedprox_mu=mu)
        result = train_local(model, loaded.tokenizer, examples, cfg, "generation", [], 64, seed=0, prompt_format=loaded.prompt_format)
        trained, _ = adapter_vector(model)
        assert np.array_equal(trained[a_mask], start[a_mask])  # A never moves
        assert np.isfinite(result.mean_loss)
        distances[mu] = float(np.linalg.norm(trained - start))
    assert 0 < distances[50.0] < distances[0.0]


def test_frozen_a_rescales_the_seeded_a_to_its_gain_and_other_modes_keep_pefts_init() -> None:
    model_cfg = ModelSection(task="generation", quantization="none")

    def a_factors(lora: LoraSection) -> dict[str, np.ndarray]:
        model = load_model(model_cfg, lora, [], seed=0).model
        return {name: p.detach().numpy().copy() for name, p in model.named_parameters() if ".lora_A." in name}

    peft_init = a_factors(LoraSection(mode="fedavg"))
    assert a_factors(LoraSection(mode="frozen-a", frozen_a_gain=0)).keys() == peft_init.keys()
    assert all(np.array_equal(a, peft_init[n]) for n, a in a_factors(LoraSection(mode="frozen-a", frozen_a_gain=0)).items())
    for name, a in a_factors(LoraSection(mode="frozen-a", frozen_a_gain=2.0)).items():
        rows, columns = a.shape
        assert np.linalg.norm(a) == pytest.approx(2.0 * np.sqrt(columns), rel=1e-5)  # |A x| ~ 2 |x| on average
        factor = np.linalg.norm(a) / np.linalg.norm(peft_init[name])
        assert factor == pytest.approx(np.sqrt(3 * columns / rows) * 2.0, rel=0.2)  # PEFT's gain is sqrt(r / 3 in)
        np.testing.assert_allclose(a, factor * peft_init[name], rtol=1e-5, atol=1e-7)  # the same seeded directions


def test_an_unset_gain_is_smaller_under_user_level_dp_and_a_set_one_always_wins() -> None:
    """Under user-level DP the gain amplifies the noise on B in the model as much as the signal, so
    an unset gain resolves to FROZEN_A_GAIN_UNDER_DP there; config.toml records the resolved value."""
    import tomllib

    from fedlora.config import FROZEN_A_GAIN, FROZEN_A_GAIN_UNDER_DP, build_config

    assert FROZEN_A_GAIN_UNDER_DP < FROZEN_A_GAIN
    assert load_config(None, ["secagg.enabled=true"]).lora.frozen_a_gain == FROZEN_A_GAIN  # masking adds no noise
    private = load_config(None, ["privacy.noise_multiplier=1.0"])
    assert private.lora.mode == "frozen-a" and private.lora.frozen_a_gain == FROZEN_A_GAIN_UNDER_DP
    assert build_config(tomllib.loads(private.to_toml())).to_toml() == private.to_toml()  # what a site rebuilds
    assert load_config(None, ["privacy.noise_multiplier=1.0", "lora.frozen_a_gain=3"]).lora.frozen_a_gain == 3.0
    assert load_config(None, ["privacy.local_noise_multiplier=1.0"]).lora.frozen_a_gain == FROZEN_A_GAIN  # DP-SGD: on gradients


@pytest.fixture(scope="module")
def frozen_a_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    cfg = load_config(None, SMALL + ["lora.mode=frozen-a", "federation.server_optimizer=fedadam"])
    run_dir = tmp_path_factory.mktemp("frozen-a")
    return run_dir, simulate(cfg, run_dir)


@pytest.mark.slow
def test_frozen_a_federation_never_changes_a_and_sends_only_b(frozen_a_run) -> None:
    run_dir, rows = frozen_a_run
    initial_a, final_a = lora_tensors(run_dir, "round-0000", "A"), lora_tensors(run_dir, "final", "A")
    assert initial_a and all(np.array_equal(initial_a[k], final_a[k]) for k in initial_a)
    initial_b, final_b = lora_tensors(run_dir, "round-0000", "B"), lora_tensors(run_dir, "final", "B")
    assert all(not initial_b[k].any() for k in initial_b) and any(final_b[k].any() for k in final_b)
    b_bytes = 4 * sum(v.size for v in initial_b.values())
    for row in rows[1:]:
        assert row["applied"] and row["participants"] == 3 and not row["skipped"]
        assert row["bytes_up"] == 3 * b_bytes  # B only: A never travels
        assert [u["participant"] for u in row["participant_updates"]] == ["participant-0", "participant-1", "participant-2"]
        assert all(u["update_norm"] > 0 and -1 <= u["cosine_to_aggregate"] <= 1 for u in row["participant_updates"])
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])["participant_updates"]
    assert np.isfinite(rows[-1]["eval_loss"])


@pytest.mark.slow
def test_exact_federation_with_mixed_ranks_publishes_the_global_rank(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL + ["lora.mode=exact", "lora.participant_ranks=4,8,16", "lora.r=8", "federation.rounds=2"])
    rows = simulate(cfg, tmp_path)
    for row in rows[1:]:
        assert row["applied"] and row["participants"] == 3 and not row["skipped"], row["skipped"]
        assert 0 <= row["svd_truncation_error"] < 1
        assert len(row["participant_updates"]) == 3
    assert rows[2]["svd_truncation_error"] > 0  # three participants' products do not fit in rank 8
    final_a = lora_tensors(tmp_path, "final", "A")
    assert final_a and all(a.shape[0] == 8 for a in final_a.values())
    assert json.loads((tmp_path / "adapters" / "final" / "adapter_config.json").read_text())["r"] == 8
    assert np.isfinite(rows[-1]["eval_loss"]) and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert torch.isfinite(torch.tensor(rows[-1]["eval_accuracy"]))
