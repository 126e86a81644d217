"""Numbers as words: held-out accuracy with and without `data.numeric_bins`, against a linear baseline.

Two settings per built-in table, each in one process, same seeds:

- centralised: the built-in tiny Llama (NF4 off, class head) trained on one site holding every training
  record, `--steps` steps, bands cut at those records' quantiles; scored on the held-out records;
- federated: `--participants` sites for `--rounds` rounds of `--local-steps` (the real Coordinator over
  LocalGrid, the same apps Flower runs), each site's bands cut at its own training records, iid and
  `dirichlet:0.3`, scored as `fedlora simulate` scores (eval_accuracy).

Beside them, the logistic regression on the pooled raw columns (fedlora/baseline.py) and the majority class.

    python benchmarks/numeric_bands.py                       # 4 tables, bins 0 and 5: ~20 min on 2 cores
    python benchmarks/numeric_bands.py --tables diabetes --no-federated
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from fedlora.baseline import federation_baseline  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.data import answer_choices, banded, load_examples  # noqa: E402
from fedlora.evaluate import evaluate  # noqa: E402
from fedlora.model import load_model  # noqa: E402
from fedlora.partition import split_holdout  # noqa: E402
from fedlora.train import train_local  # noqa: E402

TABLES = ["diabetes", "hypertension", "stress", "glaucoma"]
BASE = ["model.task=classification", "model.quantization=none"]


def centralised(table: str, bins: int, steps: int, seed: int) -> float:
    cfg = load_config(None, [*BASE, f"data.dataset={table}", f"data.numeric_bins={bins}", f"train.local_steps={steps}", f"federation.seed={seed}"])
    examples = load_examples(cfg.data, seed)
    labels = answer_choices(examples)
    shard = split_holdout(examples, cfg.data.test_fraction, seed)
    train, test = banded(shard.train, shard.test, cfg.data)
    loaded = load_model(cfg.model, cfg.lora, labels, seed)
    train_local(loaded.model, loaded.tokenizer, train, cfg.train, cfg.model.task, loaded.label_names, cfg.data.max_length, seed=seed, prompt_format=loaded.prompt_format)
    return evaluate(loaded.model, loaded.tokenizer, test, cfg.model.task, loaded.label_names, cfg.data.max_length, prompt_format=loaded.prompt_format).accuracy


def federated(table: str, bins: int, split: str, args: argparse.Namespace) -> dict[str, float]:
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from participant.app import app

    cfg = load_config(None, [
        *BASE, f"data.dataset={table}", f"data.numeric_bins={bins}", f"data.partition={split}", f"federation.seed={args.seed}",
        f"federation.participants={args.participants}", f"federation.rounds={args.rounds}", f"train.local_steps={args.local_steps}",
    ])
    nodes = {p + 1: {"partition-id": p, "num-partitions": args.participants} for p in range(args.participants)}
    with tempfile.TemporaryDirectory() as out:
        rows = Coordinator(cfg, Path(out)).run(LocalGrid(app, nodes))
    last = [row for row in rows if "eval_accuracy" in row][-2:]  # settled: the mean of the last two evaluations
    return {"accuracy": float(np.mean([row["eval_accuracy"] for row in last])), "majority": float(rows[-1].get("majority_accuracy", float("nan")))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=TABLES)
    parser.add_argument("--bins", nargs="+", type=int, default=[0, 5], help="data.numeric_bins values (default 0 5)")
    parser.add_argument("--steps", type=int, default=300, help="centralised training steps (default 300)")
    parser.add_argument("--participants", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-federated", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "numeric_bands.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for table in args.tables:
        row: dict[str, Any] = {"table": table}
        baseline = federation_baseline(load_config(None, [f"data.dataset={table}", "data.partition=iid", f"federation.seed={args.seed}"]))
        row["linear_baseline"] = baseline.accuracy if baseline else None
        for bins in args.bins:
            row[f"centralised_bins_{bins}"] = centralised(table, bins, args.steps, args.seed)
            if not args.no_federated:
                for split in ("iid", "dirichlet:0.3"):
                    outcome = federated(table, bins, split, args)
                    row[f"federated_{split}_bins_{bins}"] = outcome["accuracy"]
                    row[f"majority_{split}"] = outcome["majority"]
            print(json.dumps(row), flush=True)
        results.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.monotonic() - started), "tables": results}, indent=2) + "\n")
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
