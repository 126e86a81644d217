"""Contribution audit (issue 24): does the report find the bad data, in plaintext and under
secure buckets of 2, and at what cost?

The scenario is examples/contributions.toml: the built-in tiny Llama (classification head, NF4)
on the built-in `stress` task, 10 participants (iid), of which partitions 0 and 1 train on
label-flipped records and partition 2 on the diabetes task's records mapped onto the stress
labels (`simulation.bad_data`). Each mode is one federation through the real round pipeline
(`benchmarks/federation.py`: Coordinator over a LocalGrid, real SecAgg+ per bucket) with
`audit.keep_units`, then `coordinator.contributions` values its units on the first 200 records of
the `stress` table with each metric (accuracy, minus the loss), GTG-Shapley with 10 permutations
per plaintext round (buckets of 2 make 5 units a round, valued exactly). Secure buckets are drawn from a
fresh secret every round (docs/decisions.md), so that mode differs from run to run.

    python benchmarks/contributions.py          # ~15 min on 2 shared cores

Writes benchmarks/results/contributions.json: per mode and metric, the participants in rank
order with value, standard error, scores and flags, whether the three bad ones are last and
exactly the flagged ones, the residual std of the members' estimate, the utility evaluations and
seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from federation import run_federation, worker_setup

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "contributions.toml"
BAD = {"participant-0", "participant-1", "participant-2"}
MODES = {"plaintext": ["federation.rounds=4"], "secagg-2": ["secagg.enabled=true", "secagg.bucket_size=2", "federation.rounds=6"]}
METRICS = ("accuracy", "loss")


def audit(run_dir: Path, metric: str) -> dict[str, Any]:
    from coordinator.contributions import value_contributions

    started = time.perf_counter()
    report = value_contributions(run_dir, "stress", max_examples=200, metric=metric, permutations=10)
    people = report["participants"]
    keep = ("participant", "rank", "value", "stderr", "mean_cosine", "anomaly_score", "harm_score", "flagged")
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "evaluations": report["estimator"]["evaluations"],
        "residual_std": report["estimator"]["residual_std"],
        "bad_ranked_last": {p["participant"] for p in people[-3:]} == BAD,
        "flagged_exactly_bad": {p["participant"] for p in people if p["flagged"]} == BAD,
        "flagged": [p["participant"] for p in people if p["flagged"]],
        "participants": [{key: p[key] for key in keep} for p in people],
    }


def main() -> None:
    from fedlora.config import load_config

    worker_setup()
    results: dict[str, Any] = {"scenario": str(EXAMPLE.relative_to(ROOT)), "bad": sorted(BAD), "modes": {}}
    for mode, overrides in MODES.items():
        with tempfile.TemporaryDirectory() as scratch:
            run_dir = Path(scratch)
            started = time.perf_counter()
            rows, _ = run_federation(load_config(EXAMPLE, overrides), keep=run_dir)
            trained = round(time.perf_counter() - started, 1)
            results["modes"][mode] = {
                "overrides": overrides,
                "train_seconds": trained,
                "final_accuracy": rows[-1].get("eval_accuracy"),
                "metrics": {metric: audit(run_dir, metric) for metric in METRICS},
            }
        print(mode, json.dumps({m: {k: v for k, v in r.items() if k != "participants"} for m, r in results["modes"][mode]["metrics"].items()}))
    (RESULTS / "contributions.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
