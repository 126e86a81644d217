"""The coordinator's whole view of a round: units, and the one function that combines them.

A unit is a bucket of participants as the coordinator learns it: the member names, the sum of
their weighted updates (in the aggregation mode's server coordinates), the total weight, and
the error bound of that sum. In plaintext mode each participant's update is a bucket of one;
under secure aggregation each bucket's secure sum is one unit. Robust rules and noise act on
units, so they are written once and run the same with and without secure aggregation
(DESIGN.md, "The round pipeline").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora.aggregate.robust import MeanRule, RobustRule
from fedlora.privacy.noise import NoisySum


@dataclass(frozen=True)
class Unit:
    """One bucket's contribution: never more than the mean of its members' updates and their weight.

    Held as the mean, so a participant's own float32 update is a unit without a copy: a round
    keeps one vector per unit, whatever the dtype, and nothing else of size d per participant.
    """

    members: tuple[str, ...]
    mean: np.ndarray  # (sum over members of weight_i * delta_i) / weight, float32 or float64
    weight: float  # sum over members of weight_i (example counts)
    error_bound: float = 0.0  # max abs error per coordinate of the sum weight * mean (secure sums' fixed point)
    weight_error: float = 0.0  # max abs error of `weight`
    noise_std: float = 0.0  # std per coordinate of the DP noise in the sum weight * mean (distributed DP's shares)

    @classmethod
    def from_total(
        cls, members: tuple[str, ...], total: np.ndarray, weight: float, error_bound: float = 0.0, weight_error: float = 0.0, noise_std: float = 0.0,
    ) -> Unit:
        """A unit from a sum of weighted updates (a secure bucket's sum)."""
        return cls(members, np.asarray(total, dtype=np.float64) / weight, weight, error_bound, weight_error, noise_std)

    @property
    def total(self) -> np.ndarray:
        """The sum of the members' weighted updates (float64)."""
        return self.mean.astype(np.float64) * self.weight


def single_units(names: Sequence[str], deltas: Sequence[np.ndarray], weights: Sequence[float]) -> list[Unit]:
    """Plaintext updates as buckets of one (exact, no error): each delta is the unit's mean as it is."""
    return [Unit((name,), delta, float(weight)) for name, delta, weight in zip(names, deltas, weights, strict=True)]


@dataclass
class Combined:
    """The round's update in server coordinates, and what the coordinator reports about it."""

    delta: np.ndarray  # float32
    metrics: dict[str, Any] = field(default_factory=dict)


def combine_units(
    units: Sequence[Unit], rule: RobustRule | None = None, noisy: NoisySum | None = None, rng: np.random.Generator | None = None
) -> Combined:
    """Units -> the round's update: `rule` over the unit means (default: the weighted mean), or
    under DP (`noisy`) with the mean DP-FedAvg's noisy estimate, each participant counted once.

    Under DP a single participant's unit is its update (clipped again here), a secure bucket's
    is its sum, which the secure path makes unweighted when DP is on; `rng` draws the noise.
    Reports each unit's norm and cosine to the result (`participant_updates`, with the weight it
    was given, when every unit is one participant, `bucket_updates` otherwise; a robust rule's unit indices refer to this
    order, under `robust`) and, when the sums carry fixed-point error, the per-coordinate error
    bound of the result (`mean_error_bound`, for the mean: a robust rule moves by whole units).
    """
    if not units:
        raise ValueError("no units to combine")
    rule = rule or MeanRule()
    # Distributed DP with a robust rule: every unit is a noisy sum already, so the rule over them is
    # post-processing and goes the plaintext way (docs/decisions.md, "Robust rules under distributed DP").
    if noisy is not None and (rule.name == "mean" or noisy.noise_std > 0):  # no per-unit norms: released without noise
        if rule.name != "mean" or rng is None:
            raise ValueError(f"central DP needs the mean rule and a noise generator, got rule {rule.name!r}")
        contributions = [noisy.clip_one(unit.mean) if len(unit.members) == 1 else unit.total for unit in units]
        dp = {"noise_std": noisy.noise_std, "expected_count": noisy.expected_count, "clip_norm": noisy.clip_norm}
        return Combined(noisy.estimate(contributions, rng).astype(np.float32), {"dp": dp})
    means = [unit.mean for unit in units]
    result = rule.aggregate(means, [unit.weight for unit in units])
    delta = result.vector
    metrics: dict[str, Any] = {} if rule.name == "mean" else {"robust": {"rule": rule.name, **result.metrics}}
    diagnostics = update_diagnostics(means, delta)
    if all(len(unit.members) == 1 for unit in units):
        metrics["participant_updates"] = [{"participant": u.members[0], "weight": u.weight, **d} for u, d in zip(units, diagnostics)]
    else:
        metrics["bucket_updates"] = [{"members": list(u.members), **d} for u, d in zip(units, diagnostics)]
    if any(unit.error_bound or unit.weight_error for unit in units):
        # |mean error| <= (sum of total errors + |mean| * sum of weight errors) / total weight.
        total_weight = sum(unit.weight for unit in units)
        largest = float(np.max(np.abs(delta), initial=0.0))
        errors = sum(unit.error_bound for unit in units) + largest * sum(unit.weight_error for unit in units)
        metrics["mean_error_bound"] = errors / total_weight
    return Combined(delta, metrics)


def update_diagnostics(deltas: Sequence[np.ndarray], mean: np.ndarray) -> list[dict[str, float]]:
    """Each update's norm and its cosine to the mean update (server coordinates).

    An update far from the others (cosine near 0 or negative, norm out of line) stands out
    here before any robust rule is configured.
    """
    mean64 = mean.astype(np.float64)
    mean_norm = float(np.linalg.norm(mean64))
    delta64 = np.empty_like(mean64)  # one float64 scratch for all units: no fresh pages per unit
    rows = []
    for delta in deltas:
        np.copyto(delta64, delta)
        norm = float(np.sqrt(delta64 @ delta64))
        cosine = float(delta64 @ mean64 / (norm * mean_norm)) if norm > 0 and mean_norm > 0 else 0.0
        rows.append({"update_norm": norm, "cosine_to_aggregate": cosine})
    return rows
