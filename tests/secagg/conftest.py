"""Stage-by-stage driver for adversarial SecAgg tests (tamper between stages)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from fedlora.secagg import participant as part
from fedlora.secagg.server import SecAggServer


@dataclass
class Round:
    """One in-process instance; each method runs one stage for every live participant."""

    n: int = 5
    d: int = 64
    degree: int | None = None
    threshold: int | None = None
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
        )
        rng = np.random.default_rng(0)
        self.vectors = {i: rng.normal(size=self.d).astype(np.float32) * 0.05 for i in range(self.n)}

    def adverts(self):
        out = []
        for req in self.server.setup():
            self.states[req.receiver], advert = part.setup(req)
            out.append(advert)
        return out

    def uploads(self, key_relays):
        out = []
        for req in key_relays:
            self.states[req.receiver], upload = part.share_keys(self.states[req.receiver], req)
            out.append(upload)
        return out

    def masked(self, share_relays):
        out = []
        for req in share_relays:
            rng = np.random.default_rng(req.receiver)
            self.states[req.receiver], y = part.mask_input(
                self.states[req.receiver], req, self.vectors[req.receiver], rng
            )
            out.append(y)
        return out

    def responses(self, asks):
        out = []
        for req in asks:
            self.states[req.receiver], resp = part.unmask(self.states[req.receiver], req)
            out.append(resp)
        return out

    def to_share_relays(self):
        return self.server.collect_shares(self.uploads(self.server.collect_keys(self.adverts())))

    def to_unmask(self):
        return self.server.collect_masked(self.masked(self.to_share_relays()))


@pytest.fixture
def make_round():
    return Round
