"""NF4 and bfloat16 sites in one federation: what holding the base in another format changes.

The task of benchmarks/federation.py (the built-in tiny Llama with a classification head on the
`stress` table, iid), run three ways with the same seed: every site NF4, every site bfloat16
(unquantised; on CPU here, where a GPU site would run it on its GPU) and half of each
(`simulation.site_precision`). Each run goes through the real round pipeline
(`run_federation`: coordinator, ClientApp, Flower serialisation) in its own process, so its peak
resident memory is its own. Reported per run: held-out accuracy and loss per round (each site
evaluates the global adapter on its own split in its own format), seconds and peak RSS.

Two direct measures of the effect, for every partition: the cosine between the round-1 update an
NF4 site and a bf16 site compute from the same adapter and records (what the base's rounding does
to one update), and the base's memory footprint in each format.

    python benchmarks/mixed_precision.py                       # 3 runs x 3 seeds (about 5 min on 2 cores)
    python benchmarks/mixed_precision.py --report              # table and plot from the JSON only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from federation import STRESS_TASK, run_federation, worker_setup

RESULTS = Path(__file__).parent / "results"
PARTICIPANTS = 8
ROUNDS = 10
AGREEMENT = ("nf4", "bf16", "float32")  # formats whose round-1 updates are compared
MIXES = {"nf4": "all NF4", "bf16": "all bf16", "mixed": "half NF4, half bf16"}


def site_formats(mix: str) -> list[str]:
    """Each partition's weight format in one of the `MIXES`."""
    half = PARTICIPANTS // 2
    return {"nf4": ["nf4"] * PARTICIPANTS, "bf16": ["bf16"] * PARTICIPANTS, "mixed": ["nf4"] * half + ["bf16"] * (PARTICIPANTS - half)}[mix]


def overrides(formats: list[str], seed: int) -> list[str]:
    """The run, with every site's format named (`simulation.site_precision`), as a researcher would."""
    precision = "[" + ", ".join(f"'{p}={name}'" for p, name in enumerate(formats)) + "]"
    return [
        *STRESS_TASK,
        f"federation.seed={seed}",
        f"federation.participants={PARTICIPANTS}",
        f"federation.rounds={ROUNDS}",
        "model.device=cpu",
        f"simulation.site_precision={precision}",
    ]


def run_mix(mix: str, seed: int) -> dict[str, Any]:
    """One federation in a fresh process: accuracy and loss per round, seconds, peak RSS."""
    from fedlora.config import load_config

    started = time.monotonic()
    rows, _ = run_federation(load_config(None, overrides(site_formats(mix), seed)))
    return {
        "mix": mix,
        "seed": seed,
        "accuracy_by_round": [float(r["eval_accuracy"]) for r in rows],
        "loss_by_round": [float(r["eval_loss"]) for r in rows],
        "rounds_applied": sum(bool(r.get("applied")) for r in rows[1:]),
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def update_agreement(seed: int) -> dict[str, Any]:
    """Per partition, the cosine between the round-1 updates it computes from the same adapter and
    records in two formats (float32 unquantised as the reference), and the base's footprint in each."""
    import numpy as np

    from coordinator.rounds import initial_adapter
    from fedlora.config import load_config
    from participant.runtime import get_runtime, train_round

    updates, footprint = {}, {}
    for name in AGREEMENT:
        cfg = load_config(None, overrides([name] * PARTICIPANTS, seed))
        start = initial_adapter(cfg).vector
        for p in range(PARTICIPANTS):
            runtime = get_runtime(cfg, {"partition-id": p, "num-partitions": PARTICIPANTS}, own_rank=True)
            updates[name, p] = train_round(runtime, cfg, start, 1)[0]
        footprint[name] = round(runtime.loaded.model.get_memory_footprint() / 2**20, 3)

    def cosines(a: str, b: str) -> list[float]:
        pairs = [(updates[a, p], updates[b, p]) for p in range(PARTICIPANTS)]
        return [round(float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))), 4) for u, v in pairs]

    pairs = {f"{a}~{b}": cosines(a, b) for a, b in (("nf4", "bf16"), ("nf4", "float32"), ("bf16", "float32"))}
    return {"seed": seed, "update_cosine": pairs, "base_footprint_mib": footprint}


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in payload["runs"]:
        colour = {"nf4": "tab:blue", "bf16": "tab:orange", "mixed": "tab:green"}[run["mix"]]
        style = ["-", "--", ":"][run["seed"] % 3]
        label = f"{MIXES[run['mix']]}, seed {run['seed']}"
        axes[0].plot(run["accuracy_by_round"], color=colour, linestyle=style, marker="o", markersize=3, label=label)
        axes[1].plot(run["loss_by_round"], color=colour, linestyle=style, marker="o", markersize=3, label=label)
    axes[0].set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1), title=f"{PARTICIPANTS} sites, stress_level, tiny Llama")
    axes[1].set(xlabel="round", ylabel="held-out loss", title="same seed: only the base's rounding differs")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(payload: dict[str, Any]) -> str:
    lines = ["| sites | seed | accuracy by round | final loss | seconds | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    for r in sorted(payload["runs"], key=lambda r: (r["seed"], list(MIXES).index(r["mix"]))):
        accuracy = " ".join(f"{a:.2f}" for a in r["accuracy_by_round"])
        lines.append(f"| {MIXES[r['mix']]} | {r['seed']} | {accuracy} | {r['loss_by_round'][-1]:.3f} | {r['seconds']:.0f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", "| seed | formats | round-1 update cosine, per site | mean |", "|---|---|---|---|"]
    for a in payload["agreement"]:
        for pair, values in a["update_cosine"].items():
            lines.append(f"| {a['seed']} | {pair} | {' '.join(f'{c:.3f}' for c in values)} | {sum(values) / len(values):.3f} |")
    footprints = {a["seed"]: a["base_footprint_mib"] for a in payload["agreement"]}
    lines.append(f"\nbase footprint in memory (MiB, PEFT model's `get_memory_footprint`): {footprints}")
    return "\n".join(lines)


def report(out: Path) -> None:
    payload = json.loads(out.read_text())
    plot(payload, out.with_suffix(".png"))
    print(markdown(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated federation seeds")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes, one torch thread each")
    parser.add_argument("--out", type=Path, default=RESULTS / "mixed-precision.json")
    parser.add_argument("--report", action="store_true", help="table and plot from the JSON only")
    args = parser.parse_args()
    if not args.report:
        seeds = [int(s) for s in args.seeds.split(",")]
        started = time.monotonic()
        payload: dict[str, Any] = {"task": overrides(site_formats("mixed"), seeds[0]), "participants": PARTICIPANTS, "rounds": ROUNDS, "runs": []}
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=worker_setup, max_tasks_per_child=1) as pool:
            agreement = [pool.submit(update_agreement, seed) for seed in seeds]
            for result in pool.map(run_mix, *zip(*[(mix, seed) for seed in seeds for mix in MIXES])):
                payload["runs"].append(result)
                print(f"{result['mix']} seed {result['seed']}: accuracy {result['accuracy_by_round'][-1]:.3f} ({result['seconds']:.0f} s)", flush=True)
            payload |= {"agreement": [f.result() for f in agreement], "seconds": round(time.monotonic() - started, 1)}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    report(args.out)


if __name__ == "__main__":
    main()
