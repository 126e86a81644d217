"""A prediction-only distiller's adapter is its own and never leaves: kept like a split adapter's local part
(participant/personal.py), so a deployed node that restarts within a run trains on from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict

from fedlora.adapter import adapter_vector
from fedlora.config import load_config
from participant.personal import keep_own_part, kept_layout, own_part
from participant.runtime import get_runtime, train_round
from tests.test_distillation import DISTIL, nodes


def test_a_restarted_distiller_trains_on_from_the_adapter_it_kept(tmp_path: Path) -> None:
    cfg = load_config(None, [*DISTIL, "distillation.variant=prediction-only"])
    runtime = dataclasses.replace(get_runtime(cfg, nodes(3)[1], own_rank=True), site=tmp_path)
    start, layout = adapter_vector(runtime.loaded.model)
    assert kept_layout(layout, cfg).size == layout.size  # the whole adapter is the site's own
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert own_part(context, runtime, cfg, 7) is None  # before its first round: the adapter it loaded
    train_round(runtime, cfg, start, 1)
    keep_own_part(context, runtime, cfg, 7, 1)
    trained = own_part(context, runtime, cfg, 7)
    assert not np.allclose(trained, start)
    assert sorted(p.name for p in (tmp_path / "personal" / "7").iterdir()) == ["round-0001"]  # a PEFT adapter the site can serve
    restarted = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})  # context.state lost
    np.testing.assert_allclose(own_part(restarted, runtime, cfg, 7), trained, atol=1e-6)
    still = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-30))  # a round that moves nothing shows its start
    train_round(runtime, still, start, 2, kept=own_part(restarted, runtime, cfg, 7))
    np.testing.assert_allclose(adapter_vector(runtime.loaded.model)[0], trained, atol=1e-6)
