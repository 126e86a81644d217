"""The noise of user-level DP, and DP-FedAvg's estimator of the round's mean update.

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018): each participant's update is clipped to C and counted once (no example weights);
the round's update is (sum of clipped updates + N(0, (z C)^2 I)) / (q N), with the fixed
denominator q N (the expected number of participants under Poisson sampling with rate q), so
that adding or removing one participant moves the result by at most C / (q N) whatever the
others sent. The Gaussian draws come from a generator seeded by the OS CSPRNG: fixing the run
seed does not fix the noise, and nobody can recompute it. (numpy's floating-point Gaussian is
not hardened against the floating-point attacks of Mironov, CCS 2012; noted in docs/threat-model.md.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.privacy.clipping import clip


def secret_rng() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG."""
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


@dataclass(frozen=True)
class NoisySum:
    """How a DP round turns its units into one update (see the module docstring)."""

    clip_norm: float  # C: each participant's contribution is at most this long
    noise_std: float  # added here: z C for central DP, 0 when the sums already carry the noise
    expected_count: float  # q N, the fixed denominator

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_std >= 0 and self.expected_count > 0):
            raise ValueError(f"need clip_norm > 0, noise_std >= 0 and expected_count > 0, got {self}")

    def estimate(self, contributions: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """(sum of `contributions` + Gaussian noise) / expected_count, float64.

        A contribution is one participant's update (clipped here again: the coordinator of central
        DP does not rely on participants for the bound) or a bucket's secure sum of clipped updates.
        """
        if not contributions:
            raise ValueError("no contributions to estimate from")
        total = np.zeros(np.shape(contributions[0]), dtype=np.float64)
        for vector in contributions:
            total += vector
        if self.noise_std > 0:
            total += rng.normal(0.0, self.noise_std, size=total.shape)
        return total / self.expected_count

    def clip_one(self, update: np.ndarray) -> np.ndarray:
        return clip(update, self.clip_norm)
