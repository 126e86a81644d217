"""Random orthonormal rotation of an update before it is narrowed to 16 bits.

Kairouz, Liu & Steinke ("The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021) flatten each vector with a randomised Hadamard transform
so that no coordinate carries much of its norm, and a few bits per coordinate suffice. We use
random signs followed by the orthonormal DCT-II instead: it is defined for every length, so
the vector is not padded to a power of two and the upload does not grow.

For x with ||x|| <= C, coordinate j of DCT(s * x) is sum_k D_jk s_k x_k with independent
Rademacher s_k and |D_jk| <= sqrt(2 / d): sub-Gaussian with variance proxy 2 C^2 / d, so by
Hoeffding and a union bound over the d coordinates every one of them stays within
`rotated_bound(C, d)` except with probability `ROTATION_FAILURE`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.fft import dct, idct

from .prg import expand_mask

ROTATION_FAILURE = 1e-9  # probability that some coordinate of one rotated vector exceeds the bound


def signs(seed: bytes, length: int) -> np.ndarray:
    """`length` independent uniform +-1 (float64) from AES-CTR keyed by a 32-byte public seed."""
    return 1.0 - 2.0 * (expand_mask(seed, length) & 1).astype(np.float64)


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """DCT-II (orthonormal) of x times the seed's signs: float64, norm preserved."""
    return dct(signs(seed, x.size) * np.asarray(x, dtype=np.float64), type=2, norm="ortho")


def unrotate(y: np.ndarray, seed: bytes) -> np.ndarray:
    """The inverse of `rotate` with the same seed."""
    return signs(seed, y.size) * idct(np.asarray(y, dtype=np.float64), type=2, norm="ortho")


def rotated_bound(norm: float, length: int, failure: float = ROTATION_FAILURE) -> float:
    """A bound on every coordinate of a rotated vector of L2 norm <= `norm`, but for `failure`.

    2 d exp(-t^2 d / (4 norm^2)) = failure gives t = 2 norm sqrt(ln(2 d / failure) / d); no
    coordinate exceeds the norm itself, whatever the signs.
    """
    if length < 1 or not 0 < failure < 1:
        raise ValueError(f"need length >= 1 and 0 < failure < 1, got {length}, {failure}")
    return norm * min(1.0, 2.0 * math.sqrt(math.log(2 * length / failure) / length))
