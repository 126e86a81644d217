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

`--modes` runs the same settings for several LoRA modes (issue 27: `sb` against `frozen-a` and
`fedavg`), each with its own clip norm (`CLIP_NORMS`), and records the bytes every participant
uploads per round.

    python benchmarks/privacy.py            # frozen-a, ~4 min on 2 cores
    python benchmarks/privacy.py --modes frozen-a,sb,fedavg --out benchmarks/results/privacy-sb.json  # ~40 min
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
# robust.clip_norm per lora.mode: about 0.55 times the mode's median honest update norm and below its smallest
# (no-DP runs of this task, rounds 1-8: frozen-a 0.73-1.26, median 0.94; sb 0.27-0.54, median 0.37; fedavg 0.99-2.16,
# median 1.43), so that every update is clipped, the noise is in those units and each mode's step is alike.
CLIP_NORMS = {"frozen-a": 0.5, "sb": 0.2, "fedavg": 0.8}
EPSILONS = [1.0, 3.0, 8.0, math.inf]
SETTLED_ROUNDS = 2
TASK = [
    *STRESS_TASK,
    f"federation.participants={PARTICIPANTS}",
    f"federation.fraction={SAMPLE_RATE}",
    f"federation.rounds={ROUNDS}",
    "federation.min_participants=2",
    f"privacy.delta={DELTA}",
]


def settings(lora_modes: list[str], epsilons: list[float], dp_modes: list[str], repeats: int) -> list[dict[str, Any]]:
    """Every (lora mode, DP mode, epsilon) `repeats` times: DP's noise is drawn afresh in each run."""
    from fedlora.privacy.accountant import noise_for_budget

    dp = []
    for epsilon in epsilons:
        if math.isinf(epsilon):
            dp.append({"mode": "no DP", "target_epsilon": math.inf, "noise_multiplier": 0.0})
        else:
            z = noise_for_budget(SAMPLE_RATE, ROUNDS, DELTA, epsilon)
            dp += [{"mode": mode, "target_epsilon": epsilon, "noise_multiplier": z} for mode in dp_modes]
    return [{"lora_mode": lora_mode, **setting} for lora_mode in lora_modes for setting in dp for _ in range(repeats)]


