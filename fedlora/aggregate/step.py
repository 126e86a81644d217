"""One aggregation step: participants' uploads -> weighted mean -> server optimiser -> global adapter.

The same function runs in the coordinator's round loop and in `benchmarks/quality.py`.
With secure aggregation the coordinator only ever sees the mean; `apply_mean` is the part
of the step that needs nothing more (valid for the linear modes, whose server deltas are
the uploads themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.aggregate.mean import weighted_mean

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout
    from fedlora.aggregate.registry import Aggregator
    from fedlora.aggregate.server import ServerOptimizer


@dataclass(frozen=True)
class Contribution:
    """One participant's upload (laid out by `aggregator.upload_layout(layout, rank)`)."""

    participant: str
    upload: np.ndarray
    weight: float
    rank: int


@dataclass
class StepResult:
    vector: np.ndarray  # the new global adapter
    metrics: dict[str, Any] = field(default_factory=dict)


def apply_mean(
    aggregator: Aggregator, optimizer: ServerOptimizer, global_vector: np.ndarray, layout: AdapterLayout, mean_delta: np.ndarray
) -> StepResult:
    """Move the global adapter by the round's mean update (in the mode's server coordinates)."""
    point = aggregator.server_point(global_vector, layout)
    vector, metrics = aggregator.global_from(optimizer.step(point, mean_delta), global_vector, layout)
    return StepResult(vector, metrics)


def aggregate_round(
    aggregator: Aggregator,
    optimizer: ServerOptimizer,
    global_vector: np.ndarray,
    layout: AdapterLayout,
    contributions: Sequence[Contribution],
) -> StepResult:
    """The whole step, with per-participant diagnostics in `metrics['participant_updates']`."""
    if not contributions:
        raise ValueError("no contributions to aggregate")
    for c in contributions:
        expected = aggregator.upload_layout(layout, c.rank).size
        if c.upload.shape != (expected,):
            raise ValueError(f"{c.participant}: upload has shape {c.upload.shape}, expected ({expected},) at rank {c.rank}")
    deltas = aggregator.server_deltas(global_vector, layout, [c.upload for c in contributions], [c.rank for c in contributions])
    mean = weighted_mean(deltas, [c.weight for c in contributions])
    result = apply_mean(aggregator, optimizer, global_vector, layout, mean)
    result.metrics["participant_updates"] = update_diagnostics([c.participant for c in contributions], deltas, mean)
    return result


def update_diagnostics(names: Sequence[str], deltas: Sequence[np.ndarray], mean: np.ndarray) -> list[dict[str, Any]]:
    """Each participant's update norm and its cosine to the mean update (server coordinates).

    A participant far from the others (cosine near 0 or negative, norm out of line) stands out
    here before any robust rule is configured.
    """
    mean64 = mean.astype(np.float64)
    mean_norm = float(np.linalg.norm(mean64))
    rows = []
    for name, delta in zip(names, deltas):
        delta64 = delta.astype(np.float64)
        norm = float(np.linalg.norm(delta64))
        cosine = float(delta64 @ mean64 / (norm * mean_norm)) if norm > 0 and mean_norm > 0 else 0.0
        rows.append({"participant": name, "update_norm": norm, "cosine_to_aggregate": cosine})
    return rows
