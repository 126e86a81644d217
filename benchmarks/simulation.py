"""How a simulated federation scales with the number of virtual participants on one machine.

Each configuration runs `fedlora simulate` (Flower's Simulation Engine on Ray, exactly what a
researcher runs) in its own process tree: the built-in tiny Llama on the cardiovascular table
(5500 records, iid), 1 local step, 50 participants
sampled per round (all when fewer), for n = 10, 100 and 1000 virtual participants. Reported:
wall time, seconds per round (from metrics.jsonl), the peak resident memory of the whole process
tree (sampled every 0.5 s with psutil), and, at n = 1000, the same run with evaluation on every
participant every round (`federation.eval_participants=0`, the behaviour before that option),
side by side, as the ratio the evaluation schedule buys.

    python benchmarks/simulation.py [--sizes 10,100,1000] [--rounds 10] [--out benchmarks/results/simulation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
SAMPLED = 50


def overrides(participants: int, rounds: int, eval_participants: int | None) -> list[str]:
    settings = [
        f"federation.participants={participants}",
        f"federation.fraction={min(1.0, SAMPLED / participants)}",
        f"federation.min_participants={min(2, participants)}",
        f"federation.rounds={rounds}",
        "train.local_steps=1",
        "train.batch_size=4",
        "data.dataset=cardiovascular",  # 5500 records: a few per participant even at n = 1000
        "data.partition=iid",
    ]
    return settings + ([f"federation.eval_participants={eval_participants}"] if eval_participants is not None else [])


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_simulation(participants: int, rounds: int, eval_participants: int | None) -> dict:
    """One `fedlora simulate` run; wall time, per-round seconds and peak tree RSS."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "fedlora.cli", "simulate", "--out", out, *overrides(participants, rounds, eval_participants)]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "1"})
        watched, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.5)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise RuntimeError(f"simulate failed for n={participants}: {child.stderr.read()[-2000:]}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "participants": participants,
        "sampled_per_round": min(SAMPLED, participants),
        "rounds": rounds,
        "eval_participants": eval_participants if eval_participants is not None else "default",
        "wall_seconds": round(wall, 1),
        "round_seconds": [row.get("seconds") for row in rows],
        "mean_round_seconds": round(sum(row["seconds"] for row in rows[1:]) / max(1, len(rows) - 1), 2),
        "peak_tree_rss_bytes": peak,
        "final_eval_accuracy": rows[-1].get("eval_accuracy"),
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaled = [r for r in results if r["eval_participants"] == "default"]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    time_axis.plot([r["participants"] for r in scaled], [r["mean_round_seconds"] for r in scaled], marker="o", label="eval on 50 (default)")
    before = [r for r in results if r["eval_participants"] == 0]
    if before:
        time_axis.plot([r["participants"] for r in before], [r["mean_round_seconds"] for r in before], marker="x", linestyle="none", label="eval on all")
    time_axis.set(xscale="log", xlabel="virtual participants", ylabel="seconds per round", title="round time (50 sampled per round)")
    time_axis.legend()
    memory_axis.plot([r["participants"] for r in scaled], [r["peak_tree_rss_bytes"] / 2**30 for r in scaled], marker="o")
    memory_axis.set(xscale="log", xlabel="virtual participants", ylabel="peak RSS of the process tree (GiB)", title="memory", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--before-rounds", type=int, default=2, help="rounds of the eval-on-all run at the largest size")
    parser.add_argument("--out", type=Path, default=RESULTS / "simulation.json")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results = []
    for participants in sizes:
        results.append(run_simulation(participants, args.rounds, None))
        print(json.dumps(results[-1]), flush=True)
    largest = max(sizes)
    results.append(run_simulation(largest, args.before_rounds, 0))
    print(json.dumps(results[-1]), flush=True)
    after = next(r for r in results if r["participants"] == largest and r["eval_participants"] == "default")
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "command": "python benchmarks/simulation.py " + " ".join(sys.argv[1:]),
        "results": results,
        "eval_schedule_ratio": {
            "participants": largest,
            "mean_round_seconds_eval_all": results[-1]["mean_round_seconds"],
            "mean_round_seconds_eval_50": after["mean_round_seconds"],
            "round0_seconds_eval_all": results[-1]["round_seconds"][0],
            "speedup": round(results[-1]["mean_round_seconds"] / after["mean_round_seconds"], 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
