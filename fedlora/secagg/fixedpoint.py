"""Fixed-point encoding of float updates into Z_{2^32}.

Masking (Bonawitz et al., CCS 2017) works in a finite group, so each clipped
update is scaled, stochastically rounded (unbiased, as in Kairouz et al.,
"The Distributed Discrete Gaussian", ICML 2021) and mapped to uint32 in two's
complement. The scale is chosen so that the sum of all participants' vectors
cannot leave the signed 32-bit range: wraparound would corrupt the sum silently. On the 16-bit
wire (`narrow`) the update coordinates are rotated and clipped to each member's share of the
16-bit range on the way; the rest of the encoding is the same.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from fedlora.privacy.clipping import clip

from .narrow import Narrow
from .prg import expand_mask
from .rotation import rotate, unrotate

WIRE_BITS = 32
# Float64 clipping can leave a norm a few ulps above clip_norm; budget for it.
_CLIP_SLACK = 1.0 + 1e-9


def _max_abs(bits: int) -> int:
    if not 2 <= bits <= WIRE_BITS:
        raise ValueError(f"bits must be in [2, {WIRE_BITS}], got {bits}")
    return (1 << (bits - 1)) - 1


def encode(vec: np.ndarray, clip_norm: float, scale: float, rounding_key: bytes, narrow: Narrow | None = None) -> np.ndarray:
    """Clip to `clip_norm`, scale, round stochastically, return uint32 (two's complement).

    The rounding draws come from AES-CTR keyed by `rounding_key` (32 bytes): with a fresh
    secret key nobody else can recompute them; the same key repeats the encoding exactly.
    With `narrow` (the 16-bit wire) its leading coordinates are rotated after clipping and,
    once scaled, clipped to +-narrow.cap, so that their rounded values stay within it.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    check_no_overflow(clip_norm, 1, scale)  # even one vector must fit in int32
    v = clip(vec, clip_norm)
    if narrow is not None:
        v[: narrow.length] = rotate(v[: narrow.length], narrow.seed)
    v *= scale  # |v| <= coordinate_bound(clip_norm, scale) <= 2^31 / n_participants
    if narrow is not None:  # rare for an honest update (rotation.rotated_bound); only shortens it
        np.clip(v[: narrow.length], -narrow.cap, narrow.cap, out=v[: narrow.length])
    low = np.floor(v)
    v -= low  # fractional part in [0, 1)
    v *= 2.0**32
    # Round up with probability equal to the fractional part: E[result] = v (to 2^-32).
    low += expand_mask(rounding_key, v.size) < v
    return low.astype(np.int32).view(np.uint32)  # two's complement in Z_{2^32}


def decode(sum_u32: np.ndarray, scale: float, dtype: type = np.float32, narrow: Narrow | None = None) -> np.ndarray:
    """Interpret a uint32 sum as signed int32 and divide by `scale`.

    With `narrow`, the sum's narrow coordinates (already read as int16: `narrow.narrowed`) are
    rotated back.
    """
    ints = np.asarray(sum_u32, dtype=np.uint32).view(np.int32)
    values = ints.astype(np.float64) / scale
    if narrow is not None:
        values[: narrow.length] = unrotate(values[: narrow.length], narrow.seed)
    return values.astype(dtype)


def coordinate_bound(clip_norm: float, scale: float) -> int:
    """Largest |integer| one encoded coordinate can take, computed exactly.

    A clipped coordinate satisfies |x| <= clip_norm * _CLIP_SLACK (the slack also covers the
    float64 rounding of x * scale), and stochastic rounding moves |x * scale| to at most its
    ceiling. The product is taken in exact rational arithmetic, so the bound is never below
    what `encode` can produce.
    """
    return math.ceil(Fraction(clip_norm) * Fraction(_CLIP_SLACK) * Fraction(scale))


def choose_scale(clip_norm: float, n_participants: int, bits: int = WIRE_BITS, *, reserve: int = 0) -> float:
    """Largest float scale such that n clipped, rounded vectors cannot overflow `bits` signed.

    Each participant gets the integer budget L = floor((max - reserve) / n); the scale is the
    largest float with coordinate_bound(clip_norm, scale) <= L, so n * L + reserve <= max holds
    in integers and `check_no_overflow` (with the same reserve) accepts every scale this returns.
    `reserve` keeps that many integers of each coordinate's range free (for noise).
    """
    if n_participants < 1:
        raise ValueError(f"n_participants must be >= 1, got {n_participants}")
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm}")
    if not 0 <= reserve < _max_abs(bits):
        raise ValueError(f"a reserve of {reserve} leaves nothing of the {bits}-bit signed range")
    budget = (_max_abs(bits) - reserve) // n_participants
    if budget < 1:
        raise ValueError(
            f"{n_participants} participants cannot be summed in {bits}-bit fixed point: "
            f"each update would get less than one quantisation step per clip_norm; "
            f"use secure-aggregation buckets of at most {_max_abs(bits)} participants"
        )
    scale = float(Fraction(budget) / (Fraction(clip_norm) * Fraction(_CLIP_SLACK)))
    while coordinate_bound(clip_norm, scale) > budget:  # float rounding went up: step down
        scale = math.nextafter(scale, 0.0)
    return scale


def widest_clip(scale: float, bits: int = WIRE_BITS) -> float:
    """The largest L2 norm one vector can be encoded with at `scale` on its own.

    What a malicious participant can send: it ignores clipping and is bounded only by the
    encoding's range (its share of the sum's range is then everyone's).
    """
    norm = float(Fraction(_max_abs(bits)) / (Fraction(scale) * Fraction(_CLIP_SLACK)))
    while coordinate_bound(norm, scale) > _max_abs(bits):
        norm = math.nextafter(norm, 0.0)
    return norm


def check_no_overflow(
    clip_norm: float, n_participants: int, scale: float, bits: int = WIRE_BITS, *, reserve: int = 0
) -> None:
    """Raise ValueError if n clipped vectors at this scale, plus `reserve`, could overflow the signed range."""
    worst = n_participants * coordinate_bound(clip_norm, scale) + reserve
    if worst > _max_abs(bits):
        kept = f" + {reserve} kept for noise" if reserve else ""
        raise ValueError(
            f"fixed-point overflow: {n_participants} participants x clip_norm {clip_norm} "
            f"x scale {scale:.6g}{kept} can reach {worst} > {_max_abs(bits)} ({bits}-bit signed); "
            f"use scale <= choose_scale(clip_norm, n_participants) or smaller buckets"
        )


def error_bound(n_participants: int, scale: float) -> float:
    """Max abs error per coordinate of a decoded sum of n vectors (before dtype rounding)."""
    return n_participants / scale
