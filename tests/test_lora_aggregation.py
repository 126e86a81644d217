"""LoRA-aware aggregation, rank changes and server optimisers, on synthetic factors."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.adapter import AdapterLayout
from fedlora.aggregate import (
    Contribution,
    aggregate_round,
    apply_mean,
    make_aggregator,
    make_server_optimizer,
    update_diagnostics,
)
from fedlora.aggregate.lora import fit_rank, lora_layers, product_layout, to_products
from fedlora.aggregate.server import FedAdam
from fedlora.config import ConfigError, load_config

ALPHA = 16.0
HEAD = "base_model.model.classifier.weight"


def layout_at(rank: int) -> AdapterLayout:
    """Two adapted layers of different shapes and a fully trained head, in PEFT's naming."""
    return AdapterLayout.from_shapes(
        {
            "base_model.model.layers.0.q_proj.lora_A.weight": (rank, 12),
            "base_model.model.layers.0.q_proj.lora_B.weight": (10, rank),
            "base_model.model.layers.1.v_proj.lora_A.weight": (rank, 9),
            "base_model.model.layers.1.v_proj.lora_B.weight": (6, rank),
            HEAD: (2, 5),
        }
    )


def random_adapter(layout: AdapterLayout, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.normal(size=layout.size)).astype(np.float32)


def products_by_layer(vector: np.ndarray, layout: AdapterLayout) -> dict[str, np.ndarray]:
    """(alpha/r) B A per layer in float64, written out from the factors."""
    tensors = layout.unflatten(vector)
    rank = layout.lora_rank
    out = {}
    for name in tensors:
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            out[module] = (ALPHA / rank) * tensors[f"{module}.lora_B.weight"].astype(np.float64) @ tensors[name].astype(np.float64)
    return out


def fedavg_server():
    return make_server_optimizer("fedavg")


# --- layouts ---------------------------------------------------------------------------


def test_frozen_a_upload_is_b_and_head_only_and_round_trips() -> None:
    layout = layout_at(4)
    sub = layout.uploaded("frozen-a")
    assert all(".lora_A." not in name for name in sub.names) and HEAD in sub.names
    assert sub.size == layout.size - 4 * 12 - 4 * 9
    assert layout.uploaded("fedavg") == layout and layout.uploaded("exact") == layout
    vector = random_adapter(layout, np.random.default_rng(0))
    mask = layout.trainable_mask("frozen-a")
    np.testing.assert_array_equal(layout.take(vector, sub), vector[mask])
    replaced = layout.put(vector, sub, np.zeros(sub.size, np.float32))
    assert np.all(replaced[mask] == 0) and np.array_equal(replaced[~mask], vector[~mask])
    assert layout.with_rank(16).lora_rank == 16 and layout.with_rank(16).with_rank(4) == layout


# --- frozen-a ----------------------------------------------------------------------------


def test_frozen_a_aggregate_is_the_exact_mean_of_the_products() -> None:
    rng = np.random.default_rng(1)
    layout = layout_at(4)
    aggregator = make_aggregator("frozen-a")
    start = random_adapter(layout, rng)  # A from the seed, B (and head) whatever the last round left
    sub = aggregator.upload_layout(layout, 4)
    uploads = [random_adapter(sub, rng, 0.3) for _ in range(3)]
    weights = [5, 20, 75]
    result = aggregate_round(aggregator, fedavg_server(), start, layout, [Contribution(f"p{i}", u, w, 4) for i, (u, w) in enumerate(zip(uploads, weights))])

    trained = [layout.put(start, sub, layout.take(start, sub) + u) for u in uploads]
    expected = {
        module: sum(w * products_by_layer(t, layout)[module] for w, t in zip(weights, trained)) / sum(weights)
        for module in products_by_layer(start, layout)
    }
    got = products_by_layer(result.vector, layout)
    for module, product in expected.items():
        np.testing.assert_allclose(got[module], product, rtol=1e-5, atol=1e-5)
    a_mask = ~layout.trainable_mask("frozen-a")
    assert np.array_equal(result.vector[a_mask], start[a_mask])  # A untouched
    head = layout.unflatten(result.vector)[HEAD]
    np.testing.assert_allclose(head, sum(w * layout.unflatten(t)[HEAD] for w, t in zip(weights, trained)) / 100, rtol=1e-5)


