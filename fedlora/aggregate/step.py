"""One aggregation step: the round's update -> server optimiser -> global adapter.

`apply_mean` is what the coordinator runs after combining a round's units (plaintext or
secure, `fedlora.aggregate.units`); `aggregate_round` is the whole plaintext step from
participants' uploads, for `benchmarks/quality.py` and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.aggregate.units import combine_units, single_units

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
    """The whole plaintext step: uploads -> server deltas -> units of one -> combine -> apply.

    Per-participant diagnostics land in `metrics['participant_updates']`.
    """
    if not contributions:
        raise ValueError("no contributions to aggregate")
    for c in contributions:
        expected = aggregator.upload_layout(layout, c.rank).size
        if c.upload.shape != (expected,):
            raise ValueError(f"{c.participant}: upload has shape {c.upload.shape}, expected ({expected},) at rank {c.rank}")
    deltas = aggregator.server_deltas(global_vector, layout, [c.upload for c in contributions], [c.rank for c in contributions])
    units = single_units([c.participant for c in contributions], deltas, [c.weight for c in contributions])
    combined = combine_units(units)
    result = apply_mean(aggregator, optimizer, global_vector, layout, combined.delta)
    result.metrics.update(combined.metrics)
    return result
