"""User-level privacy accounting for DP-FedAvg, delegated to Google's `dp_accounting`.

One round samples each participant with probability q (Poisson) and adds Gaussian noise of
std z * clip_norm to the sum of clipped updates, so a round is the Poisson-subsampled Gaussian
mechanism on participants and the epsilon below is per participant (user-level), not per example.
The state is a plain list of [q, z, rounds] so a checkpoint can store it as JSON and a resumed
run accounts exactly as an uninterrupted one. RDP orders are dp_accounting's defaults.
"""

from __future__ import annotations

import math
from numbers import Integral
from collections.abc import Callable
from typing import Any

import dp_accounting

_MAX_NOISE = 1e4  # noise_for_budget gives up above this noise multiplier
_NOISE_REL_TOL = 1e-3  # noise_for_budget's relative precision


def _check_delta(delta: float) -> float:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_round(q: float, z: float, rounds: int) -> tuple[float, float, int]:
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
    if not (z >= 0 and math.isfinite(z)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    _check_int("rounds", rounds, 1)
    return float(q), float(z), int(rounds)


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_budget(epsilon_budget: float) -> float:
    if not (epsilon_budget > 0 and math.isfinite(epsilon_budget)):
        raise ValueError(f"epsilon_budget must be a finite number > 0, got {epsilon_budget!r}")
    return float(epsilon_budget)


PLD_INTERVAL = 1e-4  # dp_accounting's default discretisation of privacy losses
PLD_GRID_POINTS = 1e8  # the most grid points a PLD epsilon may ask for (about 1 GB of float64)


class RoundAccountant:
    """Epsilon spent by DP-FedAvg rounds so far; the whole state is `delta` and `history`."""

    def __init__(self, delta: float) -> None:
        self.delta = _check_delta(delta)
        self.history: list[list[Any]] = []  # [[q, z, rounds], ...], consecutive duplicates merged

    @property
    def rounds(self) -> int:
        """Total rounds composed (resumed runs included)."""
        return sum(n for _, _, n in self.history)

    def compose(self, sample_rate: float, noise_multiplier: float, rounds: int = 1) -> None:
        """Record `rounds` rounds at participant sampling rate q and noise multiplier z."""
        q, z, n = _check_round(sample_rate, noise_multiplier, rounds)
        if self.history and self.history[-1][0] == q and self.history[-1][1] == z:
            self.history[-1][2] += n  # merged, so one-at-a-time and all-at-once give one event
        else:
            self.history.append([q, z, n])

    def dp_event(self) -> dp_accounting.DpEvent:
        """The composed history as one dp_accounting event (what both accountants are fed)."""
        poisson = dp_accounting.PoissonSampledDpEvent
        return dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(poisson(q, dp_accounting.GaussianDpEvent(z)), n)
                for q, z, n in self.history
            ]
        )

    def _epsilon(self, accountant: dp_accounting.PrivacyAccountant) -> float:
        if not self.history:
            return 0.0
        if any(z == 0 for _, z, _ in self.history):
            return math.inf  # a round without noise has no DP guarantee
        return float(accountant.compose(self.dp_event()).get_epsilon(self.delta))

    def epsilon(self) -> float:
        """Epsilon at `delta` by RDP (the figure budgets are checked against)."""
        return self._epsilon(dp_accounting.rdp.RdpAccountant())

    def epsilon_pld(self) -> float:
        """Epsilon at `delta` by privacy loss distributions: tighter, reported beside RDP's.

        The PLD grid spans privacy losses up to about 1/(2 z^2) in steps of dp_accounting's
        discretisation interval, so a tiny z (a smoke test's 1e-6) would ask for ~1e15 points and
        end the run with a MemoryError; past `PLD_GRID_POINTS` the PLD epsilon is not computed and
        reported as inf (RDP's, which has no grid, still says how little privacy is left)."""
        smallest = min((z for _, z, _ in self.history if z > 0), default=math.inf)
        if 1.0 / (2 * smallest**2 * PLD_INTERVAL) > PLD_GRID_POINTS:
            return math.inf
        return self._epsilon(dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL))

    def epsilon_after(self, sample_rate: float, noise_multiplier: float, rounds: int = 1) -> float:
        """RDP epsilon if `rounds` more rounds were composed; this accountant is left unchanged."""
        probe = RoundAccountant(self.delta)
        probe.load_state_dict(self.state_dict())
        probe.compose(sample_rate, noise_multiplier, rounds)
        return probe.epsilon()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: {"delta": float, "history": [[q, z, rounds], ...]}."""
        return {"delta": self.delta, "history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the state with `state`, validated so that a bad checkpoint fails loudly."""
        if not isinstance(state, dict) or "delta" not in state or "history" not in state:
            raise ValueError("state must be a dict with keys 'delta' and 'history'")
        delta = _check_delta(state["delta"])
        fresh = RoundAccountant(delta)
        for entry in state["history"]:
            if len(entry) != 3:
                raise ValueError(f"history entries must be [q, z, rounds], got {entry!r}")
            fresh.compose(*entry)
        self.delta, self.history = fresh.delta, fresh.history


def _epsilon_for(sample_rate: float, noise_multiplier: float, rounds: int, delta: float) -> float:
    return RoundAccountant(delta).epsilon_after(sample_rate, noise_multiplier, rounds)


def rounds_within_budget(
    sample_rate: float, noise_multiplier: float, delta: float, epsilon_budget: float, limit: int
) -> int:
    """Largest r <= limit whose RDP epsilon stays <= epsilon_budget (0 if one round is too many)."""
    _check_round(sample_rate, noise_multiplier, 1)
    _check_delta(delta)
    budget = _check_budget(epsilon_budget)
    _check_int("limit", limit, 0)

    return largest_fitting(limit, lambda r: r == 0 or _epsilon_for(sample_rate, noise_multiplier, r, delta) <= budget)


def largest_fitting(limit: int, fits: Callable[[int], bool]) -> int:
    """Largest r <= limit with fits(r), for a `fits` that is monotone (epsilon grows with r); fits(0) is assumed."""
    if fits(limit):
        return int(limit)
    lo, hi = 0, int(limit)  # invariant: fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def noise_for_budget(sample_rate: float, rounds: int, delta: float, epsilon_budget: float) -> float:
    """Smallest noise multiplier (0.1% precision, rounded up) fitting `rounds` rounds in budget."""
    _check_round(sample_rate, 1.0, rounds)
    _check_delta(delta)
    budget = _check_budget(epsilon_budget)

    def fits(z: float) -> bool:
        return _epsilon_for(sample_rate, z, rounds, delta) <= budget

    if not fits(_MAX_NOISE):
        raise ValueError(
            f"epsilon_budget {budget} is out of reach for {rounds} rounds at sample_rate "
            f"{sample_rate} with any noise_multiplier below {_MAX_NOISE:g}"
        )
    hi = 1.0
    while not fits(hi):
        hi = min(hi * 2, _MAX_NOISE)
    lo = hi / 2
    while fits(lo):  # epsilon -> inf as z -> 0, so this stops
        hi, lo = lo, lo / 2
    while hi / lo > 1 + _NOISE_REL_TOL:  # invariant: fits(hi), not fits(lo); bisect on a log scale
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
