"""User-level DP of a run, as the coordinator applies it: Poisson sampling, the noisy estimate,
and the accountant that decides whether another round fits the budget.

The subsampled-Gaussian analysis holds only if each participant takes part in a round
independently with probability q (`federation.fraction`): `sample` draws exactly that, from
secret randomness, so nobody can tell from the seed who took part. Each round is accounted
once its sums are gathered, whether or not it is applied: a round that is skipped later
(too few replies) has already released who was asked, and a conservative count costs little.

Two views (fedlora.privacy.ledger): `epsilon` is against adapter consumers, every round charged
at (q, z); it holds because the secure gatherer discards a bucket whose present noise fell below
z (docs/decisions.md, "Charging the noise that was present"). `epsilon_coordinator` is against
the coordinator: per site, the rounds it contributed to, unamplified, each at the noise of what
the coordinator saw (0 under central DP, which shows it the update); the row carries the worst site.

Isolation (`secagg.isolation_rounds` = K): in a round where a set-aside bucket's members each send
their update again alone, with noise z C of their own, those members are released twice at z,
i.e. once at z / sqrt(2). Whether a round needs it depends on what the round released, so the
choice is adaptive; charging the first K rounds at z / sqrt(2) and allowing isolation in at most K
rounds bounds every run's privacy loss by the same fixed composition, whichever rounds use it (an
RDP filter with a fixed budget: Feldman & Zrnic, "Individual Privacy Accounting via a Renyi
Filter", NeurIPS 2021).
"""

from __future__ import annotations

import math
from typing import Any

from fedlora.config import Config
from fedlora.privacy.accountant import RoundAccountant, largest_fitting
from fedlora.privacy.ledger import Charge, Ledger
from fedlora.privacy.noise import NoisySum, secret_rng


class UserLevelDP:
    def __init__(self, cfg: Config) -> None:
        p, fed = cfg.privacy, cfg.federation
        self.sample_rate, self.noise_multiplier = fed.fraction, p.noise_multiplier
        self.budget = p.epsilon_budget
        self.accountant = RoundAccountant(p.delta)
        self.sites: dict[str, Ledger] = {}  # against the coordinator: each site's contributions
        self._site_epsilon: dict[tuple[float, ...], float] = {}  # sites with the same charges, computed once
        # Distributed DP (secure aggregation): the participants add the noise before masking.
        central_std = 0.0 if cfg.secagg.enabled else p.noise_multiplier * cfg.robust.clip_norm
        self.noisy = NoisySum(cfg.robust.clip_norm, central_std, fed.fraction * fed.participants)
        self.rng = secret_rng()
        self.isolation_rounds = cfg.secagg.isolation_rounds  # K: the rounds charged as isolated, used or not
        self.isolations_used = 0  # rounds that isolated a bucket's members: at most K
        self.planned = self._rounds_in_budget(fed.rounds) if self.budget else fed.rounds

    def round_noise_multiplier(self, rounds_before: int) -> float:
        """The noise multiplier round `rounds_before + 1` is charged at: z / sqrt(2) among the first K (module docstring)."""
        return self.noise_multiplier / math.sqrt(2.0) if rounds_before < self.isolation_rounds else self.noise_multiplier

    def _rounds_in_budget(self, limit: int) -> int:
        """How many of `limit` rounds fit the budget, the first K charged as isolated."""
        def fits(rounds: int) -> bool:
            probe = RoundAccountant(self.accountant.delta)
            for before in range(rounds):
                probe.compose(self.sample_rate, self.round_noise_multiplier(before))
            return probe.epsilon() <= self.budget

        return largest_fitting(limit, fits)

    def may_isolate(self) -> bool:
        """Whether this round may still isolate a set-aside bucket's members (fewer than K rounds did)."""
        return self.isolations_used < self.isolation_rounds

    def sample(self, nodes: list[int]) -> list[int]:
        """Poisson sampling: each node independently with probability q (possibly none)."""
        return [node for node, draw in zip(nodes, self.rng.random(len(nodes))) if draw < self.sample_rate]

    def stop_reason(self) -> str:
        """Why the next round may not run ('' if it may): it would take epsilon past the budget."""
        if not self.budget:
            return ""
        after = self.accountant.epsilon_after(self.sample_rate, self.round_noise_multiplier(self.accountant.rounds))
        if after <= self.budget:
            return ""
        return (
            f"privacy budget: round {self.accountant.rounds + 1} would take epsilon from {self.accountant.epsilon():.3f} to "
            f"{after:.3f}, past privacy.epsilon_budget={self.budget:g} (delta={self.accountant.delta:g})"
        )

    def spend(self, server_round: int, contributed: dict[str, float]) -> dict[str, Any]:
        """Account one round; the metrics row's privacy fields.

        `contributed`: each site whose update reached the coordinator in this round, with the
        noise multiplier of what the coordinator saw it in (both of its releases, for a member isolated
        this round: `combined_noise_multiplier`).
        """
        charged = self.round_noise_multiplier(self.accountant.rounds)
        self.accountant.compose(self.sample_rate, charged)
        for name, seen in contributed.items():
            charge = Charge(self.sample_rate, charged, seen)
            self.sites.setdefault(name, Ledger(self.accountant.delta)).charge(f"round-{server_round}", charge)
        return {
            "epsilon": self.accountant.epsilon(),
            "epsilon_pld": self.accountant.epsilon_pld(),
            "epsilon_coordinator": max(self.coordinator_epsilons().values(), default=0.0),
            "delta": self.accountant.delta,
        }

    def coordinator_epsilons(self) -> dict[str, float]:
        """Each site's epsilon against the coordinator so far (unamplified, rounds it contributed to)."""
        out = {}
        for name, ledger in self.sites.items():
            key = tuple(sorted(c.coordinator_noise_multiplier for c in ledger.entries.values()))
            if key not in self._site_epsilon:
                self._site_epsilon[key] = ledger.epsilons()[1]
            out[name] = self._site_epsilon[key]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(), "sites": {name: ledger.state_dict() for name, ledger in sorted(self.sites.items())},
            "isolations_used": self.isolations_used,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.isolations_used = int(state.get("isolations_used", 0))  # absent in checkpoints before isolation
        self.sites = {}
        for name, ledger_state in state.get("sites", {}).items():  # absent in checkpoints before the coordinator view
            self.sites[name] = Ledger(self.accountant.delta)
            self.sites[name].load_state_dict(ledger_state)