def test_fedavg_is_not_the_mean_of_the_products_when_a_moves() -> None:
    rng = np.random.default_rng(2)
    layout = layout_at(4)
    start = random_adapter(layout, rng)
    uploads = [random_adapter(layout, rng, 0.5) for _ in range(2)]
    result = aggregate_round(make_aggregator("fedavg"), fedavg_server(), start, layout, [Contribution(f"p{i}", u, 1, 4) for i, u in enumerate(uploads)])
    np.testing.assert_allclose(result.vector, start + (uploads[0] + uploads[1]) / 2, rtol=1e-5, atol=1e-6)
    module = next(iter(products_by_layer(start, layout)))
    mean_of_products = sum(products_by_layer(start + u, layout)[module] for u in uploads) / 2
    assert np.abs(products_by_layer(result.vector, layout)[module] - mean_of_products).max() > 1e-2


# --- exact -------------------------------------------------------------------------------


def test_exact_with_identical_participants_returns_their_adapter() -> None:
    rng = np.random.default_rng(3)
    layout = layout_at(4)
    aggregator = make_aggregator("exact", ALPHA, seed=0)
    start = random_adapter(layout, rng)
    upload = random_adapter(layout, rng, 0.2)
    result = aggregate_round(aggregator, fedavg_server(), start, layout, [Contribution(f"p{i}", upload, w, 4) for i, w in enumerate((3, 7, 11))])
    trained = start + upload
    for module, product in products_by_layer(trained, layout).items():
        np.testing.assert_allclose(products_by_layer(result.vector, layout)[module], product, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layout.unflatten(result.vector)[HEAD], layout.unflatten(trained)[HEAD], rtol=1e-6)
    assert result.metrics["svd_truncation_error"] < 1e-5
    assert all(abs(row["cosine_to_aggregate"] - 1) < 1e-6 for row in result.metrics["participant_updates"])


def test_exact_is_the_rank_r_svd_of_the_mean_product_and_reports_what_it_drops() -> None:
    rng = np.random.default_rng(4)
    layout = layout_at(4)
    start = random_adapter(layout, rng)
    uploads = [random_adapter(layout, rng, 0.5) for _ in range(3)]
    weights = [1, 2, 3]
    result = aggregate_round(make_aggregator("exact", ALPHA), fedavg_server(), start, layout, [Contribution(f"p{i}", u, w, 4) for i, (u, w) in enumerate(zip(uploads, weights))])
    dropped, total = 0.0, 0.0
    for module, product in products_by_layer(result.vector, layout).items():
        mean = sum(w * products_by_layer(start + u, layout)[module] for w, u in zip(weights, uploads)) / sum(weights)
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(product, best, rtol=1e-4, atol=1e-4)
        dropped, total = dropped + np.sum(s[4:] ** 2), total + np.sum(s**2)
    assert result.metrics["svd_truncation_error"] == pytest.approx(np.sqrt(dropped / total), rel=1e-4)
    assert result.metrics["svd_truncation_error"] > 0.01  # three rank-4 updates do not fit in rank 4


