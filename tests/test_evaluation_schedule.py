"""Evaluation must not cost O(all participants) every round: a fixed seeded sample, every k rounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator, evaluation_nodes
from fedlora.config import ConfigError, load_config
from participant.app import app
from tests.conftest import SMALL


def test_all_nodes_are_evaluated_when_the_sample_covers_them() -> None:
    assert evaluation_nodes([5, 3, 9], [], 0, seed=0) == [3, 5, 9]
    assert evaluation_nodes([5, 3, 9], [], 3, seed=0) == [3, 5, 9]


def test_a_sample_is_drawn_by_seed_and_kept_across_rounds() -> None:
    nodes = list(range(100, 200))
    first = evaluation_nodes(nodes, [], 10, seed=1)
    assert len(first) == 10 and set(first) <= set(nodes)
    assert evaluation_nodes(nodes, [], 10, seed=1) == first  # seeded
    assert evaluation_nodes(nodes, [], 10, seed=2) != first
    assert evaluation_nodes(nodes, first, 10, seed=1) == first  # the same participants next round


def test_node_ids_beyond_int64_survive_the_draw() -> None:
    """Flower's node ids are unsigned 64-bit; numpy would turn them into floats and lose digits."""
    nodes = [2**64 - 1 - i for i in range(10)] + [7_896_959_061_412_094_976 + i for i in range(10)]  # both sides of 2**63
    picked = evaluation_nodes(nodes, [], 5, seed=0)
    assert len(picked) == 5 and set(picked) <= set(nodes) and all(type(node) is int for node in picked)


def test_a_departed_node_is_replaced_and_the_rest_stay() -> None:
    nodes = list(range(50))
    first = evaluation_nodes(nodes, [], 5, seed=0)
    gone = first[0]
    second = evaluation_nodes([n for n in nodes if n != gone], first, 5, seed=0)
    assert len(second) == 5 and gone not in second and set(first[1:]) <= set(second)


@pytest.mark.parametrize("key", ["federation.eval_participants=-1", "federation.eval_every=0"])
def test_bad_evaluation_settings_are_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(None, [key])


def test_a_run_evaluates_a_sample_every_k_rounds_and_always_the_last(tmp_path: Path) -> None:
    cfg = load_config(None, [*SMALL, "federation.participants=4", "federation.rounds=3", "federation.eval_participants=2", "federation.eval_every=2", "train.local_steps=1"])
    asked: list[tuple[int, str]] = []

    class CountingGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            asked.extend((m.metadata.dst_node_id, m.metadata.message_type) for m in messages)
            return super().send_and_receive(messages, timeout=timeout)

    coordinator = Coordinator(cfg, tmp_path)
    rows = coordinator.run(CountingGrid(app, {p + 1: {"partition-id": p, "num-partitions": 4} for p in range(4)}))
    assert [("eval_accuracy" in row) for row in rows] == [True, False, True, True]  # rounds 0, 2 and the last
    assert not any("eval_rouge_l" in row for row in rows)  # yes/no answers: accuracy, no generation scores
    evaluated = [node for node, kind in asked if kind == "evaluate"]
    assert len(set(evaluated)) == 2 and len(evaluated) == 2 * 3  # the same two participants, three times
    assert len([node for node, kind in asked if kind == "train"]) == 4 * 3  # training still samples everyone
