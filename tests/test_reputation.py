"""Participants rejected too often are quarantined; revoked ones are never asked and never heard."""

from pathlib import Path

import numpy as np
import pytest

from coordinator.gather import Gathered, Member
from coordinator.rounds import Coordinator
from fedlora.aggregate import Unit
from fedlora.config import ConfigError, load_config
from fedlora.reputation import Reputation
from tests.conftest import SMALL


def test_a_participant_rejected_in_m_of_its_last_w_rounds_is_quarantined() -> None:
    rep = Reputation(after=2, window=3)
    everyone = ["a", "b", "c"]
    assert rep.record(1, everyone, ["a"]) == []
    assert rep.record(2, everyone, []) == []
    assert rep.record(3, everyone, ["a", "b"]) == ["a"]  # a: 2 faults in its last 3 rounds
    assert rep.record(4, everyone, []) == []  # b: 1 fault in the window
    assert rep.record(5, everyone, ["b"]) == ["b"]  # b: rounds 3 and 5 in its last 3
    assert sorted(rep.quarantined) == ["a", "b"] and rep.history["c"] == [False] * 3


def test_faults_slide_out_of_the_window() -> None:
    rep = Reputation(after=2, window=2)
    rep.record(1, ["a"], ["a"])
    rep.record(2, ["a"], [])
    assert rep.record(3, ["a"], ["a"]) == []  # the round-1 fault has left the 2-round window
    assert rep.record(4, ["a"], ["a"]) == ["a"]


def test_quarantine_state_survives_a_checkpoint() -> None:
    rep = Reputation(after=1, window=4)
    rep.record(1, ["a", "b"], ["b"])
    again = Reputation(after=1, window=4)
    again.load_state_dict(rep.state_dict())
    assert again.quarantined == rep.quarantined and again.history == rep.history


def test_impossible_quarantine_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="robust.quarantine_after"):
        load_config(None, ["robust.quarantine_after=6", "robust.quarantine_window=5"])


def test_revoked_and_quarantined_participants_are_excluded_from_sampling_and_replies(tmp_path: Path) -> None:
    cfg = load_config(None, SMALL + ["federation.participants=5", "lora.mode=frozen-a", "robust.revoked=participant-1", "robust.quarantine_after=1"])
    coordinator = Coordinator(cfg, tmp_path)
    assert coordinator.excluded("participant-1").startswith("revoked")
    assert coordinator.excluded("participant-2") == ""
    length = coordinator.server_length
    members = [Member(i, f"participant-{i}", 10, {"train_loss": 1.0}) for i in (0, 2, 3, 4)]
    rng = np.random.default_rng(0)
    units = [Unit((m.name,), rng.normal(size=length) * 1e-3, 10.0) for m in members[:3]]
    units.append(Unit(("participant-4",), np.full(length, np.nan), 10.0))
    gathered = Gathered(units, members, [])
    coordinator.apply(1, 4, gathered)
    faulty = [r.participant for r in gathered.skipped if r.fault]
    assert faulty == ["participant-4"]
    assert coordinator.reputation.record(1, [m.name for m in members], faulty) == ["participant-4"]
    assert coordinator.excluded("participant-4").startswith("quarantined")
    coordinator.names = {100 + i: f"participant-{i}" for i in range(5)}
    assert coordinator.eligible(list(coordinator.names)) == [100, 102, 103]  # 1 revoked, 4 quarantined
