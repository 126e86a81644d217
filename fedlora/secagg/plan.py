"""How a federated round uses the protocol: bucket sizes, graph degree, threshold, weighted input.

Pure functions shared by the config check (fail at load time), the coordinator (one
`SecAggServer` per bucket) and the participant (what vector it masks).

Weighted input. The coordinator needs the example-weighted mean sum_i n_i x_i / sum_i n_i but
may see only sums. Each participant masks the d+1 vector

    [w_i * clip(x_i, C), w_i * C],   w_i = min(n_i / n_ref, 1),

where n_ref is the largest example count in its bucket (public, sent by the coordinator in the
setup request's bound context, `round_context`). The last coordinate sums to C * sum_i w_i, so the bucket's weighted sum and
its total weight both come out of one secure sum, consistent with each other even if a
participant misreports its count in plaintext metadata. The L2 norm of the vector is at most
sqrt(2) * C, which is the norm the fixed-point encoding is sized for (`input_clip_norm`).
"""

from __future__ import annotations

import json
import math

import numpy as np

from fedlora.privacy.clipping import clip

from .fixedpoint import check_no_overflow, choose_scale
from .graph import default_degree


def bucket_sizes(participants: int, bucket_size: int) -> list[int]:
    """Sizes of the buckets `assign_buckets` makes of `participants` (bucket_size 0 = one bucket)."""
    if bucket_size == 0 or participants < bucket_size:
        return [participants]
    count = participants // bucket_size
    return sorted(participants // count + (b < participants % count) for b in range(count))


def neighbourhood_degree(members: int, degree: int = 0) -> int:
    """Graph degree k of a bucket: `degree` (0 = ~3 log2 n, Bell et al.), at most members - 1."""
    return min(members - 1, default_degree(members) if degree == 0 else degree)


def threshold_range(k: int) -> tuple[int, int]:
    """Allowed Shamir thresholds for degree k: more than half the neighbourhood, at most all of it."""
    return (k + 1) // 2 + 1, k + 1


def resolve_threshold(setting: float, k: int) -> int:
    """secagg.threshold -> a share count: 0 = smallest secure, (0.5, 1] = fraction of k+1, >= 2 = count."""
    low, high = threshold_range(k)
    if setting == 0:
        return low
    t = math.ceil(setting * (k + 1) - 1e-9) if setting <= 1 else int(setting)
    if not low <= t <= high:
        raise ValueError(
            f"threshold {t} does not fit a neighbourhood of {k + 1} (degree {k}): it must be in "
            f"[{low}, {high}] (more than half, so no two disjoint groups can both reconstruct)"
        )
    return t


def input_clip_norm(clip_norm: float) -> float:
    """L2 bound of the masked vector [w * clip(x, C), w * C] with w <= 1."""
    return math.sqrt(2.0) * clip_norm


def check_fixed_point(clip_norm: float, members: int) -> float:
    """The fixed-point scale for a bucket; ValueError if n inputs could overflow 32 bits."""
    norm = input_clip_norm(clip_norm)
    scale = choose_scale(norm, members)
    check_no_overflow(norm, members, scale)
    return scale


def round_context(server_round: int, weight_ref: float) -> str:
    """The round's public parameters as the protocol binds them (`SetupRequest.context`).

    Canonical JSON with the float written exactly, so coordinator and participant derive the
    same key schedule from the same values, and different keys from any difference.
    """
    return json.dumps({"server_round": server_round, "weight_ref": float(weight_ref).hex()}, sort_keys=True)


def weighted_input(
    update: np.ndarray, num_examples: int, weight_ref: float, clip_norm: float, update_bound: float | None = None
) -> np.ndarray:
    """The float64 vector a participant masks: [w * clip(update, C), w * C] (see module doc).

    `update_bound` replaces C as the update's clip (not the weight slot's): a simulated attacker's.
    """
    if num_examples <= 0:
        raise ValueError(f"example count {num_examples} is not positive")
    if not weight_ref > 0:
        raise ValueError(f"weight reference {weight_ref} is not positive")
    weight = min(num_examples / weight_ref, 1.0)
    clipped = clip(update, clip_norm if update_bound is None else update_bound)  # float64 copy; raises on NaN/inf
    out = np.empty(clipped.size + 1, dtype=np.float64)
    np.multiply(clipped, weight, out=out[:-1])
    out[-1] = weight * clip_norm
    return out


def split_weighted_sum(total: np.ndarray, clip_norm: float, weight_ref: float) -> tuple[np.ndarray, float]:
    """Decoded secure sum -> (sum_i n_i clip(x_i), sum_i n_i), in example units (float64)."""
    return total[:-1] * weight_ref, float(total[-1]) / clip_norm * weight_ref
