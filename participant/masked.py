"""The rounds this participant has masked an input for, remembered across processes and runs.

A coordinator that gets two sums over the same updates, one with and one without a target, reads
the target's update as their difference (issue 22, attack 4). Within one Flower run the record
in `context.state` stops that; but a resumed run is a new Flower run with a fresh `context.state`,
and a deployed SuperNode starts a process per message. So a deployed site records each masked
round in its own directory (`masked.json`, written atomically with `fedlora.atomic` before the
masked input leaves) and refuses a train, setup or mask request for a round it has recorded.

"The same run" is the run configuration, identified by the sha256 of the TOML its train
instruction carries: a coordinator resumes only from a checkpoint of the same configuration
(coordinator/rounds.py `restore`), so a resumed run keeps it, and a new run of the same
configuration is the same run too. A run round is (config sha256, server round): a site masks
at most one input for it, ever. A round cut short after this site masked is therefore run again
without it. A coordinator that changes the configuration starts another run: the site trains
anew (fresh noise, charged again by its own privacy ledger), and never re-masks the old input.

Without a site directory (simulation) the record stays in `context.state`, as one configuration
plays every part there and a run never resumes across processes.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedlora.atomic import read_json, write_json_atomic

MASKED_FILE = "masked.json"  # {"masked": ["<config sha256>/<round>", ...]}
MASKED = "secagg.masked"  # context.state ConfigRecord {"rounds": [...]}: the same record without a site


def run_round(config_sha256: str, server_round: int) -> str:
    return f"{config_sha256}/{server_round}"


def masked_rounds(site: Path | None, state: RecordDict) -> list[str]:
    """Every run round this participant has masked an input for."""
    if site is not None:
        return list(read_json(site / MASKED_FILE, {"masked": []})["masked"])
    return [str(r) for r in state[MASKED]["rounds"]] if MASKED in state else []


def already_masked(site: Path | None, state: RecordDict, config_sha256: str, server_round: int) -> bool:
    return run_round(config_sha256, server_round) in masked_rounds(site, state)


def remember_masked(site: Path | None, state: RecordDict, config_sha256: str, server_round: int) -> None:
    """Record a run round before its masked input leaves (crash-safe in a site directory)."""
    rounds = sorted({*masked_rounds(site, state), run_round(config_sha256, server_round)})
    if site is not None:
        write_json_atomic(site / MASKED_FILE, {"masked": rounds})
    else:
        state[MASKED] = ConfigRecord({"rounds": rounds})
