"""Weighted mean of update vectors: FedAvg (McMahan et al. 2017) over adapter deltas."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i u_i / sum_i w_i, accumulated in float64 so the order of arrival does not matter."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = np.zeros(updates[0].shape, dtype=np.float64)
    weighted = np.empty_like(total)  # one scratch for all updates: no fresh pages per update
    for update, weight in zip(updates, weights):
        if update.shape != total.shape:
            raise ValueError(f"update shapes differ: {update.shape} vs {total.shape}")
        np.multiply(update, np.float64(weight), out=weighted)
        total += weighted
    total /= float(sum(weights))
    return total.astype(np.float32)