def run_setting(setting: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from fedlora.config import load_config

    started = time.monotonic()
    overrides = [
        *TASK,
        f"lora.mode={setting['lora_mode']}",
        f"robust.clip_norm={CLIP_NORMS[setting['lora_mode']]}",
        f"privacy.noise_multiplier={setting['noise_multiplier']}",
    ]
    if setting["mode"] == "distributed":
        overrides += ["secagg.enabled=true", "secagg.bucket_size=0"]
    rows, _ = run_federation(load_config(None, overrides))
    trained = [r for r in rows[1:] if "stopped" not in r]
    accuracy = [float(r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    taking_part = max(sum(r.get("participants", 0) for r in trained), 1)
    # The honest, unclipped norms (no DP) that each mode's clip norm is chosen against.
    norms = [u["update_norm"] for r in trained for u in r.get("participant_updates", [])] if setting["mode"] == "no DP" else []
    return setting | {
        "epsilon": trained[-1].get("epsilon", math.inf) if trained else math.inf,
        "epsilon_pld": trained[-1].get("epsilon_pld", math.inf) if trained else math.inf,
        "rounds": len(trained),
        "accuracy": float(np.mean(accuracy[-SETTLED_ROUNDS:])),
        "accuracy_by_round": accuracy,
        "participants_per_round": [r.get("participants", 0) for r in trained],
        "bytes_up_per_participant": sum(r.get("bytes_up", 0) for r in trained) / taking_part,
        "bytes_down_per_participant": sum(r.get("bytes_down", 0) for r in trained) / max(sum(r.get("sampled", 0) for r in trained), 1),
        "participant_update_norms": [float(q) for q in np.quantile(norms, [0, 0.5, 1])] if norms else [],
        "seconds": round(time.monotonic() - started, 1),
    }


def lora_mode(result: dict[str, Any]) -> str:
    return result.get("lora_mode", "frozen-a")  # results written before --modes ran frozen-a only


def grouped(results: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """The runs of each (lora mode, DP mode, target epsilon): several when --repeats drew the noise again."""
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault((lora_mode(r), r["mode"], r["target_epsilon"]), []).append(r)
    return out


def mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per setting (accuracy: the mean over its runs, with their range); bytes up per participant per round,
    and frozen-a's over this mode's at the same DP setting."""
    groups = grouped(results)
    lines = [
        "| lora mode | DP | target epsilon | noise multiplier | epsilon (RDP) | epsilon (PLD) | rounds | accuracy | bytes up / participant / round | frozen-a / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (lora, mode, epsilon), runs in sorted(groups.items(), key=lambda item: (item[0][1] != "no DP", item[0][1], item[0][2], item[0][0])):
        r, frozen = runs[0], groups.get(("frozen-a", mode, epsilon))
        sent = mean(runs, "bytes_up_per_participant") if "bytes_up_per_participant" in r else None
        reference = mean(frozen, "bytes_up_per_participant") if frozen and sent else None
        spread = f" ({min(x['accuracy'] for x in runs):.3f}-{max(x['accuracy'] for x in runs):.3f}, {len(runs)} runs)" if len(runs) > 1 else ""
        lines.append(
            f"| {lora} | {mode} | {epsilon:g} | {r['noise_multiplier']:.3f} | {r['epsilon']:.3f} | "
            f"{r['epsilon_pld']:.3f} | {r['rounds']} | {mean(runs, 'accuracy'):.3f}{spread} | {f'{sent:,.0f}' if sent else '-'} | "
            f"{f'{reference / sent:.1f}x' if reference else '-'} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    groups = grouped(results)
    modes = sorted({lora for lora, _, _ in groups})
    for lora, colour in zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        label = f"{lora}, " if len(modes) > 1 else ""
        for mode, style in (("central", "o-"), ("distributed", "s--")):
            points = sorted((epsilon, mean(runs, "accuracy")) for (l, m, epsilon), runs in groups.items() if (l, m) == (lora, mode))
            if points:
                axis.plot(*zip(*points), style, color=colour, label=f"{label}{mode} DP")
        if (lora, "no DP", math.inf) in groups:
            axis.axhline(mean(groups[lora, "no DP", math.inf], "accuracy"), color=colour, linestyle=":", label=f"{label}no DP")
    axis.set(xscale="log", xlabel=f"user-level epsilon (delta={DELTA:g}, {ROUNDS} rounds, q={SAMPLE_RATE})",
             ylabel="held-out accuracy", title=f"{PARTICIPANTS} participants, stress_level", ylim=(0, 1))
    axis.set_xticks(EPSILONS[:-1], [f"{e:g}" for e in EPSILONS[:-1]], minor=False)
    axis.minorticks_off()
    axis.legend(fontsize="small")
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
    parser.add_argument("--modes", default="frozen-a", help=f"comma-separated lora.mode values, of {', '.join(CLIP_NORMS)}")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="comma-separated target epsilons; inf: no DP")
    parser.add_argument("--dp", default="central,distributed", help="comma-separated DP modes: central, distributed")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting, each with fresh noise")
    args = parser.parse_args()
    lora_modes = args.modes.split(",")
    unknown = set(lora_modes) - set(CLIP_NORMS)
    if unknown:
        parser.error(f"--modes: no clip norm chosen for {', '.join(sorted(unknown))}")
    if args.report:
        report(args.out)
        return
    started, results = time.monotonic(), []
    payload: dict[str, Any] = {
        "task": TASK, "participants": PARTICIPANTS, "sample_rate": SAMPLE_RATE, "rounds": ROUNDS, "delta": DELTA,
        "clip_norms": {mode: CLIP_NORMS[mode] for mode in lora_modes},
    }
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=worker_setup) as pool:
        for result in pool.map(run_setting, settings(lora_modes, [float(e) for e in args.epsilons.split(',')], args.dp.split(','), args.repeats)):
            results.append(result)
            print(f"{result['lora_mode']} {result['mode']} epsilon {result['target_epsilon']:g}: accuracy {result['accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)
            payload |= {"results": results, "seconds": round(time.monotonic() - started, 1)}
            args.out.write_text(json.dumps(payload, indent=2) + "\n")  # after every setting: a crash keeps what finished
    report(args.out)


if __name__ == "__main__":
    main()
