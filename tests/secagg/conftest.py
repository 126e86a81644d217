"""Stage-by-stage driver for adversarial SecAgg tests (tamper between stages)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from fedlora.secagg import participant as part
from fedlora.secagg.identity import simulated_identity
from fedlora.secagg.fixedpoint import clip, decode
from fedlora.secagg.server import SecAggServer


@dataclass
class Round:
    """One in-process instance; each method runs one stage for every live participant."""

    n: int = 5
    d: int = 64
    degree: int | None = None
    threshold: int | None = None
    wire_bits: int = 32
    server: SecAggServer = field(init=False)
    states: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = SecAggServer(
            "round-7/bucket-0",
            list(range(self.n)),
            self.d,
            1.0,
            degree=self.degree,
            threshold=self.threshold,
            graph_seed=3,
            wire_bits=self.wire_bits,
        )
        self.identities = {i: simulated_identity(name, self.server.names) for i, name in zip(self.server.ids, self.server.names)}
        rng = np.random.default_rng(0)
        self.vectors = {i: rng.normal(size=self.d).astype(np.float32) * 0.05 for i in range(self.n)}

    def adverts(self, setups=None):
        out = []
        self.setups = self.server.setup() if setups is None else setups
        for req in self.setups:
            self.states[req.receiver], advert = part.setup(req, self.identities[req.receiver])
            out.append(advert)
        return out

    def uploads(self, key_relays):
        out = []
        for req in key_relays:
            self.states[req.receiver], upload = part.share_keys(self.states[req.receiver], req, self.identities[req.receiver])
            out.append(upload)
        return out

    def masked(self, share_relays):
        out = []
        for req in share_relays:
            self.states[req.receiver], y = part.mask_input(
                self.states[req.receiver], req, self.vectors[req.receiver]
            )
            out.append(y)
        return out

    def signatures(self, asks):
        out = []
        for req in asks:
            self.states[req.receiver], sig = part.sign_survivors(self.states[req.receiver], req, self.identities[req.receiver])
            out.append(sig)
        return out

    def asks(self, masked):
        """Collect masked inputs, run the consistency check honestly: the unmask requests."""
        return self.server.collect_signatures(self.signatures(self.server.collect_masked(masked)))

    def responses(self, asks):
        out = []
        for req in asks:
            self.states[req.receiver], resp = part.unmask(self.states[req.receiver], req, self.identities[req.receiver])
            out.append(resp)
        return out

    def finish(self, key_relays):
        """Run the remaining stages honestly from the key relays; return the SumResult."""
        relays = self.server.collect_shares(self.uploads(key_relays))
        asks = self.asks(self.masked(relays))
        return self.server.collect_unmask(self.responses(asks))

    def check_sum(self, result, members):
        """Assert the result is the sum of exactly `members`' clipped vectors."""
        assert result.survivors == sorted(members)
        expected = sum(clip(self.vectors[i], 1.0) for i in members)
        assert np.max(np.abs(decode(result.sum_u32, result.scale, np.float64) - expected)) <= result.error_bound

    def to_share_relays(self):
        return self.server.collect_shares(self.uploads(self.server.collect_keys(self.adverts())))

    def to_unmask(self):
        return self.asks(self.masked(self.to_share_relays()))


@pytest.fixture
def make_round():
    return Round
