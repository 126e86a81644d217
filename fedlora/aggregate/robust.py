"""Robust rules (`robust.rule`): the round's units -> one update, bounding what adversaries can do.

A unit is a bucket of participants (DESIGN.md, decision 3); a rule sees each unit's mean update
and weight and returns a float32 vector. Below `min_units()` a rule is refused (`check_rule_fits`):
there it cannot compute, or it tolerates no adversary and would silently be a mean. Breakdown
counts assume attackers' units weigh no more than honest ones: the weighted rules (mean, Multi-Krum's
average, geomedian, centered-clip) break by weight share, and weights are claimed by participants:
hence `robust.weighting = "auto"` weighs every participant once under any rule but the mean.

Math is float64. Distance-based rules (Multi-Krum, geometric median, centred clipping) read all
distances off one n x n Gram matrix of the units centred on their coordinate-wise median (one pass
over column blocks, O(n^2 d)), then iterate over coefficients: v = centre + sum_i a_i (m_i - centre).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedlora.aggregate.mean import weighted_mean

_BLOCK_VALUES = 1 << 20  # float64 values per column block: 8 MiB, whatever the number of units
_EPS = 1e-9  # so that beta * n = 2 is not floored to 1 when 0.2 * 10 rounds below 2


@dataclass(frozen=True)
class SpecForm:
    """One accepted form of a config string: `name`, or `name:<arg>` with a number in a range."""

    name: str
    arg: str | None = None  # the argument's name: then it is required; None: it is refused
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: `low` itself is refused
    high_open: bool = False
    integer: bool = False

    def usage(self) -> str:
        if self.arg is None:
            return self.name
        return f"{self.name}:<{self.arg}> ({self.range_text()})"

    def range_text(self) -> str:
        arg = f"integer {self.arg}" if self.integer else str(self.arg)
        low = f"{self.low:g} {'<' if self.low_open else '<='} " if math.isfinite(self.low) else ""
        high = f" {'<' if self.high_open else '<='} {self.high:g}" if math.isfinite(self.high) else ""
        if low and not high:  # read "f >= 0" rather than "0 <= f"
            return f"{arg} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{low}{arg}{high}" if low or high else f"any {arg}"

    def accepts(self, value: float) -> bool:
        above = value > self.low or (value == self.low and not self.low_open)
        below = value < self.high or (value == self.high and not self.high_open)
        return math.isfinite(value) and above and below and (not self.integer or value == int(value))


def parse_spec(spec: str, forms: Sequence[SpecForm], key: str) -> tuple[str, float | None]:
    """Split `spec` into a known name and its checked argument (an int for integer forms), or
    raise a ValueError naming `key` and `spec` and listing every valid form."""
    name, colon, text = spec.strip().partition(":")
    form = next((f for f in forms if f.name == name), None)
    value: float | None = None
    if form is None:
        problem: str | None = "is not a known name"
    elif form.arg is None:
        problem = f"takes no argument after {name!r}" if colon else None
    elif not colon:
        problem = f"needs <{form.arg}> after '{name}:'"
    else:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        problem = None if form.accepts(value) else f"needs {form.range_text()}, got {text!r}"
    if problem is not None:
        raise ValueError(f"{key}: {spec!r} {problem}; valid forms: {', '.join(f.usage() for f in forms)}")
    return name, int(value) if form and form.integer and value is not None else value


@dataclass
class RuleResult:
    vector: np.ndarray  # float32: the round's update
    metrics: dict[str, Any] = field(default_factory=dict)  # plain JSON-able data


class RobustRule(Protocol):
    name: str  # the canonical spec, e.g. "trimmed-mean:0.2"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult: ...

    def min_units(self) -> int: ...  # fewest units accepted: below, it cannot run or tolerates no adversary

    def breakdown(self, units: int) -> int: ...  # most adversarial units among `units` that it tolerates

    def within(self, units: int) -> RobustRule: ...  # itself with the most tolerance `units` units support, up to its own


def check_rule_fits(rule: RobustRule, units: int) -> None:
    """Refuse a rule for a round of `units` units (buckets) if it needs more."""
    need = rule.min_units()
    if units < need:
        raise ValueError(
            f"robust.rule {rule.name!r} needs at least {need} units per round, got {units}: sample more "
            "participants or use smaller buckets (secagg.bucket_size) to get more units, or choose a rule "
            "that assumes fewer adversaries"
        )


def touched_units(attackers: float, bucket_size: int, units: int) -> float:
    """Expected units holding at least one attacker, when a fraction `attackers` of participants is
    malicious and each unit is a bucket of `bucket_size` drawn at random: 1 - (1 - f)^b of them."""
    return units * (1.0 - (1.0 - attackers) ** max(1, bucket_size))


def capacity_warning(rule: RobustRule, attackers: float, participants: int, bucket_size: int) -> str:
    """Why `rule` over buckets of `bucket_size` (1 = plaintext) among `participants` per round will
    not hold against a fraction `attackers` ('' when it will), and which bucket size would."""
    if attackers <= 0:
        return ""

    def holds(size: int) -> bool:
        units = max(1, participants // size)
        return units >= rule.min_units() and touched_units(attackers, size, units) <= rule.breakdown(units)

    if holds(bucket_size):
        return ""
    units = max(1, participants // bucket_size)
    fits = [size for size in range(2 if bucket_size > 1 else 1, bucket_size) if holds(size)]
    advice = (f"buckets of {fits[-1]} would hold" if fits else
              "no smaller bucket holds it: choose a rule that tolerates more (e.g. median, geomedian), sample more "
              "participants per round" + (", or plaintext updates" if bucket_size > 1 and holds(1) else ""))
    return (
        f"robust.rule {rule.name!r} tolerates {rule.breakdown(units)} adversarial units of {units} per round, but with "
        f"{attackers:.0%} attackers about {touched_units(attackers, bucket_size, units):.1f} units "
        f"{'hold one (1 - (1 - f)^b of buckets of ' + str(bucket_size) + ')' if bucket_size > 1 else 'are attackers'}: {advice}"
    )


def rule_after_screening(rule: RobustRule, kept: int, screened: int) -> tuple[RobustRule, str]:
    """The rule for the `kept` units that screening left, and why it changed ('' if it did not).

    Screening sets aside units that cannot hold only honest, clipped updates, so of the
    adversarial units the rule was sized for (its breakdown over all units) at most
    `breakdown - screened` can remain. When too few units remain for the rule, it runs with the
    most tolerance the kept units support, never less than that remainder: attackers who
    sacrifice units to screening lower the rule's tolerance only by the units they gave up,
    never to the plain mean while it could still drop an outlier. When the kept units cannot
    tolerate what may remain, the rule stays and the round is skipped (too few units).
    """
    if kept >= rule.min_units() or kept == 0 or screened == 0:
        return rule, ""
    remaining = max(0, rule.breakdown(kept + screened) - screened)
    reduced = rule.within(kept)
    if reduced.breakdown(kept) < remaining:
        return rule, ""
    return reduced, (
        f"screening set aside {screened} of {kept + screened} units; at most {remaining} of the {rule.breakdown(kept + screened)} "
        f"adversarial units robust.rule {rule.name!r} tolerates can remain, so the other {kept} are combined by "
        f"{reduced.name!r} (tolerates {reduced.breakdown(kept)})"
    )


def _prepare(rule: RobustRule, means: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Validate the units; return the weights as float64."""
    if len(means) == 0:
        raise ValueError(f"robust.rule {rule.name!r}: no units to aggregate")
    if len(means) != len(weights):
        raise ValueError(f"robust.rule {rule.name!r}: {len(means)} unit means but {len(weights)} weights")
    shape = np.shape(means[0])
    for i, m in enumerate(means):
        if not isinstance(m, np.ndarray) or m.ndim != 1 or m.dtype.kind != "f":
            raise ValueError(f"unit {i}: a mean must be a 1-D float numpy array, got {type(m).__name__} {np.shape(m)}")
        if m.shape != shape:
            raise ValueError(f"unit {i} has length {m.shape[0]} but unit 0 has {shape[0]}")
        if not np.isfinite(m).all():
            raise ValueError(f"unit {i} has non-finite values (nan or inf) in its mean")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(w) & (w > 0)).all():
        raise ValueError(f"unit weights must be finite and > 0, got {w.tolist()}")
    check_rule_fits(rule, len(means))
    return w


