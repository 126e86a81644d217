"""lora.mode='sb' (Fed-SB, fedlora/aggregate/sb.py): fixed A0 and B0, an r x r R per layer trained and averaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapter import AdapterLayout, adapter_vector, is_lora_a, is_lora_b, load_adapter_vector, load_peft_dir, save_peft_dir
from fedlora.aggregate import Contribution, aggregate_round, make_aggregator, make_server_optimizer
from fedlora.aggregate.sb import fixed_b, module_path
from fedlora.config import ConfigError, load_config
from fedlora.model import load_model
from tests.conftest import SMALL
from tests.test_lora_aggregation import ALPHA, HEAD, layout_at, products_by_layer

SEED = 3


def sb_global(layout: AdapterLayout, rng: np.random.Generator) -> np.ndarray:
    """A global adapter on the run's basis: A0, B0 R for a random R, and a random head."""
    aggregator = make_aggregator("sb", ALPHA, SEED)
    zero = np.zeros(layout.size, dtype=np.float32)
    tensors = layout.unflatten(zero)
    from fedlora.aggregate.sb import fixed_a

    for spec in layout.specs:
        if is_lora_a(spec.name):
            tensors[spec.name][...] = fixed_a(module_path(spec.name), spec.shape[0], spec.shape[1], SEED, aggregator.a_gain)
    point = rng.normal(size=aggregator.upload_layout(layout, layout.lora_rank).size).astype(np.float32)
    return aggregator.global_from(point, zero, layout)[0]


def test_the_aggregate_is_exactly_the_weighted_mean_of_the_products() -> None:
    rng = np.random.default_rng(0)
    layout = layout_at(4)
    aggregator = make_aggregator("sb", ALPHA, SEED)
    start = sb_global(layout, rng)
    upload_size = aggregator.upload_layout(layout, 4).size
    assert upload_size == 4 * 4 + 4 * 4 + 2 * 5  # r^2 per layer and the head: not r (in + out)
    uploads, weights = [rng.normal(scale=0.3, size=upload_size).astype(np.float32) for _ in range(3)], [1, 2, 5]
    result = aggregate_round(aggregator, make_server_optimizer("fedavg"), start, layout, [Contribution(f"p{i}", u, w, 4) for i, (u, w) in enumerate(zip(uploads, weights))])
    trained = [aggregator.global_from(aggregator.server_point(start, layout) + u, start, layout)[0] for u in uploads]
    for module, product in products_by_layer(result.vector, layout).items():
        mean = sum(w * products_by_layer(t, layout)[module] for w, t in zip(weights, trained)) / sum(weights)
        np.testing.assert_allclose(product, mean, atol=1e-5)
    heads = [layout.unflatten(t)[HEAD] for t in trained]
    np.testing.assert_allclose(layout.unflatten(result.vector)[HEAD], sum(w * h for w, h in zip(weights, heads)) / sum(weights), atol=1e-6)


def test_a_global_adapter_on_another_basis_is_refused() -> None:
    rng = np.random.default_rng(1)
    layout = layout_at(4)
    aggregator = make_aggregator("sb", ALPHA, SEED)
    honest = sb_global(layout, rng)
    aggregator.start(honest, layout, 4)
    for name, message in ((".lora_B.", "not in the span of this run's fixed B"), (".lora_A.", "not this run's fixed A")):
        other = honest.copy()
        spec = next(s for s in layout.specs if name in s.name)
        other[spec.offset] += 1e-2
        with pytest.raises(ValueError, match=message):
            aggregator.start(other, layout, 4)
    with pytest.raises(ValueError, match="fixed B"):  # another seed: another basis
        make_aggregator("sb", ALPHA, SEED + 1).start(honest, layout, 4)


def test_ranks_cannot_differ_and_sb_refuses_local_dp() -> None:
    with pytest.raises(ValueError, match="global rank 4, got rank 2"):
        make_aggregator("sb", ALPHA, SEED).upload_layout(layout_at(4), 2)
    with pytest.raises(ConfigError, match="lora.participant_ranks"):
        load_config(None, ["lora.mode=sb", "federation.participants=2", "lora.participant_ranks=[4, 8]"])
    with pytest.raises(ConfigError, match="'sb' trains R through a parametrisation"):
        load_config(None, ["lora.mode=sb", "privacy.local_noise_multiplier=1.0"])
    assert load_config(None, ["lora.mode=sb", "secagg.enabled=true"]).lora.mode == "sb"  # linear: fine under masking


