"""Issue 22, attacks not listed in the issue, written as the attacker against the real participant handlers.

Each test below is a deviation a coordinator (alone, or with members colluding with it) could try
beyond the four of the issue. Where the defence held from the start the test is a regression
test; where it did not, the fix is named in the test's comment (and in docs/secagg-mutations.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import secure_sum
from flwr.clientapp import ClientApp
from fedlora.config import PrivacySection, SecaggSection
from fedlora.secagg.plan import RunBinding
from fedlora.wire import config_sha256
from participant import ledger as site_ledger
from participant import secure as participant_secure
from participant.terms import Terms
from tests.test_privacy_views import DELTA, _sites, gaussian, rdp, sampled

D = 2_000


def _secure_round_named(dirs: list[Path], z: float, q: float, config: str, server_round: int, run_tag: str):
    """One honest secure sum of the run configuration `config`, but under an instance id the coordinator
    chooses (`run_tag`/round-r/bucket-0): nothing makes it derive the id from the run."""
    app = ClientApp()
    participant_secure.register(app)
    nodes = [7100 + i for i in range(len(dirs))]
    grid = LocalGrid(app, {node: {"participant-dir": str(d)} for node, d in zip(nodes, dirs)})
    rng = np.random.default_rng(server_round)
    binding = RunBinding(config_sha256(config), "")
    privacy = PrivacySection(noise_multiplier=z, dropout_margin=0.1)
    terms = Terms.of(SecaggSection(enabled=True), privacy, 1.0, binding)
    for node in nodes:
        participant_secure.keep_update(grid.contexts[node], (rng.normal(size=D) * 0.01).astype(np.float32), 10, server_round,
                                       os.urandom(32), terms, sample_rate=q)
    members = [Member(node, f"participant-{i}", 10) for i, node in enumerate(nodes)]
    return secure_sum(grid, members, SecaggSection(enabled=True, timeout_s=1.0), server_round=server_round, length=D,
                      run_tag=run_tag, clip_norm=1.0, privacy=privacy, binding=binding)


def test_an_instance_id_reused_across_runs_does_not_make_the_ledger_forget_contributions(tmp_path: Path) -> None:
    # The ledger keyed a secure contribution by the instance id, which the coordinator names: one id
    # for every run (or round) and each site's ledger held a single entry, however often it masked,
    # so policy.max_epsilon never bit. Fixed: the key is the run round the site computes itself
    # (configuration sha256, round), of which masked.json lets it mask one input, ever.
    dirs = _sites(tmp_path, 3)
    runs = [(1.0, 0.5), (2.0, 0.2), (1.0, 0.5)]
    for number, (z, q) in enumerate(runs):
        result = _secure_round_named(dirs, z, q, f"run-{number}", 1, "same")
        assert result.layout[0]["status"] == "ok"
    expected_consumers = rdp([sampled(q, z) for z, q in runs])
    expected_coordinator = rdp([gaussian(z / np.sqrt(0.9)) for z, _ in runs])
    for directory in dirs:
        report = site_ledger.site_status(directory)
        assert report["contributions"] == 3
        assert report["epsilon"] >= expected_consumers * (1 - 1e-9)
        assert report["epsilon_coordinator"] >= expected_coordinator * (1 - 1e-9)
