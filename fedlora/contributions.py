"""What each contribution was worth: Shapley values of a round's units, members' values from
overlapping buckets, and a robust anomaly score.

A round's players are its units (a participant's update in plaintext, a bucket's sum under
secure aggregation), the utility of a set S of them is the validation gain of the global adapter
moved by the weighted mean of S (`coordinator/contributions.py`), and a unit's value is its
Shapley value in that game. Exact for few units; otherwise GTG-Shapley (Liu, Chen, Wang, Tian,
Liu & Yu, "GTG-Shapley: Efficient and Accurate Participant Contribution Evaluation in Federated
Learning", ACM TIST 13(4), 2022): Monte Carlo over permutations, guided so that every unit leads
equally often, with within-round truncation (once a prefix is within `tolerance` of the whole
round's gain, the rest of the permutation adds nothing and is not evaluated).

A member's value is then the least-squares solution of "a unit's value is the sum of its
members' values" over all rounds: in plaintext (units of one) that is the mean of its per-round
values; under secure aggregation the coordinator never sees a member alone, and the random
buckets of different rounds overlap differently, which is what separates members. Its standard
error comes from the residuals, and a member whose value the overlaps cannot separate (every
bucket it was in had the same partner, say) is reported as not identifiable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Utility = Callable[[frozenset[int]], float]  # U(S) for a set of unit indices; U(empty) = 0
MAD_TO_STD = 1.4826  # the MAD of a normal sample times this estimates its standard deviation
ANOMALY_THRESHOLD = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
HARM_THRESHOLD = 2.0  # standard errors below zero: a one-sided test at about 2.3%
ALIGNMENT_THRESHOLD = 3.0  # standard errors below the median member's share of the aggregate


def exact_shapley(players: int, utility: Utility) -> np.ndarray:
    """Shapley values by the definition: each player's marginal gain averaged over all orders
    (by subsets, 2^n utility calls)."""
    values = np.zeros(players)
    everyone = range(players)
    for size in range(players):
        weight = math.factorial(size) * math.factorial(players - size - 1) / math.factorial(players)
        for subset in itertools.combinations(everyone, size):
            base = frozenset(subset)
            before = utility(base)
            for player in everyone:
                if player not in base:
                    values[player] += weight * (utility(base | {player}) - before)
    return values


def gtg_shapley(players: int, utility: Utility, rng: np.random.Generator, permutations: int, tolerance: float = 0.01) -> np.ndarray:
    """GTG-Shapley's estimate from `permutations` guided permutations (Liu et al. 2022).

    Permutation k starts with player k mod n, the rest shuffled, so each player is measured
    first (against the empty set) equally often. Within a permutation, once a non-empty prefix
    has |U(all) - U(prefix)| at most `tolerance` times |U(all)|, the remaining players' marginal
    gains are taken as 0. GTG-Shapley's between-round truncation (a round of little total gain
    counts as none) is left out: good and bad units that cancel out are what an audit looks for.
    """
    if players == 0:
        return np.zeros(0)
    whole = utility(frozenset(range(players)))
    values, counts = np.zeros(players), np.zeros(players)
    for k in range(permutations):
        lead = k % players
        order = [lead, *rng.permutation([p for p in range(players) if p != lead]).tolist()]
        prefix: frozenset[int] = frozenset()
        previous = 0.0
        for player in order:
            if prefix and whole != 0 and abs(whole - previous) <= tolerance * abs(whole):
                gain = 0.0  # truncated: what is left of the round's gain is within the tolerance
            else:
                prefix = prefix | {player}
                current = utility(prefix)
                gain, previous = current - previous, current
            values[player] += gain
            counts[player] += 1
    return values / np.maximum(counts, 1)


def shapley_values(players: int, utility: Utility, rng: np.random.Generator, permutations: int, tolerance: float = 0.01) -> np.ndarray:
    """Exact Shapley values when enumerating subsets costs no more than the permutation budget
    would (2^n <= permutations * n), GTG-Shapley's estimate otherwise."""
    if 2**players <= permutations * max(players, 1):
        return exact_shapley(players, utility)
    return gtg_shapley(players, utility, rng, permutations, tolerance)


@dataclass(frozen=True)
class MemberEstimate:
    """Members' per-round values from unit values, by least squares over the units' membership."""

    names: list[str]
    value: np.ndarray  # per member; NaN where not identifiable
    stderr: np.ndarray  # per member; NaN where not identifiable or without residual degrees of freedom
    identifiable: np.ndarray  # bool per member
    residual_std: float  # of a unit's value around the sum of its members' estimates (NaN: no degrees of freedom)
    equations: int  # units used
    rank: int  # of the membership matrix


