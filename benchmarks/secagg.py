"""Secure aggregation cost: fedlora's SecAgg+ against Flower's own, on the same vectors, in one run.

For each (n participants, d parameters) cell, n random float32 updates with random example
counts are summed three ways over real Flower messages (`coordinator.local_grid.LocalGrid`:
every message and reply goes through Flower's protobuf serialisation, the ClientApps run in
this process one after the other):

- `fedlora`: `coordinator.secure.secure_sum` driving `participant.secure` (one bucket, the
  default degree and threshold), then the mean of the bucket;
- `flower`: Flower 1.41's `SecAggPlusWorkflow` (legacy strategy API, `LegacyContext`) with
  `secaggplus_mod` on a NumPyClient returning the same vectors, `num_shares` = our
  neighbourhood size k+1 and the same threshold. Its output is already the weighted mean,
  so the legacy strategy's second averaging over n identical copies is skipped (a
  pass-through `aggregate_fit`) and not charged to SecAgg+;
- `plaintext` (in the fedlora cell's process, before and after the secure sum, the faster
  counts): each participant sends its float32 update, the coordinator reads them and takes
  `fedlora.aggregate.weighted_mean` -- the aggregation cost secure aggregation is compared with.

Seconds: `client` is the mean over participants of the time spent in their ClientApp across
all stages; `coordinator` is the wall time of the whole secure sum minus all ClientApp time
and minus protobuf (de)serialisation (`transport`, reported separately). Bytes are the
serialised Flower messages, per participant; `up_per_param` divides the upload by d. Flower's
download includes its fit instruction with the global parameters (4 bytes per parameter),
which in fedlora travels in the train message before the secure stages and is not counted.

Mask expansion throughput over 64 MiB of uint32 (16M parameters): fedlora's AES-256-CTR
keystream (`fedlora.secagg.prg`) into its reused 1 MiB scratch buffer (the PRG alone), into a
fresh array (`expand_mask`), and expanded and added in place (`apply_mask`, what the protocol
runs); Flower's `pseudo_rand_gen` (numpy Mersenne Twister from a 32-bit folded seed, int64
masks); and numpy's memory copy of the same buffer. Interleaved, best of 7.

Each cell runs in its own process (clean memory; peak RSS reported). Flower cells with
n*d above `--flower-max-params` are skipped (default 800M: the whole default grid; its
n=50 x d=16M cell alone takes ~5 minutes and 11 GB here), and no cell starts after
`--budget-s` (default 1500 s; a running cell is stopped at the budget and reported skipped).

    python benchmarks/secagg.py [--quick] [--n 5,10,20,50] [--d 1M,4M,16M] [--rounds 1] [--out benchmarks/results/secagg.json]

`--quick` (n=5,10 x d=1M, under a minute) writes benchmarks/results/secagg-quick.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLIP_NORM = 100.0  # above every update's norm here: no clipping, so all three sums agree
MEMCPY_WORDS = 1 << 24  # 64 MiB of uint32


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 1_000, "M": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * factor)


def inputs(n: int, d: int, seed: int) -> tuple[list[int], dict[int, np.ndarray], dict[int, int]]:
    """n distinct updates (shifted copies of one N(0, 0.01^2) vector) and example counts."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(d, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
    nodes = [10_000 + i for i in range(n)]
    updates = {node: np.roll(base, 7919 * i) for i, node in enumerate(nodes)}
    counts = {node: int(rng.integers(20, 1000)) for node in nodes}
    return nodes, updates, counts


def expected_mean(updates: dict[int, np.ndarray], counts: dict[int, int]) -> np.ndarray:
    total = np.zeros(next(iter(updates.values())).size, dtype=np.float64)
    for node, vector in updates.items():
        total += counts[node] * vector.astype(np.float64)
    return total / sum(counts.values())


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _counters(grid: Any) -> dict[str, Any]:
    return {"by_node": dict(grid.client_seconds_by_node), "client": grid.client_seconds, "serde": grid.serde_seconds,
            "up": grid.bytes_up, "down": grid.bytes_down}


