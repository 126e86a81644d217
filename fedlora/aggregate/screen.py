"""Screening of a round's units before the robust rule: what cannot be combined is set aside.

A unit is rejected for a wrong length, a non-positive or non-finite weight, non-finite values,
or a mean whose norm is far outside the round's distribution (more than `max_norm_ratio` times
the median unit norm; with fewer than 3 units there is no distribution to speak of). Norm
screening is cheap and catches crude scaling attacks and broken training runs; what it lets
through is the robust rule's job. Under secure aggregation a rejected bucket takes its honest
members with it: the coordinator cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.aggregate.units import Unit

MIN_UNITS_FOR_NORMS = 3


@dataclass(frozen=True)
class RejectedUnit:
    members: tuple[str, ...]
    reason: str


def _defect(unit: Unit, length: int) -> str | None:
    if unit.total.shape != (length,):
        return f"update has shape {unit.total.shape}, expected ({length},)"
    if not (np.isfinite(unit.weight) and unit.weight > 0):
        return f"weight {unit.weight} is not a positive number"
    if not np.all(np.isfinite(unit.total)):
        return f"update has {int(np.count_nonzero(~np.isfinite(unit.total)))} non-finite values"
    return None


def screen_units(units: Sequence[Unit], length: int, max_norm_ratio: float) -> tuple[list[Unit], list[RejectedUnit]]:
    """Split units into those the rule may combine and rejections with their reason."""
    kept, rejected = [], []
    for unit in units:
        defect = _defect(unit, length)
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
