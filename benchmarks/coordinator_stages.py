"""Coordinator cost per round by stage, against reading the updates once, and its peak memory.

Each (mode, n, d) runs in its own process: `coordinator.rounds.Coordinator` drives n synthetic
participants over `coordinator.local_grid.LocalGrid` (Flower's serialisation, no network). A
synthetic participant answers a train request at once with a random update of d float32
parameters (clipped), through the same reply or secure-aggregation hand-over as
`participant.app`, so everything the coordinator does is its real code. d is set by the LoRA
rank of the built-in tiny Llama on all linear layers (the coordinator only sees vectors).

Stages come from the coordinator's own `stage_seconds` (metrics row): gather (parse replies,
check, server coordinates, units), secure_sum (the SecAgg+ stages), screen, rule (or noise
under DP), server_step; write (adapter version, manifest, checkpoint) is timed around the
coordinator's calls. Time spent in the participants' ClientApps and in Flower's
(de)serialisation is subtracted (LocalGrid counts it per message type), so the columns are
coordinator work. The bound: reading the round's uploads (n x d x 4 bytes) once at this
process's measured memory bandwidth (numpy sum over 512 MiB, best of 3).

Memory: peak RSS over rounds 1-2 (VmHWM, reset after round 0) above the RSS before round 1,
in units of the round's uploads (n d 4 bytes). The uploads themselves arrive as Flower
messages, so 1.0 is the floor of a plaintext round that holds them; under secure aggregation
the participants' held updates live in this process too (LocalGrid), which adds 1.0.

    python benchmarks/coordinator_stages.py [--n 10,50,100] [--d 4M,16M] [--modes plaintext,robust,secure,dp]   (M = 10^6)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import psutil

from memory import machine, reset_rss_peak, rss_peak
from secagg import parse_size

# This file's name would shadow the `coordinator` package for the imports below.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
RESULTS = Path(__file__).parent / "results"
ALL_LINEAR = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
# mode -> (overrides, aggregation mode)
MODES = {
    "plaintext": ([], "fedavg"),
    "robust": (["robust.rule='trimmed-mean:0.1'"], "fedavg"),
    "dp": (["privacy.noise_multiplier=1.0", "robust.clip_norm=1.0", "privacy.delta=1e-3"], "frozen-a"),
    "secure": (["secagg.enabled=true", "secagg.bucket_size=10", "robust.clip_norm=1.0"], "frozen-a"),
}
COORDINATOR_STAGES = ("gather", "secure_sum", "screen", "rule", "noise", "server_step", "write")


def run_config(mode: str, n: int, rank: int):
    from fedlora.config import load_config

    overrides, aggregation = MODES[mode]
    return load_config(None, [
        "model.name='builtin:tiny-llama'", f"lora.r={rank}", f"lora.target_modules={ALL_LINEAR}", f"lora.mode='{aggregation}'",
        f"federation.participants={n}", f"federation.min_participants={n if mode != 'dp' else 2}", "federation.rounds=2",
        "federation.eval_participants=1", "federation.eval_every=100", *overrides,
    ])


def rank_for(mode: str, n: int, d: int) -> int:
    """The LoRA rank whose upload is closest to d parameters (upload length is linear in the rank)."""
    from coordinator.rounds import initial_adapter
    from fedlora.aggregate import make_aggregator

    cfg = run_config(mode, n, 1)
    adapter = initial_adapter(cfg)
    per_rank = make_aggregator(cfg.lora.mode).upload_layout(adapter.layout, 1).size
    return max(1, round(d / per_rank))


def synthetic_app(upload_length: int):
    """A participant that 'trains' instantly: a random clipped update, handed over as participant.app does."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    from fedlora.privacy.clipping import clip
    from fedlora.wire import reply_content
    from participant import secure
    from participant.app import checked_instruction

    app = ClientApp()
    secure.register(app)

    @app.train()
    def train(msg: Message, context):
        instruction, cfg = checked_instruction(msg, context, "a train request")
        node = int(context.node_config["partition-id"])
        rng = np.random.default_rng([node, instruction.server_round])
        update = clip(rng.standard_normal(upload_length, dtype=np.float32) * 1e-3, 1.0).astype(np.float32)
        metrics = {"num-examples": 50 + node % 50, "train_loss": 1.0, "partition_id": node, "lora_r": cfg.lora.r}
        if cfg.secagg.enabled:
            return secure.hold_update(msg, context, cfg, update, metrics, instruction.server_round)
        return Message(reply_content(metrics, update), reply_to=msg)

    return app