def _figures(grid: Any, wall: float, n: int, d: int, error: float, since: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-participant seconds and bytes of what the grid did after the `since` snapshot (`_counters`)."""
    now, before = _counters(grid), since or {"by_node": {}, "client": 0.0, "serde": 0.0, "up": 0, "down": 0}
    per_node = [spent - before["by_node"].get(node, 0.0) for node, spent in now["by_node"].items()]
    client, serde = now["client"] - before["client"], now["serde"] - before["serde"]
    up, down = now["up"] - before["up"], now["down"] - before["down"]
    return {
        "wall_seconds": wall,
        "client_seconds": float(np.mean(per_node)),
        "client_seconds_max": float(np.max(per_node)),
        "coordinator_seconds": wall - client - serde,
        "transport_seconds": serde,
        "bytes_up_per_participant": up / n,
        "bytes_down_per_participant": down / n,
        "up_per_param": up / n / d,
        "max_abs_error": error,
    }


def run_plaintext(n: int, d: int, seed: int) -> dict[str, Any]:
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp

    from coordinator.local_grid import LocalGrid
    from fedlora.aggregate import weighted_mean
    from fedlora.wire import read_reply, reply_content

    nodes, updates, counts = inputs(n, d, seed)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Any) -> Message:
        node = context.node_id
        return Message(reply_content({"num-examples": counts[node]}, updates[node]), reply_to=msg)

    grid = LocalGrid(app, {node: {} for node in nodes})
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1") for node in nodes])
    started = time.perf_counter()
    read = [read_reply(reply.content) for reply in replies]
    mean = weighted_mean([vector for vector, _ in read], [metrics["num-examples"] for _, metrics in read])
    aggregation = time.perf_counter() - started
    error = float(np.max(np.abs(mean - expected_mean(updates, counts))))
    return {
        "aggregation_seconds": aggregation,
        "bytes_up_per_participant": grid.bytes_up / n,
        "up_per_param": grid.bytes_up / n / d,
        "max_abs_error": error,
    }


def run_fedlora(n: int, d: int, seed: int, rounds: int = 1) -> dict[str, Any]:
    """`rounds` secure sums over the same members; figures of the last, and of the first when
    there are several (a participant checks a member's certificate once: docs/decisions.md)."""
    from flwr.clientapp import ClientApp

    from coordinator.local_grid import LocalGrid
    from coordinator.gather import Member
    from coordinator.secure import secure_sum
    from fedlora.aggregate import weighted_mean
    from fedlora.config import PrivacySection, SecaggSection
    from fedlora.secagg.plan import neighbourhood_degree, resolve_threshold
    from participant import secure
    from participant.terms import Terms

    baseline = run_plaintext(n, d, seed)
    nodes, updates, counts = inputs(n, d, seed)
    _, expected_updates, _ = inputs(n, d, seed)
    expected = expected_mean(expected_updates, counts)
    del expected_updates
    app = ClientApp()
    secure.register(app)
    grid = LocalGrid(app, {node: {} for node in nodes})
    sec = SecaggSection(enabled=True)
    terms = Terms.of(sec, PrivacySection(), CLIP_NORM)
    members = [Member(node, f"participant-{i:03d}", counts[node]) for i, node in enumerate(nodes)]
    per_round = []
    for server_round in range(1, rounds + 1):
        for i, node in enumerate(nodes):
            secure.keep_update(grid.contexts[node], updates[node], counts[node], server_round,
                               hashlib.sha256(f"{seed}/{server_round}/{i}".encode()).digest(), terms)
        since = _counters(grid)
        started = time.perf_counter()
        result = secure_sum(grid, members, sec, server_round, d, "bench", CLIP_NORM)
        mean = weighted_mean([b.mean for b in result.buckets], [b.weight for b in result.buckets])
        wall = time.perf_counter() - started
        if result.aborted or len(result.buckets[0].members) != n:
            raise RuntimeError(f"secure sum failed: {result.aborted} {result.skipped}")
        per_round.append(_figures(grid, wall, n, d, float(np.max(np.abs(mean - expected))), since))
    del updates
    error_bound = result.buckets[0].error_bound / result.buckets[0].weight
    k = neighbourhood_degree(n)
    del grid, result
    again = run_plaintext(n, d, seed)  # the baseline twice, around the secure sum: the faster counts
    return {
        **per_round[-1], "rounds": rounds, **({"first_round": per_round[0]} if rounds > 1 else {}),
        "degree": k, "threshold": resolve_threshold(0, k), "error_bound": error_bound,
        "plaintext_aggregation_seconds": min(baseline["aggregation_seconds"], again["aggregation_seconds"]),
        "plaintext_bytes_up_per_participant": baseline["bytes_up_per_participant"],
        "plaintext_up_per_param": baseline["up_per_param"],
    }


def run_flower(n: int, d: int, seed: int) -> dict[str, Any]:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import SecAggPlusWorkflow

    from coordinator.local_grid import LocalGrid
    from fedlora.secagg.plan import neighbourhood_degree, resolve_threshold

    nodes, updates, counts = inputs(n, d, seed)

    class Fixed(NumPyClient):
        def __init__(self, node: int) -> None:
            self.node = node

        def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict]:
            return [updates[self.node]], counts[self.node], {}

    class PassThrough(FedAvg):
        """SecAgg+ already returns the weighted mean: do not average n copies of it again."""

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            return (results[0][1].parameters if results else None), {}

    app = ClientApp(client_fn=lambda context: Fixed(context.node_id).to_client(), mods=[secaggplus_mod])
    grid = LocalGrid(app, {node: {} for node in nodes})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state["config"] = ConfigRecord({"current_round": 1})
    context.state["parameters"] = compat.parameters_to_arrayrecord(ndarrays_to_parameters([np.zeros(d, np.float32)]), keep_input=True)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, grid, 1))
    strategy = PassThrough(fraction_fit=1.0, min_fit_clients=n, min_available_clients=n)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    k = neighbourhood_degree(n)
    workflow = SecAggPlusWorkflow(num_shares=k + 1, reconstruction_threshold=resolve_threshold(0, k))
    started = time.perf_counter()
    workflow(grid, legacy)
    wall = time.perf_counter() - started
    mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(legacy.state["parameters"], keep_input=True))[0]
    error = float(np.max(np.abs(mean - expected_mean(updates, counts))))
    return {**_figures(grid, wall, n, d, error), "num_shares": k + 1, "threshold": resolve_threshold(0, k)}