def test_mixed_ranks_aggregate_to_the_global_rank() -> None:
    rng = np.random.default_rng(5)
    layout = layout_at(8)
    aggregator = make_aggregator("exact", ALPHA, seed=7)
    start = random_adapter(layout, rng)
    ranks = [4, 8, 16]
    uploads = [random_adapter(aggregator.upload_layout(layout, r), rng, 0.1) for r in ranks]
    assert [u.size for u in uploads] == [layout.with_rank(r).size for r in ranks]
    result = aggregate_round(aggregator, fedavg_server(), start, layout, [Contribution(f"p{r}", u, 10, r) for r, u in zip(ranks, uploads)])
    assert result.vector.shape == (layout.size,) and np.all(np.isfinite(result.vector))
    assert layout.lora_rank == 8 and 0 <= result.metrics["svd_truncation_error"] < 1
    # Each participant's update is the change of its own products: zero uploads change nothing.
    zeros = [np.zeros_like(u) for u in uploads]
    unchanged = aggregate_round(aggregator, fedavg_server(), start, layout, [Contribution(f"p{r}", z, 10, r) for r, z in zip(ranks, zeros)])
    for module, product in products_by_layer(start, layout).items():
        np.testing.assert_allclose(products_by_layer(unchanged.vector, layout)[module], product, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        aggregate_round(aggregator, fedavg_server(), start, layout, [Contribution("p", uploads[0], 1, 8)])
    with pytest.raises(ValueError, match="exact"):
        make_aggregator("fedavg").upload_layout(layout, 4)


def test_fit_rank_keeps_the_product_and_seeds_new_directions() -> None:
    rng = np.random.default_rng(6)
    layout = layout_at(4)
    vector = random_adapter(layout, rng)
    up = fit_rank(vector, layout, 8, ALPHA, seed=0)
    for module, product in products_by_layer(vector, layout).items():
        np.testing.assert_allclose(products_by_layer(up, layout.with_rank(8))[module], product, rtol=1e-4, atol=1e-5)
    extra_rows = layout.with_rank(8).unflatten(up)["base_model.model.layers.0.q_proj.lora_A.weight"][4:]
    assert np.all(np.abs(extra_rows).sum(axis=1) > 0)  # fresh A rows: the new directions can learn
    down = fit_rank(vector, layout, 2, ALPHA, seed=0)
    for module, product in products_by_layer(vector, layout).items():
        u, s, vt = np.linalg.svd(product)
        np.testing.assert_allclose(products_by_layer(down, layout.with_rank(2))[module], (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-4, atol=1e-4)
    # Round 0 (B = 0): a fresh adapter at the new rank, the same on every machine.
    fresh = layout.put(vector, layout.select(lambda n: ".lora_B." in n), np.zeros(10 * 4 + 6 * 4, np.float32))
    first, second = fit_rank(fresh, layout, 16, ALPHA, seed=3), fit_rank(fresh, layout, 16, ALPHA, seed=3)
    assert np.array_equal(first, second)
    big = layout.with_rank(16).unflatten(first)
    assert not big["base_model.model.layers.1.v_proj.lora_B.weight"].any()
    assert np.all(np.abs(big["base_model.model.layers.1.v_proj.lora_A.weight"]) <= 1 / np.sqrt(9))
    assert np.array_equal(fit_rank(vector, layout, 4, ALPHA, seed=0), vector)


def test_product_layout_and_products() -> None:
    layout = layout_at(4)
    vector = random_adapter(layout, np.random.default_rng(8))
    space = product_layout(layout)
    assert [spec.shape for spec in space.specs] == [(10, 12), (6, 9), (2, 5)]
    products = space.unflatten(to_products(vector, layout, ALPHA))
    for layer in lora_layers(layout):
        np.testing.assert_allclose(products[f"{layer.module}.delta_weight"], products_by_layer(vector, layout)[layer.module], rtol=1e-5)


# --- server optimisers ---------------------------------------------------------------------


def test_fedadam_and_fedyogi_match_a_hand_computed_step() -> None:
    x = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    d1 = np.array([0.1, -0.3, 0.0], dtype=np.float32)
    d2 = np.array([0.2, 0.1, -0.05], dtype=np.float32)
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    # Reddi et al. 2021, Algorithm 2, written out: m0 = 0, v0 = tau^2.
    m1 = (1 - b1) * d1.astype(np.float64)
    v1_adam = b2 * tau**2 + (1 - b2) * d1.astype(np.float64) ** 2
    x1 = x + lr * m1 / (np.sqrt(v1_adam) + tau)
    m2 = b1 * m1 + (1 - b1) * d2
    v2_adam = b2 * v1_adam + (1 - b2) * d2.astype(np.float64) ** 2
    x2 = x1 + lr * m2 / (np.sqrt(v2_adam) + tau)
    adam = make_server_optimizer("fedadam", lr, b1, b2, tau)
    np.testing.assert_allclose(adam.step(x, d1), x1, rtol=1e-6)
    np.testing.assert_allclose(adam.step(x1.astype(np.float32), d2), x2, rtol=1e-6)

    v1_yogi = tau**2 - (1 - b2) * d1.astype(np.float64) ** 2 * np.sign(tau**2 - d1.astype(np.float64) ** 2)
    v2_yogi = v1_yogi - (1 - b2) * d2.astype(np.float64) ** 2 * np.sign(v1_yogi - d2.astype(np.float64) ** 2)
    y1 = x + lr * m1 / (np.sqrt(v1_yogi) + tau)
    y2 = y1 + lr * m2 / (np.sqrt(v2_yogi) + tau)
    yogi = make_server_optimizer("fedyogi", lr, b1, b2, tau)
    np.testing.assert_allclose(yogi.step(x, d1), y1, rtol=1e-6)
    np.testing.assert_allclose(yogi.step(y1.astype(np.float32), d2), y2, rtol=1e-6)

    plain = make_server_optimizer("fedavg", 0.5)
    np.testing.assert_allclose(plain.step(x, d1), x + 0.5 * d1, rtol=1e-6)
    assert make_server_optimizer("fedavg").lr == 1.0 and make_server_optimizer("fedadam").lr == 0.0  # 0: set by the rule


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_the_adaptive_server_rate_rule_makes_the_first_step_as_long_as_fedavgs(name: str) -> None:
    """Without federation.server_lr the first round's update sets lr: that step moves exactly as far (RMS) as
    FedAvg's, at any scale of update, tau-dominated ones included (a fixed 0.01 is wrong at one scale or another)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=400).astype(np.float32)
    for scale in (1e-4, 1e-2, 1e-1):
        delta = (rng.normal(size=400) * scale).astype(np.float32)
        adaptive = make_server_optimizer(name)
        moved = adaptive.step(x, delta).astype(np.float64) - x
        fedavg_rms = float(np.sqrt(np.mean(delta.astype(np.float64) ** 2)))
        assert float(np.sqrt(np.mean(moved**2))) == pytest.approx(fedavg_rms, rel=1e-3 if scale > 1e-4 else 0.05)  # float32 x
        assert adaptive.state_dict()["lr"] == adaptive.lr  # a resumed run keeps the rate the rule set
    still = make_server_optimizer(name)
    assert np.array_equal(still.step(x, np.zeros_like(x)), x) and still.lr == 0.0  # an empty round sets nothing


def test_server_optimizer_state_is_plain_data_that_resumes_exactly() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=20).astype(np.float32)
    deltas = [rng.normal(size=20).astype(np.float32) for _ in range(3)]
    straight = make_server_optimizer("fedyogi", 0.05)
    y = x
    for d in deltas:
        y = straight.step(y, d)
    first = make_server_optimizer("fedyogi", 0.05)
    z = first.step(first.step(x, deltas[0]), deltas[1])
    state = first.state_dict()
    assert all(isinstance(v, (str, int, float, np.ndarray)) for v in state.values())
    resumed = make_server_optimizer("fedyogi", 0.05)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.step(z, deltas[2]), y)
    with pytest.raises(ValueError, match="fedyogi"):
        FedAdam().load_state_dict(state)


def test_fedadam_in_frozen_a_moves_only_b() -> None:
    rng = np.random.default_rng(10)
    layout = layout_at(4)
    aggregator = make_aggregator("frozen-a")
    start = random_adapter(layout, rng)
    sub = aggregator.upload_layout(layout, 4)
    mean = random_adapter(sub, rng, 0.1)
    result = apply_mean(aggregator, make_server_optimizer("fedadam", 0.01), start, layout, mean)
    moved = result.vector != start
    assert not np.any(moved[~layout.trainable_mask("frozen-a")])
    step = np.abs(result.vector - start)[layout.trainable_mask("frozen-a")]
    assert np.all(step <= 0.01 + 1e-7) and np.median(step) > 0.005  # adaptive: about lr per coordinate


def test_registries_name_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="fedavg, frozen-a, exact"):
        make_aggregator("mean-of-a")
    with pytest.raises(ValueError, match="fedavg, fedadam, fedyogi"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match="tau"):
        make_server_optimizer("fedadam", tau=0)


def test_update_diagnostics() -> None:
    mean = np.array([1.0, 0.0], dtype=np.float32)
    rows = update_diagnostics([np.array([2.0, 0.0]), np.array([0.0, 3.0]), np.array([-1.0, 0.0])], mean)
    assert [r["update_norm"] for r in rows] == [2.0, 3.0, 1.0]
    assert [r["cosine_to_aggregate"] for r in rows] == [1.0, 0.0, -1.0]


# --- configuration ----------------------------------------------------------------------


def test_auto_mode_resolves_and_incompatible_combinations_are_refused() -> None:
    assert load_config(None, []).lora.mode == "fedavg"
    assert load_config(None, ["federation.participants=3", "lora.participant_ranks=4,8,16"]).lora.mode == "exact"
    cfg = load_config(None, ["federation.participants=3", "lora.mode=exact", "lora.participant_ranks=[4, 8, 16]"])
    assert [cfg.lora.rank_for(p) for p in (0, 1, 2, -1)] == [4, 8, 16, 8]
    with pytest.raises(ConfigError, match=r"lora\.mode: 'exact'.*secure aggregation.*frozen-a"):
        load_config(None, ["lora.mode=exact", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match=r"lora\.participant_ranks.*exact"):
        load_config(None, ["lora.mode=frozen-a", "federation.participants=2", "lora.participant_ranks=4,8"])
    with pytest.raises(ConfigError, match=r"lora\.participant_ranks.*one rank per partition"):
        load_config(None, ["lora.mode=exact", "federation.participants=3", "lora.participant_ranks=4,8"])
    with pytest.raises(ConfigError, match=r"lora\.participant_ranks.*>= 1"):
        load_config(None, ["lora.mode=exact", "federation.participants=2", "lora.participant_ranks=0,8"])
    with pytest.raises(ConfigError, match=r"lora\.mode: 'mean' is not one of auto, fedavg, frozen-a, exact"):
        load_config(None, ["lora.mode=mean"])
    with pytest.raises(ConfigError, match=r"federation\.server_optimizer.*fedavg, fedadam, fedyogi"):
        load_config(None, ["federation.server_optimizer=adam"])
    with pytest.raises(ConfigError, match=r"train\.fedprox_mu"):
        load_config(None, ["train.fedprox_mu=-1"])