def member_values(units: Sequence[tuple[Sequence[str], float]], average: bool = False) -> MemberEstimate:
    """Solve value(unit) = sum of its members' values for every member, in the least-squares sense
    (`average`: the mean of its members' values, for a unit's cosine to the aggregate).

    `units`: (members, value) for every unit of every round. A member's estimate is identifiable
    when its indicator lies in the row space of the membership matrix (some combination of the
    units isolates it); its standard error is sqrt(sigma^2 [(X^T X)^+]_mm), sigma^2 the residual
    variance with (units - rank) degrees of freedom.
    """
    names = sorted({name for members, _ in units for name in members})
    index = {name: k for k, name in enumerate(names)}
    x = np.zeros((len(units), len(names)))
    for row, (members, _) in enumerate(units):
        for name in members:
            x[row, index[name]] = 1.0 / len(members) if average else 1.0
    y = np.array([value for _, value in units], dtype=np.float64)
    solution, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    projection = np.linalg.pinv(x) @ x  # onto the row space of x
    identifiable = np.abs(np.diag(projection) - 1.0) < 1e-8
    dof = len(units) - rank
    residual_std = float(np.sqrt(np.sum((y - x @ solution) ** 2) / dof)) if dof > 0 else math.nan
    stderr = residual_std * np.sqrt(np.clip(np.diag(np.linalg.pinv(x.T @ x)), 0.0, None))
    value = np.where(identifiable, solution, math.nan)
    return MemberEstimate(names, value, np.where(identifiable, stderr, math.nan), identifiable, residual_std, len(units), int(rank))


def robust_z(values: Sequence[float], floor: float = 0.0) -> np.ndarray:
    """Each value's modified z-score, (x - median) / max(1.4826 MAD, floor) (Iglewicz & Hoaglin
    1993), over the finite values; NaN for the others.

    The median and MAD are those of the participants themselves, so a minority of bad ones
    cannot drag the reference towards them as they would a mean and standard deviation. `floor`
    is the smallest difference that means anything (one validation record's worth of accuracy):
    without it, values that tie (a MAD of 0) would make any departure infinitely anomalous.
    """
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full(x.shape, math.nan)
    median = float(np.median(finite))
    scale = max(MAD_TO_STD * float(np.median(np.abs(finite - median))), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (x - median) / scale if scale > 0 else np.where(x == median, 0.0, np.sign(x - median) * math.inf)
    return np.where(np.isfinite(x), z, math.nan)


def anomaly_scores(value: Sequence[float], cosine: Sequence[float] | None = None, value_floor: float = 0.0) -> np.ndarray:
    """The lower of each participant's robust z-scores of value and (where known) mean cosine to
    the aggregate: low value or an update pointing away from everyone else's is what is anomalous;
    a participant better than the rest is not."""
    scores = robust_z(value, value_floor)
    if cosine is not None:
        scores = np.fmin(scores, robust_z(cosine))
    return scores


def harm_scores(value: Sequence[float], stderr: Sequence[float]) -> np.ndarray:
    """Each value in standard errors, value / stderr: below -HARM_THRESHOLD a contribution lowered
    the validation score beyond what the estimate's error explains.

    The robust z-score compares participants with each other, and under secure buckets the
    members' estimates are too noisy for any of them to stand out by 3.5 MADs; this asks of each
    estimate on its own whether it is harmful with confidence. NaN where there is no error to
    measure by.
    """
    v, se = np.asarray(value, dtype=np.float64), np.asarray(stderr, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(se) & (se > 0), v / se, math.nan)


def flagged(scores: np.ndarray, threshold: float = ANOMALY_THRESHOLD) -> np.ndarray:
    """Which scores lie beyond -threshold (NaN is never flagged: no evidence either way)."""
    return np.nan_to_num(scores, nan=0.0) < -threshold


def aggregate_shares(weights: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Each unit's share of the round's aggregate along its direction: w_u <mean_u, g> / (W |g|^2).

    g is the weighted mean of the units and W their total weight, so the shares sum to 1, and a
    unit's share is the sum of its members' (it is linear in their updates), which least squares
    over overlapping buckets can split exactly where a cosine cannot be. An honest member carries
    about its weight's share; one trained on flipped labels carries a negative share, one trained
    on another task about none.
    """
    w = np.asarray(weights, dtype=np.float64)
    x = np.asarray(means, dtype=np.float64)
    g = (w[:, None] * x).sum(axis=0) / w.sum()
    norm = float(g @ g)
    return w * (x @ g) / (w.sum() * norm) if norm > 0 else np.zeros(len(w))


def alignment_deficits(share: Sequence[float], stderr: Sequence[float]) -> np.ndarray:
    """Each member's share below the median member's, in its own standard errors (NaN without one)."""
    s, se = np.asarray(share, dtype=np.float64), np.asarray(stderr, dtype=np.float64)
    finite = s[np.isfinite(s)]
    median = float(np.median(finite)) if finite.size else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(se) & (se > 0), (s - median) / se, math.nan)
