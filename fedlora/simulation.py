"""Run a whole federation on one machine with Flower's Simulation Engine (Ray backend).

The ServerApp and ClientApp are exactly the deployment ones; only the engine differs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedlora.config import Config
from fedlora.logs import quiet_environment, verbose

log = logging.getLogger("fedlora")


def backend_config(cfg: Config) -> dict[str, Any]:
    import torch

    resources: dict[str, float] = {"num_cpus": cfg.simulation.cpus_per_participant, "num_gpus": 0.0}
    if torch.cuda.is_available() and cfg.model.device != "cpu":
        resources["num_gpus"] = 1.0 / min(cfg.federation.participants, 4)
    return {
        "client_resources": resources,
        # Ray workers' own output (library warnings as each loads the model) only with --verbose;
        # a ClientApp's exception still reaches this process's log through Flower.
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "logging_level": "error", "log_to_driver": verbose()},
    }


def simulate(cfg: Config, run_dir: Path) -> list[dict[str, Any]]:
    """Run `cfg` with one virtual SuperNode per participant; returns the per-round metrics."""
    from flwr.simulation import run_simulation

    from coordinator.app import make_server_app
    from coordinator.outcome import read_outcome
    from coordinator.outputs import read_metrics
    from participant.app import app as client_app

    # Ray workers inherit the environment: offline, and as quiet as this process.
    for name, value in {**quiet_environment(), "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(name, value)
    failures: list[BaseException] = []
    log.info("simulating %d participants for %d rounds -> %s", cfg.federation.participants, cfg.federation.rounds, run_dir)
    run_simulation(
        server_app=make_server_app(cfg, run_dir, failures),
        client_app=client_app,
        num_supernodes=cfg.federation.participants,
        backend_config=backend_config(cfg),
    )
    if failures:
        raise RuntimeError(f"the federation failed: {failures[0]}") from failures[0]
    rows = read_metrics(run_dir)
    outcome = read_outcome(rows, cfg.federation.rounds)
    if not outcome.succeeded or not (run_dir / "adapters" / "final").is_dir():
        raise RuntimeError(f"the simulation trained nothing usable: {outcome.summary()}; see the log above and {run_dir / 'metrics.jsonl'}")
    return rows
