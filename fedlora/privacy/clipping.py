"""L2 clipping of a participant's update to `robust.clip_norm` (one bound for robustness, DP and SecAgg).

The same bound C caps one participant's influence on a robust rule, is the sensitivity of DP
noise, and sizes secure aggregation's fixed-point encoding, so it is one setting.
"""

from __future__ import annotations

import numpy as np


def clip(vec: np.ndarray, clip_norm: float) -> np.ndarray:
    """Return `vec` as float64 scaled down to L2 norm <= clip_norm; reject NaN/inf."""
    if not clip_norm > 0 or not np.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    v = np.array(vec, dtype=np.float64).ravel()  # a copy: callers' arrays stay untouched
    if not np.all(np.isfinite(v)):
        bad = np.flatnonzero(~np.isfinite(v))
        kind = "NaN" if np.isnan(v[bad[0]]) else "inf"
        raise ValueError(
            f"update contains {bad.size} non-finite value(s) ({kind} at index {bad[0]}); "
            "fix the local training step (e.g. lower the learning rate) before sending it"
        )
    norm = float(np.linalg.norm(v))
    if norm > clip_norm:
        v *= clip_norm / norm
    return v
