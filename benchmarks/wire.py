"""Secure aggregation on the 32-bit and the 16-bit wire, side by side: bytes, seconds, accuracy.

For each (n participants, d parameters) cell, one secure sum of the same n updates (with
random example counts) runs twice over real Flower messages (`coordinator.local_grid.LocalGrid`,
as in benchmarks/secagg.py): `secagg.wire_bits = 32` and `= 16` (random rotation, 16-bit
words: `fedlora.secagg.narrow`). Each run is its own process (clean memory, peak RSS).

Updates look like LoRA deltas rather than white noise: a component shared by everyone (the
direction training agrees on) plus each participant's own Gaussian part, both with per-block
(per-layer) scales drawn log-normally, plus a heavy tail (1% of the coordinates, Student-t with
2 degrees of freedom: a third to a half of the energy, single coordinates up to ~20% of it);
norms spread from 0.5 C to 1.5 C, so half are clipped. The reference is the float64 example-weighted mean of the clipped updates; `rel_l2`
is the decoded mean's L2 distance to it over its norm, `rel_l2_bound` the same for the bound
the coordinator reports (sqrt(d) x the per-coordinate bound, over the weight).

Seconds as in benchmarks/secagg.py: `client` is the mean per participant of its ClientApp time
over all stages, `coordinator` the secure sum's wall time minus all ClientApp time and minus
protobuf (de)serialisation. `up_per_param` is the serialised upload per participant over d.

    python benchmarks/wire.py [--n 10,50] [--d 1M,4M] [--out benchmarks/results/secagg-wire.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from secagg import parse_size, peak_rss

ROOT = Path(__file__).resolve().parent.parent
CLIP_NORM = 1.0
BLOCK = 4096  # coordinates per "layer" of the synthetic update


def updates(n: int, d: int, seed: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """n structured, heavy-tailed float32 updates with norms in [0.5 C, 1.5 C] and example counts."""
    rng = np.random.default_rng(seed)
    scales = np.repeat(rng.lognormal(0.0, 1.0, size=-(-d // BLOCK)), BLOCK)[:d].astype(np.float32)
    shared = rng.standard_normal(d, dtype=np.float32) * scales
    shared /= np.linalg.norm(shared)
    nodes = [20_000 + i for i in range(n)]
    out = {}
    for node in nodes:
        own = rng.standard_normal(d, dtype=np.float32) * scales
        tail = rng.choice(d, size=d // 100, replace=False)
        own[tail] += rng.standard_t(2, size=tail.size).astype(np.float32) * scales[tail] * 3
        own /= np.linalg.norm(own)
        vector = own + shared * np.float32(rng.uniform(0.5, 1.5))
        vector *= np.float32(rng.uniform(0.5, 1.5) * CLIP_NORM / np.linalg.norm(vector))
        out[node] = vector
    return out, {node: int(rng.integers(20, 1000)) for node in nodes}


def run_cell(bits: int, n: int, d: int, seed: int) -> dict[str, Any]:
    from flwr.clientapp import ClientApp

    from coordinator.gather import Member
    from coordinator.local_grid import LocalGrid
    from coordinator.secure import secure_sum
    from fedlora.config import PrivacySection, SecaggSection
    from fedlora.secagg import clip
    from participant import secure
    from participant.terms import Terms

    vectors, counts = updates(n, d, seed)
    reference = np.zeros(d)
    for node, vector in vectors.items():
        reference += counts[node] * clip(vector, CLIP_NORM)
    reference /= sum(counts.values())
    app = ClientApp()
    secure.register(app)
    grid = LocalGrid(app, {node: {} for node in vectors})
    sec = SecaggSection(enabled=True, wire_bits=bits)
    terms = Terms.of(sec, PrivacySection(), CLIP_NORM)
    for i, (node, vector) in enumerate(vectors.items()):
        secure.keep_update(grid.contexts[node], vector, counts[node], 1, os.urandom(32), terms)
    del vectors
    members = [Member(node, f"participant-{i:03d}", counts[node]) for i, node in enumerate(counts)]
    started = time.perf_counter()
    result = secure_sum(grid, members, sec, 1, d, "wire", CLIP_NORM)
    wall = time.perf_counter() - started
    if result.aborted or len(result.buckets[0].members) != n:
        raise RuntimeError(f"secure sum failed: {result.aborted} {result.skipped}")
    (unit,) = result.buckets
    per_node = list(grid.client_seconds_by_node.values())
    norm = float(np.linalg.norm(reference))
    return {
        "wire_bits": bits, "n": n, "d": d,
        "up_per_param": grid.bytes_up / n / d,
        "bytes_up_per_participant": grid.bytes_up / n,
        "client_seconds": float(np.mean(per_node)),
        "coordinator_seconds": wall - grid.client_seconds - grid.serde_seconds,
        "transport_seconds": grid.serde_seconds,
        "rel_l2": float(np.linalg.norm(unit.mean - reference)) / norm,
        "rel_l2_bound": float(np.sqrt(d) * unit.error_bound / unit.weight) / norm,
        "max_abs_error": float(np.max(np.abs(unit.mean - reference))),
        "peak_rss_bytes": peak_rss(),
    }


def spawn(bits: int, n: int, d: int, seed: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", str(bits), str(n), str(d), "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"wire_bits": bits, "n": n, "d": d, "failed": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(cells: list[dict[str, Any]]) -> None:
    print(f"{'n':>3} {'d':>4} {'bits':>4} | {'B/param':>7} {'client s':>8} {'coord s':>8} {'rel L2 err':>10} {'(bound)':>9} {'RSS GiB':>7}")
    for c in cells:
        if "failed" in c:
            print(f"{c['n']:>3} {c['d'] / 1e6:>3g}M {c['wire_bits']:>4} | failed: {c['failed']}")
            continue
        print(
            f"{c['n']:>3} {c['d'] / 1e6:>3g}M {c['wire_bits']:>4} | {c['up_per_param']:>7.3f} {c['client_seconds']:>8.3f} "
            f"{c['coordinator_seconds']:>8.3f} {c['rel_l2']:>10.2e} {c['rel_l2_bound']:>9.2e} {c['peak_rss_bytes'] / 2**30:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="10,50", help="participants per secure sum, comma-separated")
    parser.add_argument("--d", default="1M,4M", help="parameters per update, comma-separated (K/M suffixes)")
    parser.add_argument("--wire-bits", default="32,16", help="wires to compare, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "secagg-wire.json")
    parser.add_argument("--cell", nargs=3, type=int, metavar=("BITS", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(*args.cell, args.seed)))
        return
    started = time.monotonic()
    load_start = list(os.getloadavg())
    cells = []
    for n in (int(x) for x in args.n.split(",")):
        for d in (parse_size(x) for x in args.d.split(",")):
            for bits in (int(x) for x in args.wire_bits.split(",")):
                cells.append(spawn(bits, n, d, args.seed))
                print(json.dumps(cells[-1]), flush=True)
    payload = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        },
        "command": f"python benchmarks/wire.py --n {args.n} --d {args.d} --wire-bits {args.wire_bits}",
        "seconds": time.monotonic() - started,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print_table(cells)
    print(f"{payload['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
