"""The noise of user-level DP, and DP-FedAvg's estimator of the round's mean update.

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent Language Models"
(ICLR 2018): each participant's update is clipped to C and counted once (no example weights);
the round's update is (sum of clipped updates + N(0, (z C)^2 I)) / (q N), with the fixed
denominator q N (the expected number of participants under Poisson sampling with rate q), so
that adding or removing one participant moves the result by at most C / (q N) whatever the
others sent. The Gaussian draws come from a generator seeded by the OS CSPRNG: fixing the run
seed does not fix the noise, and nobody can recompute it. (numpy's floating-point Gaussian is
not hardened against the floating-point attacks of Mironov, CCS 2012; noted in docs/threat-model.md.)

Distributed DP (secure aggregation on) uses integer noise instead, added by each participant to
its fixed-point encoding before masking: the Skellam mechanism of Agarwal, Kairouz & Liu, "The
Skellam Mechanism for Differentially Private Federated Learning" (NeurIPS 2021). Sk(mu) =
Poisson(mu) - Poisson(mu) has variance 2 mu, and a sum of independent Skellam variables is
Skellam with the summed parameter, so a bucket's secure sum carries exactly the sum of its
members' shares (`skellam_mu`, `skellam`; docs/decisions.md, "Distributed DP").
"""

from __future__ import annotations

import math
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


# numpy's Poisson sampler (PTRS, Hoermann 1993) evaluates its acceptance test as a difference of
# terms of size ~ lam * log(lam) in float64, so its error grows with lam. Measured (numpy 2.4,
# 2e6 draws each): the standardised variance is 1.0068 at lam = 1e14, 1.036 at 1e15 (2.6x the
# Gaussian's 3-sigma tail) and 1.51 at 4e15 (11x); above 2^53 the draws are not even all integers
# (only even values at 1e16, multiples of 4 at 2.3e16). With 2e7 draws a KS test against the
# Gaussian fails at 2^44 (p ~ 1e-53, excess kurtosis -0.011) and passes at 2^40 and 2^30. At 2^30
# the terms of the acceptance test are ~lam log(lam) ~ 2e10, where a float64 ulp is 4e-6: the
# sampled pmf is within a relative e ~ 1e-5 of Poisson's (an estimate; no test of 2e7 draws can
# see it). The fixed-point plan keeps every participant's parameter at or below this bound
# (`fedlora.secagg.plan.check_fixed_point`); the sampler refuses more rather than draw wrong noise.
SKELLAM_MU_MAX = float(2**30)
# A bucket's sum is a convolution of k shares, so (were the k errors aligned, the worst case) its
# pmf is within (1 +- e)^k ~ 1 +- k e of the Skellam's. The plan also bounds the bucket's total
# parameter k mu by this, so k e <= ~2e-16 * 2^34 * log(2^30) ~ 1e-4 whatever k: a privacy loss
# off by at most ~2e-4 per round even then.
SKELLAM_SUM_MU_MAX = float(2**34)


def skellam_mu(noise_multiplier: float, sensitivity: float, members: int, dropout_margin: float = 0.0) -> float:
    """One participant's Skellam parameter mu for distributed DP.

    Its share has variance 2 mu = (z * sensitivity)^2 / (k (1 - m)), so any k (1 - m) of the k
    members' shares sum to noise of std >= z * sensitivity (all k: z * sensitivity / sqrt(1 - m)).
    `sensitivity` is in the units the noise is added in (integers of the fixed point: see
    `fedlora.secagg.plan.rounded_sensitivity`).
    """
    if not (noise_multiplier >= 0 and sensitivity > 0 and members >= 1 and 0 <= dropout_margin < 1):
        raise ValueError(
            f"need noise_multiplier >= 0, sensitivity > 0, members >= 1 and 0 <= dropout_margin < 1, "
            f"got {noise_multiplier}, {sensitivity}, {members}, {dropout_margin}"
        )
    return (noise_multiplier * sensitivity) ** 2 / (2.0 * members * (1.0 - dropout_margin))


def skellam(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of Sk(mu) = Poisson(mu) - Poisson(mu) (int64; variance 2 mu).

    `rng` must be secret (`secret_rng`): whoever can recompute the draws can subtract them.
    Refuses mu above `SKELLAM_MU_MAX`, where numpy's Poisson sampler is no longer accurate.
    """
    if not 0 <= mu <= SKELLAM_MU_MAX or not math.isfinite(mu):
        raise ValueError(
            f"Skellam parameter {mu:.6g} is outside [0, {SKELLAM_MU_MAX:.6g}]: numpy's Poisson sampler is "
            "inaccurate for larger means (see fedlora.privacy.noise); plan a smaller fixed-point scale"
        )
    if mu == 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(mu, size) - rng.poisson(mu, size)
