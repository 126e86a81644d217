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

A coordinator can also run a second configuration that trains alike (one that differs only in
`federation.rounds`, say) from the same global adapter: local training is seeded by the round,
so it recreates every site's update, and the two sums, with and without a target, difference out
its update. So the record also keeps (sha256 of the global adapter, round) for every masked
update, and a site masks at most one update per pair, whatever the configuration: a new run that
would start round r from an adapter this site already trained round r from (the same seeded
round-0 adapter, a rolled-back head) is refused with a reason naming it, and the operator starts
it from another seed. Another round from the same adapter (a round that applied nothing, or
prediction-only distillation, whose global adapter never moves) trains on other batches and is
allowed. What this cannot stop is an update trained *near* an earlier one: without DP, secure
aggregation protects each sum, not a series of sums over updates the coordinator can make alike
(docs/threat-model.md); distributed DP, charged per contribution by the site's own ledger, is the
answer there.

The record also keeps the run rounds in which the site released its masked input alone
(`isolated`, participant/isolation.py): at most once per run round and in at most
`secagg.isolation_rounds` rounds of a run, whatever a coordinator asks.

Without a site directory (simulation) the record stays in `context.state`, as one configuration
plays every part there and a run never resumes across processes.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedlora.atomic import read_json, write_json_atomic

MASKED_FILE = "masked.json"  # {"masked": [...], "trained_from": [...], "isolated": [...]}: see `_record`
MASKED = "secagg.masked"  # context.state ConfigRecord {"rounds": [...], "trained_from": [...], "isolated": [...]}: the same record without a site


def run_round(config_sha256: str, server_round: int) -> str:
    return f"{config_sha256}/{server_round}"


def _record(site: Path | None, state: RecordDict) -> dict[str, list[str]]:
    """{"masked": run rounds masked for, "trained_from": (adapter, round) pairs, "isolated": run rounds released alone}."""
    if site is not None:
        record = read_json(site / MASKED_FILE, {"masked": []})
        return {"masked": list(record["masked"]), "trained_from": list(record.get("trained_from", [])), "isolated": list(record.get("isolated", []))}
    if MASKED not in state:
        return {"masked": [], "trained_from": [], "isolated": []}
    record = state[MASKED]
    return {key: [str(r) for r in record.get(field, [])] for key, field in (("masked", "rounds"), ("trained_from", "trained_from"), ("isolated", "isolated"))}


def _write(site: Path | None, state: RecordDict, record: dict[str, list[str]]) -> None:
    """Written before what it records leaves (atomically, in a site directory)."""
    if site is not None:
        write_json_atomic(site / MASKED_FILE, record)
    else:
        state[MASKED] = ConfigRecord({"rounds": record["masked"], "trained_from": record["trained_from"], "isolated": record["isolated"]})


def masked_record(site: Path | None, state: RecordDict) -> tuple[list[str], list[str]]:
    """Every run round this participant has masked an input for, and every (global adapter, round) those inputs were trained from."""
    record = _record(site, state)
    return record["masked"], record["trained_from"]


def replay_reason(site: Path | None, state: RecordDict, config_sha256: str, server_round: int, adapter_sha256: str) -> str | None:
    """Why masking an update for this run round, trained from this adapter, would be a replay; None if it is not."""
    rounds, trained_from = masked_record(site, state)
    if run_round(config_sha256, server_round) in rounds:
        return f"this participant already masked an input for it in the run of configuration sha256 {config_sha256[:12] or '(none)'}…"
    if adapter_sha256 and run_round(adapter_sha256, server_round) in trained_from:
        return (
            f"this participant already masked an update of round {server_round} trained from global adapter sha256 "
            f"{adapter_sha256[:12]}… (in another configuration): retrained alike, two sums would difference out its update; "
            "start the run from another federation.seed"
        )
    return None


def remember_masked(site: Path | None, state: RecordDict, config_sha256: str, server_round: int, adapter_sha256: str) -> None:
    """Record a run round and the (adapter, round) it trained from before its masked input leaves (crash-safe in a site directory)."""
    record = _record(site, state)
    record["masked"] = sorted({*record["masked"], run_round(config_sha256, server_round)})
    if adapter_sha256:
        record["trained_from"] = sorted({*record["trained_from"], run_round(adapter_sha256, server_round)})
    _write(site, state, record)


def isolated_rounds(site: Path | None, state: RecordDict, config_sha256: str) -> list[int]:
    """The rounds of the run of this configuration in which this participant released its masked update alone
    (coordinator/isolation.py): at most once per run round, in at most `secagg.isolation_rounds` rounds."""
    prefix = f"{config_sha256}/"
    return sorted(int(entry[len(prefix):]) for entry in _record(site, state)["isolated"] if entry.startswith(prefix))


def remember_isolated(site: Path | None, state: RecordDict, config_sha256: str, server_round: int) -> None:
    """Record a run round's isolated release before it leaves."""
    record = _record(site, state)
    record["isolated"] = sorted({*record["isolated"], run_round(config_sha256, server_round)})
    _write(site, state, record)
