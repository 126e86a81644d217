"""Split adapters (`federation.personalization = 'local-head' | 'local-b'`, fedlora/aggregate/split.py):
the shared part is aggregated, the site's own part never leaves it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.adapter import load_peft_dir
from fedlora.aggregate import Contribution, aggregate_round, aggregator_for, make_aggregator, make_server_optimizer
from fedlora.aggregate.split import SplitAggregator, local_layout
from fedlora.config import ConfigError, load_config
from fedlora.lora_names import is_lora_a, is_lora_b
from participant.app import app
from tests.conftest import SMALL
from tests.test_lora_aggregation import layout_at

HEAD_RUN = [*SMALL, "model.task=classification", "model.quantization=none", "federation.personalization=local-head", "data.partition=dirichlet:0.3"]


def nodes(participants: int) -> dict[int, dict]:
    return {p + 1: {"partition-id": p, "num-partitions": participants} for p in range(participants)}


@pytest.mark.parametrize(("split", "mode"), [("local-head", "fedavg"), ("local-head", "frozen-a"), ("local-b", "fedavg")])
def test_the_server_moves_only_the_shared_tensors_by_the_mean_of_their_updates(split: str, mode: str) -> None:
    layout = layout_at(4)
    aggregator = SplitAggregator(make_aggregator(mode), split)
    rng = np.random.default_rng(1)
    start = rng.normal(size=layout.size).astype(np.float32)
    shared = aggregator.upload_layout(layout, 4)
    local = local_layout(layout, split)
    assert not set(shared.names) & set(local.names) and local.size > 0
    deltas = [rng.normal(size=layout.size).astype(np.float32) for _ in range(3)]
    uploads = [aggregator.encode_upload(d, layout, layout, 4) for d in deltas]
    assert all(u.size == shared.size for u in uploads)
    server = make_server_optimizer("fedavg", 1.0)
    result = aggregate_round(aggregator, server, start, layout, [Contribution(f"p{i}", u, 1.0, 4) for i, u in enumerate(uploads)])
    new = result.vector
    np.testing.assert_array_equal(layout.take(new, local), layout.take(start, local))  # never moved by the server
    expected = layout.take(start, shared) + np.mean([layout.take(d, shared) for d in deltas], axis=0)
    np.testing.assert_allclose(layout.take(new, shared), expected, rtol=1e-5, atol=1e-6)


def test_splits_that_cannot_work_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="local-b.*lora.mode='fedavg'"):
        load_config(None, ["federation.personalization=local-b", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="federation.personalization"):
        load_config(None, ["federation.personalization=local-b", "lora.mode=frozen-a"])
    with pytest.raises(ConfigError, match="model.task='generation' trains no head"):
        load_config(None, ["federation.personalization=local-head", "model.task=generation"])
    with pytest.raises(ValueError, match="no fully trained head"):  # a model of its own without one
        aggregator_for(load_config(None, ["federation.personalization=local-head", "model.task=classification"])).upload_layout(
            layout_at(4).select(lambda name: is_lora_a(name) or is_lora_b(name)), 4
        )
    # a split adds no training steps, so sample-level DP (which refuses finetune:<steps>) accounts it as it is
    assert load_config(None, ["federation.personalization=local-head", "privacy.local_noise_multiplier=1.0"]).federation.personalization == "local-head"


@pytest.mark.slow  # a whole federation
def test_each_site_keeps_its_own_head_and_only_the_shared_part_travels(tmp_path: Path) -> None:
    cfg = load_config(None, [*HEAD_RUN, "federation.rounds=2"])
    sent: list[int] = []
    grid = LocalGrid(app, nodes(cfg.federation.participants))
    original = grid.send_and_receive

    def spy(messages, *args, **kwargs):
        replies = list(original(messages, *args, **kwargs))
        for reply in replies:
            if reply.has_content() and "update" in reply.content:
                sent.append(reply.content["update"]["delta"].numpy().size)
        return replies

    grid.send_and_receive = spy
    rows = Coordinator(cfg, tmp_path).run(grid)
    adapter_layout = Coordinator(cfg, tmp_path / "again").adapter.layout
    shared, local = aggregator_for(cfg).upload_layout(adapter_layout, cfg.lora.r), local_layout(adapter_layout, "local-head")
    assert sent and set(sent) == {shared.size}  # the head never left a site
    final = load_peft_dir(tmp_path / "adapters" / "final", adapter_layout)
    first = load_peft_dir(tmp_path / "adapters" / "round-0000", adapter_layout)
    np.testing.assert_array_equal(adapter_layout.take(final, local), adapter_layout.take(first, local))
    assert not np.array_equal(adapter_layout.take(final, shared), adapter_layout.take(first, shared))
    last = rows[-1]
    assert 0.0 <= last["eval_personal_accuracy"] <= 1.0 and last["eval_personal_loss"] != last["eval_loss"]
    assert rows[0]["eval_personal_loss"] == pytest.approx(rows[0]["eval_loss"])  # before training it is the global adapter
    from fedlora.cli import simulation_summary

    personal = f"personalised {rows[0]['eval_personal_accuracy']:.3f} -> {last['eval_personal_accuracy']:.3f}"
    assert personal in simulation_summary(rows, 2, tmp_path)  # the last line says what the sites would serve
    assert f"{personal} against a linear baseline of 0.900" in simulation_summary(rows, 2, tmp_path, baseline=0.9)


def test_a_restarted_node_takes_its_own_part_back_from_its_kept_adapter(tmp_path: Path) -> None:
    """context.state is lost when a deployed SuperNode restarts; the site's own head is not: it is in the
    personalised adapter the site kept, and a round after the restart trains on from it."""
    import dataclasses

    from flwr.app import Context, RecordDict

    from fedlora.adapter import adapter_vector
    from participant.personal import keep_own_part, own_part
    from participant.runtime import get_runtime, train_round

    cfg = load_config(None, HEAD_RUN)
    runtime = dataclasses.replace(get_runtime(cfg, nodes(3)[1]), site=tmp_path)
    global_vector, layout = adapter_vector(runtime.loaded.model)
    local = local_layout(layout, "local-head")
    context = Context(run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert own_part(context, runtime, cfg, 5) is None  # nothing trained yet: the global head
    train_round(runtime, cfg, global_vector, server_round=1)
    keep_own_part(context, runtime, cfg, 5, 1)
    trained_head = own_part(context, runtime, cfg, 5)
    assert not np.array_equal(trained_head, layout.take(global_vector, local))
    restarted = Context(run_id=5, node_id=1, node_config={}, state=RecordDict(), run_config={})
    np.testing.assert_array_equal(own_part(restarted, runtime, cfg, 5), trained_head)
    assert own_part(restarted, runtime, cfg, 6) is None  # another run starts from the global head
    still = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-30))  # a round that moves nothing shows its start
    train_round(runtime, still, global_vector, server_round=2, own_part=trained_head)
    np.testing.assert_allclose(layout.take(adapter_vector(runtime.loaded.model)[0], local), trained_head, atol=1e-12)
    train_round(runtime, still, global_vector, server_round=2)
    np.testing.assert_allclose(layout.take(adapter_vector(runtime.loaded.model)[0], local), layout.take(global_vector, local), atol=1e-12)


@pytest.mark.slow  # a whole federation
def test_under_secure_aggregation_and_distributed_dp_only_the_shared_part_is_masked_and_noised(tmp_path: Path) -> None:
    """local-head with frozen-a under SecAgg+ and distributed DP: what a site holds for masking is the shared
    part alone (the head is not in it), the server never moves the head, the run is accounted, and every
    evaluation still reports the personalised adapter beside the global one."""
    from participant.secure import UPDATE

    cfg = load_config(None, [*HEAD_RUN, "federation.rounds=2", "secagg.enabled=true", "privacy.noise_multiplier=0.8", "robust.clip_norm=1.0"])
    assert cfg.lora.mode == "frozen-a" and cfg.privacy.noise_multiplier > 0
    grid = LocalGrid(app, nodes(cfg.federation.participants))
    held: list[int] = []
    original = grid.send_and_receive

    def spy(messages, *args, **kwargs):
        replies = list(original(messages, *args, **kwargs))
        held.extend(context.state[UPDATE]["update"].numpy().size for context in grid.contexts.values() if UPDATE in context.state)
        return replies

    grid.send_and_receive = spy
    rows = Coordinator(cfg, tmp_path).run(grid)
    adapter_layout = Coordinator(cfg, tmp_path / "again").adapter.layout
    shared, local = aggregator_for(cfg).upload_layout(adapter_layout, cfg.lora.r), local_layout(adapter_layout, "local-head")
    assert held and set(held) == {shared.size}  # the head was never masked, so it never left a site
    final = load_peft_dir(tmp_path / "adapters" / "final", adapter_layout)
    first = load_peft_dir(tmp_path / "adapters" / "round-0000", adapter_layout)
    np.testing.assert_array_equal(adapter_layout.take(final, local), adapter_layout.take(first, local))
    assert not np.array_equal(adapter_layout.take(final, shared), adapter_layout.take(first, shared))
    trained = [row for row in rows[1:] if row.get("applied", True)]
    assert len(trained) == 2 and all(row["secagg"] and 0 < row["epsilon"] < float("inf") for row in trained)
    assert all(0.0 <= row["eval_personal_accuracy"] <= 1.0 for row in rows)
    assert rows[-1]["eval_personal_loss"] != rows[-1]["eval_loss"]  # the site's own head, not the global one
