"""Before/after table of two sets of `benchmarks/secagg.py` results (same cells, alternated runs).

    python benchmarks/compare_secagg.py --before A.json B.json --after C.json D.json --out benchmarks/results/secagg-issue22.json

Each cell's figure is the median over the runs given; the ratio after/before is what
docs/benchmarks.md reports (the runs were alternated on one machine, so drift hits both sides).
Runs with `--rounds 2` or more report their last round; their first (`first_round`, where a
participant meets its neighbours' cards for the first time) is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIELDS = ("client_seconds", "coordinator_seconds", "bytes_up_per_participant", "bytes_down_per_participant")


def cells(paths: list[str]) -> dict[tuple[int, int], dict[str, float]]:
    """(n, d) -> the median of each field over the runs in `paths` (fedlora cells only)."""
    runs: dict[tuple[int, int], list[dict]] = {}
    for path in paths:
        for cell in json.loads(Path(path).read_text())["cells"]:
            if cell.get("impl") == "fedlora" and "client_seconds" in cell:
                runs.setdefault((cell["n"], cell["d"]), []).append(cell)
    out = {}
    for key, group in runs.items():
        out[key] = {f: statistics.median(c[f] for c in group) for f in FIELDS}
        firsts = [c["first_round"]["client_seconds"] for c in group if "first_round" in c]
        if firsts:
            out[key]["first_round_client_seconds"] = statistics.median(firsts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    before, after = cells(args.before), cells(args.after)
    rows = []
    for key in sorted(before.keys() & after.keys()):
        row = {"n": key[0], "d": key[1], "before": before[key], "after": after[key]}
        row["ratio"] = {f: after[key][f] / before[key][f] for f in FIELDS if before[key][f]}
        rows.append(row)
    Path(args.out).write_text(json.dumps({"before": args.before, "after": args.after, "rows": rows}, indent=2) + "\n")
    print("| n | d | participant s (before -> after) | participant s, first round (before -> after) | coordinator s (before -> after) | upload B/participant | download B/participant |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        b, a, r = row["before"], row["after"], row["ratio"]
        first_before = b.get("first_round_client_seconds", b["client_seconds"])
        first = a.get("first_round_client_seconds", a["client_seconds"])
        print(
            f"| {row['n']} | {row['d'] / 1e6:g}M | {b['client_seconds']:.3f} -> {a['client_seconds']:.3f} ({r['client_seconds']:.2f}x) "
            f"| {first_before:.3f} -> {first:.3f} ({first / first_before:.2f}x) "
            f"| {b['coordinator_seconds']:.3f} -> {a['coordinator_seconds']:.3f} ({r['coordinator_seconds']:.2f}x) "
            f"| +{a['bytes_up_per_participant'] - b['bytes_up_per_participant']:,.0f} ({100 * (r['bytes_up_per_participant'] - 1):+.3f}%) "
            f"| {b['bytes_down_per_participant']:,.0f} -> {a['bytes_down_per_participant']:,.0f} |"
        )


if __name__ == "__main__":
    main()