def _blocks(means: Sequence[np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
    """Column blocks of the stacked means, float64 of shape (width, n): coordinates x units."""
    d, width = means[0].shape[0], max(1, _BLOCK_VALUES // len(means))
    for lo in range(0, d, width):
        cols = slice(lo, min(lo + width, d))
        yield cols, np.stack([m[cols] for m in means], axis=1, dtype=np.float64)


def _coordinatewise(means: Sequence[np.ndarray], reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty(means[0].shape[0], dtype=np.float32)
    for cols, block in _blocks(means):
        out[cols] = reduce(block)
    return out


def _median(block: np.ndarray) -> np.ndarray:
    """Median of each row; sorting these short rows is faster than np.median's partitions."""
    ranked, n = np.sort(block, axis=1), block.shape[1]
    return 0.5 * (ranked[:, (n - 1) // 2] + ranked[:, n // 2])


def _median_and_gram(means: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The coordinate-wise median c and the Gram matrix of (m_i - c), in one pass.

    Centring on a point inside the honest cluster keeps the distances read off the Gram matrix
    accurate (no cancellation against large norms), and makes identical units give exactly 0.
    """
    centre = np.empty(means[0].shape[0], dtype=np.float64)
    gram = np.zeros((len(means), len(means)))
    for cols, block in _blocks(means):
        centre[cols] = _median(block)
        centred = block - centre[cols, None]
        gram += centred.T @ centred
    return centre, gram


def _combine(means: Sequence[np.ndarray], centre: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """centre + sum_i coef_i (m_i - centre), as float32."""
    out = np.empty(centre.shape[0], dtype=np.float32)
    for cols, block in _blocks(means):
        out[cols] = centre[cols] + (block - centre[cols, None]) @ coef
    return out


def _distances(gram: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """||m_i - v|| for every unit i, where v = centre + sum_j coef_j (m_j - centre)."""
    g = gram @ coef
    return np.sqrt(np.maximum(np.diag(gram) - 2.0 * g + coef @ g, 0.0))


class _HonestMajority:
    """Rules that tolerate any minority of adversarial units; with 2 units they are the mean."""

    def min_units(self) -> int:
        return 3

    def breakdown(self, units: int) -> int:
        return (units - 1) // 2

    def within(self, units: int) -> RobustRule:
        return self if units >= self.min_units() else MeanRule()


class MeanRule:
    """`mean`: the example-weighted mean (FedAvg, McMahan et al., AISTATS 2017); no robustness."""

    name = "mean"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        _prepare(self, means, weights)
        return RuleResult(weighted_mean(means, weights))

    def min_units(self) -> int:
        return 1

    def breakdown(self, units: int) -> int:
        return 0

    def within(self, units: int) -> RobustRule:
        return self


class TrimmedMean:
    """`trimmed-mean:<beta>`: per coordinate, drop the floor(beta n) largest and smallest values
    and average the rest (Yin et al., "Byzantine-robust distributed learning", ICML 2018).

    Unweighted, as in the paper: each unit counts once, whatever its weight. beta = 0 is the
    unweighted mean; for beta > 0, fewer than ceil(1/beta) units would trim nothing.
    """

    def __init__(self, beta: float) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed-mean: beta must be in [0, 0.5), got {beta}")
        self.beta = beta
        self.name = f"trimmed-mean:{beta!r}"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        _prepare(self, means, weights)
        n, k = len(means), self.breakdown(len(means))
        vector = _coordinatewise(means, lambda b: np.sort(b, axis=1)[:, k : n - k].mean(axis=1))
        return RuleResult(vector, {"trimmed_per_side": k})

    def min_units(self) -> int:
        return 1 if self.beta == 0 else math.ceil(1.0 / self.beta - _EPS)

    def breakdown(self, units: int) -> int:
        return math.floor(self.beta * units + _EPS)

    def within(self, units: int) -> RobustRule:
        return self  # floor(beta n) per side adapts to the units it gets


class CoordinateMedian(_HonestMajority):
    """`median`: the coordinate-wise median (Yin et al., ICML 2018); unweighted, as in the paper."""

    name = "median"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        _prepare(self, means, weights)
        return RuleResult(_coordinatewise(means, _median))


class MultiKrum:
    """`multi-krum:<f>`: Blanchard et al., "Machine learning with adversaries: Byzantine tolerant
    gradient descent", NeurIPS 2017.

    Each unit scores the sum of its squared distances to its n - f - 2 nearest other units; the
    m = n - f best-scoring units (scores computed once, ties to the lower index) are averaged
    with their weights. The paper's guarantee needs n >= 2f + 3.
    """

    def __init__(self, f: int) -> None:
        if f < 0:
            raise ValueError(f"multi-krum: f must be >= 0, got {f}")
        self.f = f
        self.name = f"multi-krum:{f}"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        _prepare(self, means, weights)
        n = len(means)
        _, gram = _median_and_gram(means)
        sq = np.diag(gram)
        dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
        np.fill_diagonal(dist2, np.inf)
        scores = np.sort(dist2, axis=1)[:, : n - self.f - 2].sum(axis=1)
        selected = sorted(int(i) for i in np.argsort(scores, kind="stable")[: n - self.f])
        vector = weighted_mean([means[i] for i in selected], [weights[i] for i in selected])
        return RuleResult(vector, {"selected": selected, "dropped": sorted(set(range(n)) - set(selected))})

    def min_units(self) -> int:
        return 2 * self.f + 3

    def breakdown(self, units: int) -> int:
        return self.f

    def within(self, units: int) -> RobustRule:
        if units < 3:
            return MeanRule()
        f = min(self.f, (units - 3) // 2)  # the guarantee needs n >= 2f + 3
        return self if f == self.f else MultiKrum(f)


class GeometricMedian(_HonestMajority):
    """`geomedian`: the weighted geometric median, argmin_v sum_i w_i ||m_i - v||, by smoothed
    Weiszfeld iterations (RFA: Pillutla, Kakade & Harchaoui, "Robust aggregation for federated
    learning", IEEE TSP 2022).

    Each step reweights unit i by w_i / max(nu, ||m_i - v||). As in RFA it starts from the weighted
    mean (not from the coordinate-wise median: started on a unit, the step stays stuck there) and
    stops once an iteration lowers the objective by less than `tol` relative to it.
    """

    name = "geomedian"
    nu = 1e-6
    max_iterations = 100
    tol = 1e-7

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        w = _prepare(self, means, weights)
        centre, gram = _median_and_gram(means)
        coef = w / w.sum()
        dist = _distances(gram, coef)
        objective, converged, iterations = float(w @ dist), False, 0
        while not converged and iterations < self.max_iterations:
            beta = w / np.maximum(dist, self.nu)
            coef = beta / beta.sum()
            dist = _distances(gram, coef)
            previous, objective = objective, float(w @ dist)
            converged, iterations = previous - objective <= self.tol * objective, iterations + 1
        return RuleResult(_combine(means, centre, coef), {"iterations": iterations, "converged": bool(converged)})


class CenteredClip(_HonestMajority):
    """`centered-clip:<tau>`: centred clipping (Karimireddy, He & Jaggi, "Learning from history for
    Byzantine robust optimization", ICML 2021), weighted.

    v <- v + sum_i w_i clip_tau(m_i - v) / sum_i w_i, `iterations` times, where clip_tau scales a
    vector down to norm tau. The paper starts from the previous round's aggregate (momentum);
    rules here keep no state, so v starts from the coordinate-wise median, itself robust.
    Breakdown: fewer than half the units, the bound of the paper's analysis (with bucketing).
    """

    iterations = 3

    def __init__(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"centered-clip: tau must be > 0, got {tau}")
        self.tau = tau
        self.name = f"centered-clip:{tau!r}"

    def aggregate(self, means: Sequence[np.ndarray], weights: Sequence[float]) -> RuleResult:
        w = _prepare(self, means, weights)
        centre, gram = _median_and_gram(means)
        coef = np.zeros(len(means))
        for _ in range(self.iterations):
            dist = _distances(gram, coef)
            scale = np.divide(self.tau, dist, out=np.ones_like(dist), where=dist > self.tau)
            step = w * scale
            coef = coef + (step - step.sum() * coef) / w.sum()
        clipped = [int(i) for i in np.flatnonzero(dist > self.tau)]  # in the last iteration
        return RuleResult(_combine(means, centre, coef), {"iterations": self.iterations, "clipped": clipped})


RULE_FORMS = (
    SpecForm("mean"),
    SpecForm("trimmed-mean", "beta", low=0.0, high=0.5, high_open=True),
    SpecForm("median"),
    SpecForm("multi-krum", "f", low=0, integer=True),
    SpecForm("geomedian"),
    SpecForm("centered-clip", "tau", low=0.0, low_open=True),
)
_BUILDERS: dict[str, Callable[..., RobustRule]] = {
    "mean": MeanRule,
    "trimmed-mean": TrimmedMean,
    "median": CoordinateMedian,
    "multi-krum": MultiKrum,
    "geomedian": GeometricMedian,
    "centered-clip": CenteredClip,
}


def make_rule(spec: str) -> RobustRule:
    """Turn `robust.rule` ("median", "trimmed-mean:0.2", "multi-krum:2", ...) into a rule."""
    name, value = parse_spec(spec, RULE_FORMS, "robust.rule")
    return _BUILDERS[name]() if value is None else _BUILDERS[name](value)
