"""What a run achieved, read from its metrics rows: rounds run against rounds applied.

A round that ran but changed nothing (every sampled site refused, too few valid updates, an
aborted secure sum) is not progress, and a run whose rounds all changed nothing trained
nothing. The operator's exit code, `status`, the simulation's last line and the decision to
publish a `final` adapter all come from this one reading, so none of them can overstate it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BUDGET = "privacy_budget"  # `stopped_by` of a run the privacy budget ended: complete
REFUSALS = "refusals"  # `stopped_by` of a run every sampled site refused: not complete
REFUSED_ROUNDS_TO_STOP = 2  # consecutive rounds every sampled site refused before the run stops


@dataclass(frozen=True)
class Outcome:
    rounds_planned: int
    rounds_run: int  # rounds that went through the pipeline, applied or not
    rounds_applied: int  # rounds that moved the global adapter
    stopped: str  # why the run ended early ('' if it did not)
    stopped_by: str  # BUDGET, REFUSALS or ''

    @property
    def complete(self) -> bool:
        """Every planned round ran, or the privacy budget ended the run where it had to."""
        return self.rounds_run >= self.rounds_planned or self.stopped_by == BUDGET

    @property
    def succeeded(self) -> bool:
        """Complete, and at least one round changed the global adapter."""
        return self.complete and self.rounds_applied > 0

    def summary(self) -> str:
        text = f"{self.rounds_run}/{self.rounds_planned} rounds run, {self.rounds_applied} applied"
        if self.stopped:
            text += f"; stopped: {self.stopped}"
        if self.rounds_applied == 0 and self.complete:
            text += "; nothing was trained, so no final adapter was published"
        return text


def read_outcome(rows: Sequence[dict[str, Any]], rounds_planned: int) -> Outcome:
    """The outcome of a run from its metrics rows (round 0, the untrained adapter, is not a round run)."""
    run = [row for row in rows if row.get("round", 0) > 0 and "stopped" not in row]
    stop = next((row for row in rows if "stopped" in row), {})
    return Outcome(
        rounds_planned=rounds_planned,
        rounds_run=len({row["round"] for row in run}),
        rounds_applied=len({row["round"] for row in run if row.get("applied")}),
        stopped=str(stop.get("stopped", "")),
        stopped_by=str(stop.get("stopped_by", "")),
    )


def refused_by_everyone(row: dict[str, Any]) -> bool:
    """Whether every participant sampled for a round answered with a refusal or a failure.

    Timeouts do not count: a slow site may answer next round, a site that refuses the
    instruction (or fails on it) will refuse the same instruction again.
    """
    refusals = [skip for skip in row.get("skipped", []) if skip["reason"].startswith(("refused:", "failed:"))]
    return row.get("sampled", 0) > 0 and len(refusals) == row["sampled"]


def refusal_stop(rows: Sequence[dict[str, Any]]) -> str:
    """Why the run should stop now: the last REFUSED_ROUNDS_TO_STOP rounds refused by everyone ('' if not)."""
    last = [row for row in rows if row.get("round", 0) > 0 and "stopped" not in row][-REFUSED_ROUNDS_TO_STOP:]
    if len(last) < REFUSED_ROUNDS_TO_STOP or not all(refused_by_everyone(row) for row in last):
        return ""
    reasons = sorted({f"{skip['participant']}: {skip['reason']}" for skip in last[-1]["skipped"]})
    rounds = ", ".join(str(row["round"]) for row in last)
    return f"every sampled participant refused rounds {rounds}; " + "; ".join(reasons)
