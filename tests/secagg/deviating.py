"""A deviating coordinator, for tests written as the attacker.

Real participants: each node is a deployed site (its own directory with node.key and the pinned
roster.toml) running the real handlers of `participant.secure` over `LocalGrid` (real Flower
messages through protobuf). The coordinator is a `SecAggServer` whose requests the test edits
between stages, as a coordinator that deviates from the protocol would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import SecureSum, secure_sum
from fedlora.config import PrivacySection, SecaggSection
from fedlora.pki import create_node_key, public_key_fingerprint
from fedlora.secagg.identity import Roster, roster_toml
from fedlora.secagg.plan import input_clip_norm, round_context
from fedlora.secagg.server import SecAggServer
from fedlora.secure_wire import STAGE, protocol_content, read_protocol
from participant import secure as participant_secure
from participant.local_config import LOCAL_CONFIG
from participant.site import EVENTS, ROSTER, SITE_KEY
from participant.terms import Terms
from tests.test_participant_policy import site

ROUND = 3
NODE0 = 5000
TERMS = Terms.of(SecaggSection(enabled=True), PrivacySection(), 1.0)  # what every site agreed to (clip_norm 1, no DP)


def make_sites(root: Path, n: int) -> tuple[dict[int, Path], Roster]:
    """n site directories (participant-0 ...), each with a node key, the same pinned roster and a default participant.toml."""
    sites = {}
    for i in range(n):
        sites[i] = root / f"participant-{i}"
        create_node_key(sites[i])
    roster = Roster({f"participant-{i}": public_key_fingerprint(site / "node.pub") for i, site in sites.items()})
    for directory in sites.values():
        (directory / ROSTER).write_text(roster_toml(roster))
        (directory / LOCAL_CONFIG).write_text(site().to_toml())  # a site's own configuration and default policy
    return sites, roster


def events(site: Path, kind: str = "coordinator-blamed") -> list[dict[str, Any]]:
    path = site / EVENTS
    lines = path.read_text().splitlines() if path.is_file() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@dataclass
class Federation:
    """n deployed sites holding round-3 updates, and a coordinator free to edit what it relays."""

    root: Path
    n: int = 5
    d: int = 64
    weight_ref: float = 100.0
    degree: int | None = None  # None: the default graph (complete up to its degree)
    server: SecAggServer = field(init=False)

    def __post_init__(self) -> None:
        self.terms = TERMS if self.degree is None else Terms.of(SecaggSection(enabled=True, degree=self.degree), PrivacySection(), 1.0)
        self.sites, self.roster = make_sites(self.root, self.n)
        self.nodes = {i: NODE0 + i for i in range(self.n)}
        app = ClientApp()
        participant_secure.register(app)
        self.grid = LocalGrid(app, {self.nodes[i]: {SITE_KEY: str(site)} for i, site in self.sites.items()})
        rng = np.random.default_rng(0)
        self.updates = {i: (rng.normal(size=self.d) * 0.05).astype(np.float32) for i in range(self.n)}
        for i, node in self.nodes.items():
            participant_secure.keep_update(self.grid.contexts[node], self.updates[i], 100, ROUND, os.urandom(32), self.terms)
        self.server = SecAggServer(
            "run-x/round-3/bucket-0", list(range(self.n)), self.d + 1, input_clip_norm(1.0),
            context=round_context(ROUND, self.weight_ref), names=[f"participant-{i}" for i in range(self.n)], roster=self.roster,
            degree=self.degree,
        )

    def honest_sum(self, silent: set[tuple[int, str]]) -> SecureSum:
        """An honest coordinator's secure sum over every site; `silent`: (participant, stage) replies lost."""
        members = [Member(node, f"participant-{i}", 100) for i, node in self.nodes.items()]
        self.grid.silent |= {(self.nodes[i], STAGE[stage].message_type) for i, stage in silent}
        sec = SecaggSection(enabled=True, timeout_s=1.0)
        return secure_sum(self.grid, members, sec, server_round=ROUND, length=self.d, run_tag="t", clip_norm=1.0, roster=self.roster)

    def send(self, stage: str, requests: list[Any]) -> dict[int, Message]:
        """Deliver `requests` of `stage`; replies by participant id (errors included)."""
        messages = [
            Message(protocol_content(r, {"server_round": ROUND}), dst_node_id=self.nodes[r.receiver], message_type=STAGE[stage].message_type, group_id=str(ROUND))
            for r in requests
        ]
        by_node = {reply.metadata.src_node_id: reply for reply in self.grid.send_and_receive(messages)}
        ids = {node: i for i, node in self.nodes.items()}
        return {ids[node]: reply for node, reply in by_node.items()}

    def answers(self, stage: str, replies: dict[int, Message]) -> list[Any]:
        """The protocol replies that are not errors."""
        return [read_protocol(r.content, STAGE[stage].reply, i) for i, r in sorted(replies.items()) if not r.has_error()]

    def state(self, i: int) -> dict[str, Any]:
        return dict(self.grid.contexts[self.nodes[i]].state[participant_secure.STATE])