def run_throughput(repeats: int = 7) -> dict[str, Any]:
    """Best of `repeats` rounds, each timing every candidate once (interleaved: a busy machine
    slows all of them alike, so the ratios hold better than the absolute numbers)."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from fedlora.secagg.prg import CHUNK_BYTES, _keystream_chunks, apply_mask, expand_mask

    words = MEMCPY_WORDS
    source = np.random.default_rng(0).integers(0, 2**32, size=words, dtype=np.uint32)
    target = np.empty_like(source)
    target[:] = 0  # touch the pages once
    seed = os.urandom(32)
    scratch = np.empty(CHUNK_BYTES // 4, dtype=np.uint32)

    def keystream() -> None:  # what apply_mask does per chunk, without the add
        for _ in _keystream_chunks(seed, words, scratch):
            pass

    candidates = {
        "memcpy": lambda: np.copyto(target, source),
        "keystream": keystream,
        "expand": lambda: expand_mask(seed, words),
        "apply": lambda: apply_mask(target, seed, 1),
        "flower": lambda: pseudo_rand_gen(seed, 2**32, [(words,)]),
    }
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            started = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - started)
    nbytes = 4 * words
    return {
        "buffer_bytes": nbytes,
        "memcpy_gb_s": nbytes / best["memcpy"] / 1e9,
        "fedlora_keystream_gb_s": nbytes / best["keystream"] / 1e9,
        "fedlora_expand_gb_s": nbytes / best["expand"] / 1e9,
        "fedlora_expand_and_add_gb_s": nbytes / best["apply"] / 1e9,
        "flower_mt_gb_s": 8 * words / best["flower"] / 1e9,  # int64 masks: 8 bytes per parameter
        "fedlora_params_per_s": words / best["keystream"],
        "flower_mt_params_per_s": words / best["flower"],
        "fedlora_keystream_over_memcpy": best["memcpy"] / best["keystream"],
        "fedlora_expand_over_memcpy": best["memcpy"] / best["expand"],
        "fedlora_expand_and_add_over_memcpy": best["memcpy"] / best["apply"],
        "flower_over_memcpy": (8 * words / best["flower"]) / (nbytes / best["memcpy"]),
    }


def run_cell(impl: str, n: int, d: int, seed: int, rounds: int) -> dict[str, Any]:
    runner = {"fedlora": lambda *a: run_fedlora(*a, rounds), "flower": run_flower, "throughput": lambda *_: run_throughput()}[impl]
    result = runner(n, d, seed)
    result.update({"impl": impl, "n": n, "d": d, "peak_rss_bytes": peak_rss()})
    return result


def spawn(impl: str, n: int, d: int, seed: int, timeout: float, rounds: int = 1) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--cell", impl, str(n), str(d), "--seed", str(seed), "--rounds", str(rounds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "d": d, "skipped": f"over the {timeout:.0f} s left in the budget"}
    if done.returncode != 0:
        return {"impl": impl, "n": n, "d": d, "failed": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (n, d): the three implementations side by side, with the target ratios."""
    by = {(c["impl"], c["n"], c["d"]): c for c in cells}
    rows = []
    for n, d in sorted({(c["n"], c["d"]) for c in cells if c["impl"] != "throughput"}):
        ours, flower = by.get(("fedlora", n, d), {}), by.get(("flower", n, d), {})
        row: dict[str, Any] = {"n": n, "d": d}
        for name, cell in (("fedlora", ours), ("flower", flower)):
            for key in ("client_seconds", "coordinator_seconds", "transport_seconds", "up_per_param", "bytes_up_per_participant", "bytes_down_per_participant"):
                if key in cell:
                    row[f"{name}_{key}"] = cell[key]
            if "skipped" in cell or "failed" in cell:
                row[f"{name}_note"] = cell.get("skipped") or cell.get("failed")
        if "plaintext_aggregation_seconds" in ours:
            plain = ours["plaintext_aggregation_seconds"]
            row["plaintext_aggregation_seconds"] = plain
            row["plaintext_up_per_param"] = ours["plaintext_up_per_param"]
            row["fedlora_coordinator_over_plaintext"] = ours["coordinator_seconds"] / plain
            # "plus network": the plaintext uploads crossing one 1 Gbit/s link into the coordinator.
            network = n * ours["plaintext_bytes_up_per_participant"] / 125e6
            row["fedlora_coordinator_over_plaintext_plus_1gbit"] = ours["coordinator_seconds"] / (plain + network)
        if "up_per_param" in ours and "up_per_param" in flower:
            row["fedlora_over_flower_up_bytes"] = ours["up_per_param"] / flower["up_per_param"]
        for key in ("client_seconds", "coordinator_seconds"):
            if key in ours and key in flower:
                row[f"flower_over_fedlora_{key}"] = flower[key] / ours[key]
        rows.append(row)
    return rows


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    ns = sorted({r["n"] for r in rows})
    figure, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for key, axis, title in (("client_seconds", axes[0], "client s / round"), ("coordinator_seconds", axes[1], "coordinator s / round")):
        for colour, n in zip(colours, ns):
            for impl, style in (("fedlora", "-o"), ("flower", "--s")):
                points = [(r["d"] / 1e6, r[f"{impl}_{key}"]) for r in rows if r["n"] == n and f"{impl}_{key}" in r]
                if points:
                    axis.plot(*zip(*points), style, color=colour, label=f"{impl} n={n}")
            if key == "coordinator_seconds":
                points = [(r["d"] / 1e6, r["plaintext_aggregation_seconds"]) for r in rows if r["n"] == n and "plaintext_aggregation_seconds" in r]
                if points:
                    axis.plot(*zip(*points), ":", color=colour, label=f"plaintext mean n={n}")
        axis.set(xscale="log", yscale="log", xlabel="parameters (M)", ylabel="seconds", title=title)
        axis.legend(fontsize=6, ncol=2)
    ups = [(impl, np.median([r[f"{impl}_up_per_param"] for r in rows if f"{impl}_up_per_param" in r])) for impl in ("plaintext", "fedlora", "flower") if any(f"{impl}_up_per_param" in r for r in rows)]
    axes[2].bar([u[0] for u in ups], [u[1] for u in ups], color=colours[: len(ups)])
    axes[2].set(ylabel="upload bytes per parameter", title="upload per participant / d (median)")
    tp = payload.get("throughput", {})
    if tp:
        labels = ["memcpy", "fedlora\nAES-CTR", "fedlora into\nnew array", "fedlora\nexpand+add", "flower MT\n(int64)"]
        values = [tp["memcpy_gb_s"], tp["fedlora_keystream_gb_s"], tp["fedlora_expand_gb_s"], tp["fedlora_expand_and_add_gb_s"], tp["flower_mt_gb_s"]]
        axes[3].bar(labels, values, color=colours[:5])
        axes[3].tick_params(axis="x", labelsize=7)
        axes[3].set(ylabel="GB/s (one core)", title="mask expansion throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_table(payload: dict[str, Any]) -> None:
    head = f"{'n':>3} {'d':>5} | {'client s':>17} | {'coordinator s':>17} | {'plain':>6} {'ratio':>5} | {'up B/param':>11}"
    print(head)
    print(f"{'':>9} | {'ours':>8} {'flower':>8} | {'ours':>8} {'flower':>8} | {'agg s':>6} {'':>5} | {'ours':>5} {'flwr':>5}")
    for r in payload["rows"]:
        def get(key: str, fmt: str = "8.3f") -> str:
            return format(r[key], fmt) if key in r else f"{'-':>{fmt.split('.')[0]}}"
        print(
            f"{r['n']:>3} {r['d'] / 1e6:>4.0f}M | {get('fedlora_client_seconds')} {get('flower_client_seconds')} | "
            f"{get('fedlora_coordinator_seconds')} {get('flower_coordinator_seconds')} | {get('plaintext_aggregation_seconds', '6.3f')} "
            f"{get('fedlora_coordinator_over_plaintext', '5.2f')} | {get('fedlora_up_per_param', '5.2f')} {get('flower_up_per_param', '5.2f')}"
        )
    tp = payload.get("throughput")
    if tp:
        print(
            f"mask expansion: fedlora {tp['fedlora_keystream_gb_s']:.2f} GB/s ({tp['fedlora_keystream_over_memcpy']:.2f} x memcpy "
            f"{tp['memcpy_gb_s']:.2f} GB/s), into a fresh array {tp['fedlora_expand_gb_s']:.2f}, "
            f"expand+add {tp['fedlora_expand_and_add_gb_s']:.2f} GB/s, "
            f"flower MT {tp['flower_mt_gb_s']:.2f} GB/s of int64 ({tp['flower_mt_params_per_s'] / 1e6:.0f} M params/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n=5,10 and d=1M only (about a minute)")
    parser.add_argument("--n", default="5,10,20,50", help="participants per secure sum, comma-separated")
    parser.add_argument("--d", default="1M,4M,16M", help="parameters per update, comma-separated (K/M suffixes)")
    parser.add_argument("--impls", default="fedlora,flower", help="which implementations to run (fedlora includes the plaintext baseline)")
    parser.add_argument("--flower-max-params", default="800M", help="skip Flower cells with n*d above this")
    parser.add_argument("--budget-s", type=float, default=1500.0, help="stop starting cells after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="fedlora: secure sums per cell over the same members; the last is reported (the first too)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/secagg.json (secagg-quick.json with --quick)")
    parser.add_argument("--cell", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        impl, n, d = args.cell
        print(json.dumps(run_cell(impl, int(n), int(d), args.seed, args.rounds)))
        return
    args.out = args.out or RESULTS / ("secagg-quick.json" if args.quick else "secagg.json")
    ns = [5, 10] if args.quick else [int(x) for x in args.n.split(",")]
    ds = [1_000_000] if args.quick else [parse_size(x) for x in args.d.split(",")]
    impls = args.impls.split(",")
    flower_cap = parse_size(args.flower_max_params)
    started = time.monotonic()
    load_start = list(os.getloadavg())  # other work on the machine slows every figure: see the docs
    cells = [spawn("throughput", 0, 0, args.seed, args.budget_s)]
    for n, d in sorted(((n, d) for n in ns for d in ds), key=lambda nd: nd[0] * nd[1]):
        for impl in impls:
            left = args.budget_s - (time.monotonic() - started)
            if impl == "flower" and n * d > flower_cap:
                cells.append({"impl": impl, "n": n, "d": d, "skipped": f"n*d above --flower-max-params={args.flower_max_params}"})
            elif left < 5:
                cells.append({"impl": impl, "n": n, "d": d, "skipped": "time budget spent"})
            else:
                cells.append(spawn(impl, n, d, args.seed, left, args.rounds))
            print(json.dumps({k: v for k, v in cells[-1].items() if not isinstance(v, float) or k.endswith("seconds")}), flush=True)
    payload = {
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
        },
        "command": "python benchmarks/secagg.py" + (" --quick" if args.quick else f" --n {args.n} --d {args.d}") + (f" --rounds {args.rounds}" if args.rounds > 1 else ""),
        "seconds": time.monotonic() - started,
        "throughput": cells[0],
        "rows": summarise(cells[1:]),
        "cells": cells[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, args.out.with_suffix(".png"))
    print_table(payload)
    print(f"{payload['seconds']:.0f} s; wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