def read_bandwidth() -> float:
    """Bytes per second a numpy sum reads from memory (512 MiB, best of 3)."""
    data = np.ones(2**27, dtype=np.float32)
    best = min(_timed(lambda: data.sum(dtype=np.float64)) for _ in range(3))
    return data.nbytes / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_worker(mode: str, n: int, d: int) -> dict:
    from coordinator.local_grid import LocalGrid
    from coordinator.rounds import Coordinator
    from fedlora.aggregate import make_aggregator

    bandwidth = read_bandwidth()
    rank = rank_for(mode, n, d)
    cfg = run_config(mode, n, rank)
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as run_dir:
        coordinator = Coordinator(cfg, Path(run_dir))
        length = make_aggregator(cfg.lora.mode).upload_layout(coordinator.adapter.layout, rank).size
        grid = LocalGrid(synthetic_app(length), {p + 1: {"partition-id": p, "num-partitions": n} for p in range(n)})
        run_round, save_adapter, checkpoint = coordinator.run_round, coordinator.out.save_adapter, coordinator.checkpoint
        baseline = {}

        def timed_round(server_round: int) -> dict:
            if server_round == 1:
                reset_rss_peak()
                baseline["rss"] = psutil.Process().memory_info().rss
            # .get: a tree from before stage timing (`--before` runs) has neither; memory is still measured.
            outside = dict(getattr(grid, "outside_seconds_by_type", {}))
            row = run_round(server_round)
            spent = {kind: seconds - outside.get(kind, 0.0) for kind, seconds in getattr(grid, "outside_seconds_by_type", {}).items()}
            rounds.append({"round": server_round, "stage_seconds": dict(row.get("stage_seconds", {})), "outside_seconds": spent,
                           "seconds": row["seconds"], "participants": row["participants"]})
            return row

        def timed_write(fn):
            def wrapped(server_round, *args, **kwargs):
                started = time.perf_counter()
                result = fn(server_round, *args, **kwargs)
                if rounds and rounds[-1]["round"] == server_round:
                    stages = rounds[-1]["stage_seconds"]
                    stages["write"] = stages.get("write", 0.0) + time.perf_counter() - started
                return result
            return wrapped

        coordinator.run_round = timed_round
        coordinator.out.save_adapter = timed_write(save_adapter)
        coordinator.checkpoint = timed_write(checkpoint)
        coordinator.run(grid)
    peak = rss_peak()
    upload_bytes = n * length * 4
    return {
        "mode": mode, "n": n, "d": length, "lora_r": rank, "read_bandwidth_bytes_per_s": bandwidth,
        "upload_bytes": upload_bytes, "read_once_s": upload_bytes / bandwidth, "rounds": rounds,
        "rss_before_round_1_bytes": baseline["rss"], "peak_rss_bytes": peak,
        "peak_above_baseline_in_uploads": (peak - baseline["rss"]) / upload_bytes,
    }


def coordinator_stages(run: dict) -> dict[str, float]:
    """Median over the timed rounds of each stage's coordinator-only seconds."""
    per_round = []
    for r in run["rounds"]:
        stages = dict(r["stage_seconds"])
        if "secure_sum" in stages:  # minus the participants' stage work and the messages' (de)serialisation
            stages["secure_sum"] -= sum(s for kind, s in r["outside_seconds"].items() if kind not in ("train", "evaluate"))
        per_round.append(stages)
    return {stage: statistics.median(s.get(stage, 0.0) for s in per_round) for stage in COORDINATOR_STAGES if any(stage in s for s in per_round)}


def summary_row(run: dict) -> dict:
    stages = coordinator_stages(run)
    total = sum(stages.values())
    return {
        "mode": run["mode"], "n": run["n"], "d": run["d"], "stages_s": stages, "coordinator_s": total,
        "read_once_s": run["read_once_s"], "ratio_to_read_once": total / run["read_once_s"],
        "peak_above_baseline_in_uploads": run["peak_above_baseline_in_uploads"],
        "peak_rss_gib": run["peak_rss_bytes"] / 2**30,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| mode | n | d | " + " | ".join(COORDINATOR_STAGES) + " | coordinator s | read once s | / read once | peak above start (uploads) | peak RSS GiB |",
        "|---|---:|---:|" + "---:|" * (len(COORDINATOR_STAGES) + 5),
    ]
    for r in rows:
        cells = [f"{r['stages_s'][s]:.3f}" if s in r["stages_s"] else "-" for s in COORDINATOR_STAGES]
        lines.append(
            f"| {r['mode']} | {r['n']} | {r['d'] / 1e6:.1f}M | " + " | ".join(cells)
            + f" | {r['coordinator_s']:.2f} | {r['read_once_s']:.3f} | {r['ratio_to_read_once']:.1f}x "
            f"| {r['peak_above_baseline_in_uploads']:.2f} | {r['peak_rss_gib']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for stage in COORDINATOR_STAGES:
        values = np.array([r["stages_s"].get(stage, 0.0) for r in rows])
        ax.bar(range(len(rows)), values, bottom=bottom, label=stage)
        bottom += values
    ax.scatter(range(len(rows)), [r["read_once_s"] for r in rows], color="black", marker="_", s=200, label="read uploads once", zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r['mode']}\nn={r['n']}\n{r['d'] / 1e6:.1f}M" for r in rows], fontsize=7)
    ax.set_ylabel("coordinator seconds per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="10,50,100")
    parser.add_argument("--d", default="4M,16M")
    parser.add_argument("--modes", default="plaintext,robust,dp,secure")
    parser.add_argument("--max-upload-gib", type=float, default=4.0, help="skip (n, d) whose uploads exceed this (machine memory)")
    parser.add_argument("--out", type=Path, default=RESULTS / "coordinator.json")
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, n, d = args.worker
        print(json.dumps(run_worker(mode, int(n), int(d))))
        return
    runs, skipped = [], []
    for d in (parse_size(x) for x in args.d.split(",")):
        for n in (int(x) for x in args.n.split(",")):
            for mode in args.modes.split(","):
                if n * d * 4 > args.max_upload_gib * 2**30:
                    skipped.append({"mode": mode, "n": n, "d": d, "why": f"uploads {n * d * 4 / 2**30:.1f} GiB > --max-upload-gib"})
                    continue
                done = subprocess.run([sys.executable, __file__, "--worker", mode, str(n), str(d)], capture_output=True, text=True)
                if done.returncode != 0:
                    skipped.append({"mode": mode, "n": n, "d": d, "why": done.stderr[-2000:]})
                    print(f"{mode} n={n} d={d}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(markdown([summary_row(runs[-1])]).splitlines()[-1], flush=True)
    rows = [summary_row(run) for run in runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "summary": rows, "runs": runs, "skipped": skipped}, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
