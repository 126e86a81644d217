"""User-level DP of a run, as the coordinator applies it: Poisson sampling, the noisy estimate,
and the accountant that decides whether another round fits the budget.

The subsampled-Gaussian analysis holds only if each participant takes part in a round
independently with probability q (`federation.fraction`): `sample` draws exactly that, from
secret randomness, so nobody can tell from the seed who took part. Each round is accounted
when its participants are drawn, whether or not it is applied: a round that is skipped later
(too few replies) has already released who was asked, and a conservative count costs little.
"""

from __future__ import annotations

from typing import Any

from fedlora.config import Config
from fedlora.privacy.accountant import RoundAccountant, rounds_within_budget
from fedlora.privacy.noise import NoisySum, secret_rng


class UserLevelDP:
    def __init__(self, cfg: Config) -> None:
        p, fed = cfg.privacy, cfg.federation
        self.sample_rate, self.noise_multiplier = fed.fraction, p.noise_multiplier
        self.budget = p.epsilon_budget
        self.accountant = RoundAccountant(p.delta)
        # Distributed DP (secure aggregation): the participants add the noise before masking.
        central_std = 0.0 if cfg.secagg.enabled else p.noise_multiplier * cfg.robust.clip_norm
        self.noisy = NoisySum(cfg.robust.clip_norm, central_std, fed.fraction * fed.participants)
        self.rng = secret_rng()
        self.planned = rounds_within_budget(fed.fraction, p.noise_multiplier, p.delta, p.epsilon_budget, fed.rounds) if self.budget else fed.rounds

    def sample(self, nodes: list[int]) -> list[int]:
        """Poisson sampling: each node independently with probability q (possibly none)."""
        return [node for node, draw in zip(nodes, self.rng.random(len(nodes))) if draw < self.sample_rate]

    def stop_reason(self) -> str:
        """Why the next round may not run ('' if it may): it would take epsilon past the budget."""
        if not self.budget:
            return ""
        after = self.accountant.epsilon_after(self.sample_rate, self.noise_multiplier)
        if after <= self.budget:
            return ""
        return (
            f"privacy budget: round {self.accountant.rounds + 1} would take epsilon from {self.accountant.epsilon():.3f} to "
            f"{after:.3f}, past privacy.epsilon_budget={self.budget:g} (delta={self.accountant.delta:g})"
        )

    def spend(self) -> dict[str, Any]:
        """Account one round; the metrics row's privacy fields."""
        self.accountant.compose(self.sample_rate, self.noise_multiplier)
        return {"epsilon": self.accountant.epsilon(), "epsilon_pld": self.accountant.epsilon_pld(), "delta": self.accountant.delta}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])

