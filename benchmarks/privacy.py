"""Utility against user-level epsilon: central and distributed DP on a task the model learns.

For each target epsilon in {1, 3, 8} at delta = 1e-5 over the planned rounds, the noise
multiplier is the smallest that fits (`fedlora.privacy.accountant.noise_for_budget`), and a
whole federation of 50 participants runs through the real round pipeline
(`federation.run_federation`): central DP (the coordinator adds N(0, (zC)^2) to the plaintext
sum) and distributed DP (every participant adds its Skellam share before masking, one secure
sum per round). epsilon = inf is the same federation without DP (and without clipping). Each
participant takes part in a round with probability q (Poisson sampling under DP, the fixed
count q N without). The task is `federation.STRESS_TASK`; the reported epsilon is the run's
own (`metrics.jsonl`), accuracy the example-weighted held-out accuracy of all 50 participants,
averaged over the last 2 rounds.

    python benchmarks/privacy.py            # ~15 min on 2 cores
    python benchmarks/privacy.py --report   # table and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from federation import STRESS_TASK, run_federation, worker_setup

RESULTS = Path(__file__).resolve().parent / "results"
PARTICIPANTS = 50
SAMPLE_RATE = 0.5
ROUNDS = 8
DELTA = 1e-5
CLIP_NORM = 0.5  # below the honest update norms (0.7-1.0): every update is clipped, the noise is in those units
EPSILONS = [1.0, 3.0, 8.0, math.inf]
SETTLED_ROUNDS = 2
TASK = [
    *STRESS_TASK,
    f"federation.participants={PARTICIPANTS}",
    f"federation.fraction={SAMPLE_RATE}",
    f"federation.rounds={ROUNDS}",
    "federation.min_participants=2",
    "lora.mode=frozen-a",
    f"robust.clip_norm={CLIP_NORM}",
    f"privacy.delta={DELTA}",
]


def settings() -> list[dict[str, Any]]:
    from fedlora.privacy.accountant import noise_for_budget

    out = [{"mode": "no DP", "target_epsilon": math.inf, "noise_multiplier": 0.0}]
    for epsilon in EPSILONS[:-1]:
        z = noise_for_budget(SAMPLE_RATE, ROUNDS, DELTA, epsilon)
        out += [{"mode": mode, "target_epsilon": epsilon, "noise_multiplier": z} for mode in ("central", "distributed")]
    return out


def run_setting(setting: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from fedlora.config import load_config

    started = time.monotonic()
    overrides = [*TASK, f"privacy.noise_multiplier={setting['noise_multiplier']}"]
    if setting["mode"] == "distributed":
        overrides += ["secagg.enabled=true", "secagg.bucket_size=0"]
    rows, _ = run_federation(load_config(None, overrides))
    trained = [r for r in rows[1:] if "stopped" not in r]
    accuracy = [float(r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    return setting | {
        "epsilon": trained[-1].get("epsilon", math.inf) if trained else math.inf,
        "epsilon_pld": trained[-1].get("epsilon_pld", math.inf) if trained else math.inf,
        "rounds": len(trained),
        "accuracy": float(np.mean(accuracy[-SETTLED_ROUNDS:])),
        "accuracy_by_round": accuracy,
        "participants_per_round": [r.get("participants", 0) for r in trained],
        "seconds": round(time.monotonic() - started, 1),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | target epsilon | noise multiplier | epsilon (RDP) | epsilon (PLD) | rounds | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: (r["mode"] != "no DP", r["mode"], r["target_epsilon"])):
        lines.append(
            f"| {r['mode']} | {r['target_epsilon']:g} | {r['noise_multiplier']:.3f} | {r['epsilon']:.3f} | "
            f"{r['epsilon_pld']:.3f} | {r['rounds']} | {r['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode, marker in (("central", "o"), ("distributed", "s")):
        points = sorted((r["target_epsilon"], r["accuracy"]) for r in results if r["mode"] == mode)
        if points:
            axis.plot(*zip(*points), marker=marker, label=f"{mode} DP")
    for r in results:
        if r["mode"] == "no DP":
            axis.axhline(r["accuracy"], color="black", linestyle="--", label="no DP")
    axis.set(xscale="log", xlabel=f"user-level epsilon (delta={DELTA:g}, {ROUNDS} rounds, q={SAMPLE_RATE})",
             ylabel="held-out accuracy", title=f"{PARTICIPANTS} participants, stress_level", ylim=(0, 1))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(out: Path) -> None:
    payload = json.loads(out.read_text())
    plot(payload["results"], out.with_suffix(".png"))
    print(markdown(payload["results"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="settings run in parallel processes, one torch thread each")
    parser.add_argument("--out", type=Path, default=RESULTS / "privacy.json")
    parser.add_argument("--report", action="store_true", help="table and plot from the JSON only")
    args = parser.parse_args()
    if args.report:
        report(args.out)
        return
    started, results = time.monotonic(), []
    payload: dict[str, Any] = {"task": TASK, "participants": PARTICIPANTS, "sample_rate": SAMPLE_RATE, "rounds": ROUNDS, "delta": DELTA}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=worker_setup) as pool:
        for result in pool.map(run_setting, settings()):
            results.append(result)
            print(f"{result['mode']} epsilon {result['target_epsilon']:g}: accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)
            payload |= {"results": results, "seconds": round(time.monotonic() - started, 1)}
            args.out.write_text(json.dumps(payload, indent=2) + "\n")  # after every setting: a crash keeps what finished
    report(args.out)


if __name__ == "__main__":
    main()
