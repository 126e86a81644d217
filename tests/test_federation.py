"""Whole federations on Flower's Simulation Engine (Ray), with the real NF4 participants."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from peft import PeftModel

from coordinator.outputs import read_metrics
from fedlora.adapter import load_adapter_vector, load_peft_dir
from fedlora.config import Config, load_config
from fedlora.model import load_base_model, load_model
from fedlora.simulation import simulate
from fedlora.wire import read_reply, reply_content
from participant import app as participant_app
from tests.conftest import SMALL

# Ray ships the faulty ClientApp below to its workers by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Config, Path]:
    cfg = load_config(None, SMALL + ["federation.rounds=3", "train.local_steps=8"])
    run_dir = tmp_path_factory.mktemp("run")
    simulate(cfg, run_dir)
    return cfg, run_dir


def test_simulation_writes_the_run_directory_and_learns(default_run) -> None:
    cfg, run_dir = default_run
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        for key in ("participants", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down", "seconds"):
            assert key in row, key
        assert row["participants"] == 3 and row["bytes_up"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert (run_dir / "metrics.png").stat().st_size > 1000
    assert load_config(run_dir / "config.toml") == cfg
    for name in ("round-0000", "round-0003", "final"):
        assert (run_dir / "adapters" / name / "adapter_config.json").is_file()
        assert (run_dir / "adapters" / name / "adapter_model.safetensors").is_file()


def test_final_adapter_loads_in_stock_peft_with_the_same_logits(default_run) -> None:
    cfg, run_dir = default_run
    ours = load_model(cfg.model, cfg.lora, [], cfg.federation.seed)
    from fedlora.adapter import adapter_vector

    _, layout = adapter_vector(ours.model)
    load_adapter_vector(ours.model, load_peft_dir(run_dir / "adapters" / "final", layout), layout)
    stock = PeftModel.from_pretrained(load_base_model(cfg.model), str(run_dir / "adapters" / "final"))
    ids = ours.tokenizer("### Record\nGlucose: 148; Age: 50\n### Question\nDoes the patient have diabetes?\n### Answer\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = ours.model(input_ids=ids).logits, stock(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, load_base_model(cfg.model)(input_ids=ids).logits)  # the adapter does something


@pytest.mark.slow
def test_same_seed_gives_the_same_run(default_run, tmp_path: Path) -> None:
    cfg, run_dir = default_run
    simulate(cfg, tmp_path)
    first, second = read_metrics(run_dir), read_metrics(tmp_path)
    assert [r["eval_loss"] for r in first] == [r["eval_loss"] for r in second]
    final = (run_dir / "adapters" / "final" / "adapter_model.safetensors").read_bytes()
    assert final == (tmp_path / "adapters" / "final" / "adapter_model.safetensors").read_bytes()


# --- a federation with broken participants -------------------------------------------

faulty_app = ClientApp()


@faulty_app.train()
def faulty_train(msg: Message, context: Context) -> Message:
    """Partition 1 crashes, 2 sends NaN, 3 sends a truncated vector; 0 behaves."""
    partition = int(context.node_config["partition-id"])
    if partition == 1:
        raise RuntimeError("disk full on participant 1")
    reply = participant_app.train(msg, context)
    vector, metrics = read_reply(reply.content)
    if partition == 2:
        vector = np.full_like(vector, np.nan)
    if partition == 3:
        vector = vector[:-5]
    return Message(reply_content(metrics, vector), reply_to=msg)


@faulty_app.evaluate()
def faulty_evaluate(msg: Message, context: Context) -> Message:
    return participant_app.evaluate_global(msg, context)


@pytest.mark.slow
def test_broken_participants_are_skipped_with_reasons(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(participant_app, "app", faulty_app)
    cfg = load_config(None, SMALL + ["federation.participants=4", "federation.rounds=1"])
    rows = simulate(cfg, tmp_path)
    row = rows[1]
    assert row["applied"] and row["participants"] == 1
    reasons = {s["participant"]: s["reason"] for s in row["skipped"]}
    assert len(reasons) == 3
    assert any("disk full on participant 1" in r for r in reasons.values())
    assert reasons["participant-2"].endswith("NaN or infinite values") or "NaN" in reasons["participant-2"]
    assert "shape" in reasons["participant-3"]
    assert np.isfinite(row["eval_loss"])


@pytest.mark.slow
def test_round_below_min_participants_leaves_the_adapter_unchanged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(participant_app, "app", faulty_app)
    cfg = load_config(None, SMALL + ["federation.participants=4", "federation.rounds=1", "federation.min_participants=2"])
    with pytest.raises(RuntimeError, match="trained nothing usable: 1/1 rounds run, 0 applied"):
        simulate(cfg, tmp_path)  # a run that applied no round is a failure, not a result
    rows = read_metrics(tmp_path)
    assert rows[1]["applied"] is False and rows[1]["rounds_applied"] == 0
    before = (tmp_path / "adapters" / "round-0000" / "adapter_model.safetensors").read_bytes()
    assert before == (tmp_path / "adapters" / "round-0001" / "adapter_model.safetensors").read_bytes()
    assert not (tmp_path / "adapters" / "final").exists()
    assert json.loads((tmp_path / "adversaries.json").read_text())["partition_ids"] == []
