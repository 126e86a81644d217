"""Screening of a round's units before the robust rule: what cannot be combined is set aside.

A unit is rejected for a wrong length, a non-positive or non-finite weight, non-finite values,
a mean longer than `robust.clip_norm` when participants clip (an honest member never sends
one: an attacker that skipped clipping is caught here, whatever the others sent), or a mean
whose norm is far outside the round's distribution (more than `max_norm_ratio` times
the median unit norm; with fewer than 3 units there is no distribution to speak of; off under
DP, where whether one unit is kept would depend on the others). Norm
screening is cheap and catches crude scaling attacks and broken training runs; what it lets
through is the robust rule's job. Under secure aggregation a rejected bucket takes its honest
members with it: the coordinator cannot tell them apart (under distributed DP, `secagg.isolation_rounds`
re-runs such a bucket member by member instead: coordinator/isolation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.aggregate.units import Unit

MIN_UNITS_FOR_NORMS = 3
NOISE_TAIL = 10.0  # standard deviations of the noise norm allowed above its typical value


@dataclass(frozen=True)
class RejectedUnit:
    members: tuple[str, ...]
    reason: str


def _defect(unit: Unit, length: int) -> str | None:
    if unit.mean.shape != (length,):
        return f"update has shape {unit.mean.shape}, expected ({length},)"
    if not (np.isfinite(unit.weight) and unit.weight > 0):
        return f"weight {unit.weight} is not a positive number"
    if not np.all(np.isfinite(unit.mean)):
        return f"update has {int(np.count_nonzero(~np.isfinite(unit.mean)))} non-finite values"
    return None


def noise_norm_bound(noise_std: float, length: int) -> float:
    """A norm that `length` independent noise coordinates of std `noise_std` exceed with probability
    below exp(-NOISE_TAIL^2 / 2) (~2e-22): the norm of a Gaussian vector concentrates at
    sigma sqrt(d) with Gaussian tails of width sigma (Lipschitz concentration; the Skellam shares of
    distributed DP are as concentrated, being sums of many integer draws of the same variance)."""
    return noise_std * (np.sqrt(length) + NOISE_TAIL)


def _over_clip_bound(unit: Unit, clip_norm: float) -> str | None:
    """A unit whose mean is longer than the bound every member clipped to holds an unclipped update.

    The mean of clipped updates (with weights <= 1) is never longer than C; the allowance covers
    the secure sum's fixed-point error (per coordinate, on the total and on the weight) and, under
    distributed DP, the norm its noise shares can reach (`noise_norm_bound`): a noise-aware screen,
    so that a member's input far outside the clip bound is caught even in a noisy sum.
    """
    norm = float(np.linalg.norm(unit.mean))
    allowance = (unit.error_bound * np.sqrt(unit.mean.size) + clip_norm * unit.weight_error + noise_norm_bound(unit.noise_std, unit.mean.size)) / unit.weight
    limit = clip_norm * (1 + 1e-6) + allowance
    return None if norm <= limit else f"update norm {norm:.4g} exceeds robust.clip_norm={clip_norm:g}, which every member clips to"


def screen_units(
    units: Sequence[Unit], length: int, max_norm_ratio: float, clip_norm: float | None = None
) -> tuple[list[Unit], list[RejectedUnit]]:
    """Split units into those the rule may combine and rejections with their reason.

    `clip_norm`: the bound participants clip to, when they do (None: updates are not clipped).
    """
    kept, rejected = [], []
    for unit in units:
        defect = _defect(unit, length) or (_over_clip_bound(unit, clip_norm) if clip_norm else None)
        if defect:
            rejected.append(RejectedUnit(unit.members, defect))
        else:
            kept.append(unit)
    if max_norm_ratio > 0 and len(kept) >= MIN_UNITS_FOR_NORMS:
        norms = [float(np.linalg.norm(unit.mean)) for unit in kept]
        limit = max_norm_ratio * float(np.median(norms))
        outliers = {k for k, norm in enumerate(norms) if norm > limit}
        rejected += [
            RejectedUnit(kept[k].members, f"update norm {norms[k]:.4g} exceeds {max_norm_ratio:g} x the round's median {limit / max_norm_ratio:.4g}")
            for k in sorted(outliers)
        ]
        kept = [unit for k, unit in enumerate(kept) if k not in outliers]
    return kept, rejected
