"""Federated distillation against parameter averaging alone, on the participants' own held-out splits.

`examples/distillation.toml`'s federation (the tiny Llama with a class head on `stress`, 4 sites,
`dirichlet:0.3`, secure aggregation, 48 public prompts) run four ways per seed through the real
Coordinator over LocalGrid: parameter averaging alone, averaging with distillation,
prediction-only distillation (each site keeps its adapter; only predictions are summed), and each
site alone (prediction-only with the distillation term weighted 0: the same steps, nothing learnt
from the others); and the last two again with sites 2 and 3 on MiniLM (`simulation.site_models`),
where no parameter could be shared. Each
site scores the adapter it would serve on its own held-out split (`eval_accuracy`, settled: the
mean of the last two evaluations), beside the majority class.

    python benchmarks/distillation.py                    # 3 seeds x 6 methods, ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from fedlora.config import load_config  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "distillation.toml"
TWO_BASES = 'simulation.site_models=["2=builtin:minilm","3=builtin:minilm"]'
METHODS = {
    "averaging alone": ["distillation.public_data="],
    "averaging + distillation": [],
    "prediction-only distillation": ["distillation.variant=prediction-only"],
    # the same path with the distillation term weighted 0: each site trains alone (its predictions are summed, unused)
    "each site alone": ["distillation.variant=prediction-only", "distillation.weight=0"],
    # sites 2 and 3 on MiniLM beside two on the tiny Llama: only predictions can cross between them
    "two bases, prediction-only distillation": ["distillation.variant=prediction-only", TWO_BASES],
    "two bases, each site alone": ["distillation.variant=prediction-only", "distillation.weight=0", TWO_BASES],
}


def run(overrides: list[str], seed: int, rounds: int) -> dict[str, float]:
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from participant.app import app

    cfg = load_config(EXAMPLE, [f"federation.seed={seed}", f"federation.rounds={rounds}", *overrides])
    nodes = {p + 1: {"partition-id": p, "num-partitions": cfg.federation.participants} for p in range(cfg.federation.participants)}
    with tempfile.TemporaryDirectory() as out:
        rows = Coordinator(cfg, Path(out)).run(LocalGrid(app, nodes))
    scored = [row for row in rows if "eval_accuracy" in row]
    return {"accuracy": float(np.mean([row["eval_accuracy"] for row in scored[-2:]])), "majority": float(scored[-1]["majority_accuracy"]),
            "curve": [row["eval_accuracy"] for row in scored]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distillation.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    started, results = time.monotonic(), []
    for seed in args.seeds:
        for method in args.methods:
            overrides = METHODS[method]
            outcome = {"seed": seed, "method": method, **run(overrides, seed, args.rounds)}
            print(json.dumps(outcome), flush=True)
            results.append(outcome)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rounds": args.rounds, "seconds": round(time.monotonic() - started), "runs": results}, indent=2) + "\n")
    for method in args.methods:
        accuracy = [r["accuracy"] for r in results if r["method"] == method]
        print(f"{method}: {np.mean(accuracy):.3f} (sd {np.std(accuracy):.3f}) over seeds {args.seeds}")


if __name__ == "__main__":
    main()
