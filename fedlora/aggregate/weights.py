"""Aggregation weights a participant cannot inflate by claiming more examples.

A participant's example count is its own claim: weighting the mean (or the geometric median,
or centred clipping) by it lets one site that claims 10^6 records outweigh every honest one,
with an update that passes every norm screen. Each weighting here bounds one site's weight by
construction (docs/decisions.md, "Aggregation weights"):

- `capped` (the default under the mean; `robust.weighting = "auto"` is `equal` under a robust rule): the claim, capped at `cap` times the median claim of the round. With
  fewer than half the sites lying, the median lies between honest claims, so a liar weighs at
  most `cap` honest medians; honest sites of different sizes keep their proportions up to it.
- `equal`: every site counts once, whatever it claims (as DP-FedAvg does).
- `claimed`: the claims as they are, for consortia that verify them some other way.

Reported losses and accuracies are claims as well: averaged across participants, they get the
weights their counts give updates (`claimed_average`), so a count buys a number no more weight,
and a number that cannot be one (a score outside [0, 1], a negative or infinite loss) is refused
(`score_average`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

WEIGHTINGS = ("capped", "equal", "claimed")


def unit_weights(claims: Sequence[float], weighting: str, cap: float) -> list[float]:
    """One weight per participant from the example counts it claimed (all positive)."""
    counts = _checked(claims, weighting)
    if weighting == "equal":
        return [1.0] * counts.size
    if weighting == "claimed" or counts.size == 0:
        return counts.tolist()
    return np.minimum(counts, cap * float(np.median(counts))).tolist()


def secure_weight_reference(round_claims: Sequence[float], bucket_claims: Sequence[float], weighting: str, cap: float) -> float:
    """The count each member of a secure bucket divides its own claim by (w = min(n / ref, 1), the
    bucket's weight = ref * sum of w), chosen so that w * ref is the member's `unit_weights` weight
    (times one factor for the whole round): `claimed`, the largest claim in the bucket; `equal`, the
    round's smallest claim (every w = 1, each member weighs that factor);
    `capped`, the largest claim but at most `cap` times the round's median claim, so a member
    claiming more than the cap weighs the cap, whatever its claim. The coordinator sees the
    claims; the reference is bound into the instance, so every member uses the same one."""
    members, everyone = _checked(bucket_claims, weighting), _checked(round_claims, weighting)
    if not members.size:
        raise ValueError("a secure bucket needs members")
    if weighting == "equal":
        return float(everyone.min())
    if weighting == "claimed":
        return float(members.max())
    return float(min(members.max(), cap * float(np.median(everyone))))


def _checked(claims: Sequence[float], weighting: str) -> np.ndarray:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"robust.weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    counts = np.asarray(claims, dtype=np.float64)
    if counts.size and not (np.all(np.isfinite(counts)) and np.all(counts > 0)):
        raise ValueError(f"example counts must be positive and finite, got {list(claims)}")
    return counts


def claimed_average(values: Sequence[float], claims: Sequence[float], weighting: str, cap: float) -> float:
    """The average of reported values (losses, accuracies), weighted as `unit_weights` weighs updates."""
    return float(np.average(values, weights=unit_weights(claims, weighting, cap)))


def score_average(
    scores: Sequence[Any], counts: Sequence[Any], weighting: str, cap: float, upper: float = 1.0
) -> tuple[float, list[int]]:
    """Reported scores (accuracies, ROUGE-L...) averaged as `claimed_average` weighs them, and the indices refused.

    A NaN score means 'not computed' and is left out; a score that is no finite number in [0, upper] (1 for
    accuracies and overlaps, infinity for losses), or one over a count that is no positive number, is refused,
    so a site's lie cannot corrupt the average. NaN when no score is kept.
    """
    kept, refused = [], []
    for index, (score, count) in enumerate(zip(scores, counts, strict=True)):
        if isinstance(score, float) and math.isnan(score):
            continue
        number = isinstance(score, (int, float)) and isinstance(count, (int, float))
        if number and math.isfinite(score) and 0.0 <= score <= upper and math.isfinite(count) and count > 0:
            kept.append((score, count))
        else:
            refused.append(index)
    if not kept:
        return math.nan, refused
    values, claims = zip(*kept)
    return claimed_average(values, claims, weighting, cap), refused