def test_a_site_trains_only_r_and_its_adapter_loads_in_stock_peft_with_the_same_outputs(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.model import base_model_dir
    from participant.runtime import get_runtime, train_round

    cfg = load_config(None, [*SMALL, "lora.mode=sb", "model.quantization=none", "train.local_steps=3"])
    runtime = get_runtime(cfg, {"partition-id": 0, "num-partitions": cfg.federation.participants})
    start, layout = adapter_vector(runtime.loaded.model)
    upload, _ = train_round(runtime, cfg, start, server_round=1)
    aggregator = make_aggregator("sb", cfg.lora.alpha, cfg.federation.seed, cfg.lora.frozen_a_gain)
    assert upload.size == aggregator.upload_layout(layout, cfg.lora.r).size < layout.size // 10  # r^2 per layer
    trained, _ = adapter_vector(runtime.loaded.model)
    before, after = layout.unflatten(start), layout.unflatten(trained)
    for name in layout.names:
        if is_lora_a(name):
            assert np.array_equal(before[name], after[name])  # A0 never trains
        elif is_lora_b(name):
            b0 = fixed_b(module_path(name), cfg.lora.r, after[name].shape[0], cfg.federation.seed)
            np.testing.assert_allclose(after[name], b0 @ (b0.T @ after[name]), atol=1e-6)  # B stays B0 R
    assert np.abs(trained - start).max() > 0 and np.isfinite(upload).all()
    assert not any(p.requires_grad for p in runtime.loaded.model.parameters())  # R is gone once training ends

    directory = save_peft_dir(tmp_path / "sb", trained, layout, runtime.loaded.model.peft_config["default"])
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir(cfg.model.name), dtype=torch.float32), str(directory)).eval()
    ours = load_model(cfg.model, cfg.lora, [], cfg.federation.seed)
    load_adapter_vector(ours.model, trained, layout)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        np.testing.assert_allclose(stock(input_ids=ids).logits.numpy(), ours.model(input_ids=ids).logits.numpy(), atol=1e-5)


def test_a_secure_sb_federation_applies_its_rounds_and_publishes_an_adapter_on_its_basis(tmp_path: Path) -> None:
    """The whole round pipeline (LocalGrid, real SecAgg+ stages) carries R's, and the published adapter loads."""
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from participant.app import app

    no_decoding = "evaluation.generate_examples=0"  # decoding answers took half the test's time and is not what it checks
    cfg = load_config(None, [*SMALL, "lora.mode=sb", "secagg.enabled=true", "robust.clip_norm=0.5", no_decoding])
    n = cfg.federation.participants
    rows = Coordinator(cfg, tmp_path).run(LocalGrid(app, {p + 1: {"partition-id": p, "num-partitions": n} for p in range(n)}))
    assert [r.get("applied") for r in rows[1:]] == [True] * cfg.federation.rounds
    _, layout = adapter_vector(load_model(cfg.model, cfg.lora, [], cfg.federation.seed).model)
    published = [load_peft_dir(directory, layout) for directory in sorted((tmp_path / "adapters").glob("round-*"))]
    assert len(published) == cfg.federation.rounds + 1 and np.abs(published[-1] - published[0]).max() > 0
    aggregator = make_aggregator("sb", cfg.lora.alpha, cfg.federation.seed, cfg.lora.frozen_a_gain)
    for vector in published:
        aggregator.check_global(vector, layout)  # A0 as drawn, every B in the span of B0: what a site accepts


def test_the_fixed_basis_is_drawn_once_and_cannot_be_changed_in_place() -> None:
    """B0 is memoised per (seed, layer, shape); a caller writing into it would move every later R."""
    b0 = fixed_b("model.layers.0.self_attn.q_proj", 4, 32, SEED)
    assert fixed_b("model.layers.0.self_attn.q_proj", 4, 32, SEED) is b0
    np.testing.assert_allclose(b0.T @ b0, np.eye(4), atol=1e-5)
    with pytest.raises(ValueError, match="read-only"):
        b0[0, 0] = 1.0
    assert not np.array_equal(fixed_b("model.layers.0.self_attn.q_proj", 4, 32, SEED + 1), b0)
