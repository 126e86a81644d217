"""Epsilon in two views, per contribution: against adapter consumers and against the coordinator.

A released sum is the Gaussian mechanism on each contributor's clipped update (Skellam noise is
accounted as its Gaussian of equal variance: Agarwal, Kairouz & Liu, NeurIPS 2021). Two parties
see it differently (DESIGN decision 9):

- *consumers* of the adapter do not know who was sampled, so each round is Poisson-subsampled
  at rate q and amplified (Abadi et al., CCS 2016; Mironov, Talwar & Zhang 2019);
- the *coordinator* knows who was sampled, so only the rounds a party actually contributed to
  count, each without amplification (q = 1), at the noise of the sum it was in.

`Ledger` keeps one entry per contribution, keyed (by run, round and instance) so that charging
the same contribution twice, as a retried message would, changes nothing. Both epsilons are
dp_accounting's RDP composition (`RoundAccountant`); the state is plain JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedlora.privacy.accountant import RoundAccountant

# Relative slack when comparing a bucket's present noise with the planned one: sqrt(s / (k (1 - m)))
# is 1 up to float rounding when exactly k (1 - m) shares arrived.
_NOISE_REL_TOL = 1e-9


def present_noise_multiplier(noise_multiplier: float, members: int, masked: int, dropout_margin: float) -> float:
    """Noise multiplier of a distributed-DP sum that holds `masked` of the `members` noise shares.

    Each share has variance (z Delta)^2 / (k (1 - m)) (`fedlora.privacy.noise.skellam_mu`) and
    variances add, so s shares give z sqrt(s / (k (1 - m))) Delta: below z once more than the
    margin's share of members took their noise with them before masking.
    """
    if not (noise_multiplier >= 0 and 1 <= members and 0 <= masked <= members and 0 <= dropout_margin < 1):
        raise ValueError(
            f"need noise_multiplier >= 0, 0 <= masked <= members, members >= 1 and 0 <= dropout_margin < 1; got "
            f"{noise_multiplier}, masked {masked} of {members}, margin {dropout_margin}"
        )
    return noise_multiplier * math.sqrt(masked / (members * (1.0 - dropout_margin)))


def combined_noise_multiplier(*multipliers: float) -> float:
    """The one Gaussian release as private as independent releases of the same sum at these noise multipliers.

    n releases of x with noise of std z_i Delta each tell as much about x as their precision-weighted
    mean, whose noise has std Delta / sqrt(sum 1 / z_i^2): twice at z is once at z / sqrt(2). A 0
    (a release in the clear) makes the whole 0.
    """
    if not multipliers or min(multipliers) < 0:
        raise ValueError(f"need one or more noise multipliers >= 0, got {multipliers}")
    if min(multipliers) == 0:
        return 0.0
    return 1.0 / math.sqrt(sum(1.0 / z**2 for z in multipliers))


def meets(present: float, planned: float) -> bool:
    """Whether a sum's present noise multiplier is at least the planned one (float rounding aside)."""
    return present >= planned * (1.0 - _NOISE_REL_TOL)


@dataclass(frozen=True)
class Charge:
    """One contribution: sampling rate q, and the noise multiplier against consumers and the coordinator."""

    sample_rate: float
    noise_multiplier: float  # of what consumers see (0: un-noised)
    coordinator_noise_multiplier: float  # of what the coordinator saw (0 under central DP: it saw the update)

    def as_list(self) -> list[float]:
        return [self.sample_rate, self.noise_multiplier, self.coordinator_noise_multiplier]


class Ledger:
    """Contributions of one party, keyed; epsilon against consumers and against the coordinator."""

    def __init__(self, delta: float) -> None:
        self.delta = RoundAccountant(delta).delta  # validated
        self.entries: dict[str, Charge] = {}

    def charge(self, key: str, charge: Charge, *, raise_only: bool = False, costlier: bool = False) -> bool:
        """Record `charge` under `key`; False (and no change) if `key` is charged already.

        `raise_only`: replace an existing entry if `charge` has more noise in both views (a bound
        refined once more is known), never less. `costlier`: replace it if `charge` has less noise in
        both views (the same contribution released once more: `combined_noise_multiplier`), never more.
        """
        old = self.entries.get(key)
        if old is not None:
            more = charge.noise_multiplier >= old.noise_multiplier and charge.coordinator_noise_multiplier >= old.coordinator_noise_multiplier
            less = charge.noise_multiplier <= old.noise_multiplier and charge.coordinator_noise_multiplier <= old.coordinator_noise_multiplier
            if charge == old or charge.sample_rate != old.sample_rate or not ((raise_only and more) or (costlier and less)):
                return False
        RoundAccountant(self.delta).compose(charge.sample_rate, charge.noise_multiplier)  # validates
        RoundAccountant(self.delta).compose(1.0, charge.coordinator_noise_multiplier)
        self.entries[key] = charge
        return True

    def _accountants(self, extra: Charge | None = None) -> tuple[RoundAccountant, RoundAccountant]:
        consumers, coordinator = RoundAccountant(self.delta), RoundAccountant(self.delta)
        for charge in [*self.entries.values(), *([extra] if extra else [])]:
            consumers.compose(charge.sample_rate, charge.noise_multiplier)
            coordinator.compose(1.0, charge.coordinator_noise_multiplier)
        return consumers, coordinator

    def epsilons(self, extra: Charge | None = None) -> tuple[float, float]:
        """(against consumers, against the coordinator), RDP at `delta`; with `extra` charged too."""
        consumers, coordinator = self._accountants(extra)
        return consumers.epsilon(), coordinator.epsilon()

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "entries": {key: charge.as_list() for key, charge in sorted(self.entries.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "delta" not in state or not isinstance(state.get("entries"), dict):
            raise ValueError("a ledger state must be a dict with 'delta' and 'entries' ({key: [q, z, z_coordinator]})")
        fresh = Ledger(state["delta"])
        for key, entry in state["entries"].items():
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError(f"ledger entry {key!r} must be [q, z, z_coordinator], got {entry!r}")
            fresh.charge(str(key), Charge(*(float(x) for x in entry)))
        self.delta, self.entries = fresh.delta, fresh.entries
