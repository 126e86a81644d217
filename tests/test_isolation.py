"""Isolation (issue 23): a member of a set-aside secure bucket is blamed by name, its honest partners summed.

Secure sums run over Flower messages (`coordinator.local_grid.LocalGrid`) with the real participant
handlers; privacy figures are checked against dp_accounting events built here
(tests/test_privacy_views.py), never against our own accountant.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.isolation import MESSAGE_TYPE, isolate_set_aside, isolation_request
from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator, exchange
from coordinator.secure import gather_secure
from fedlora.aggregate.screen import noise_norm_bound
from fedlora.config import ConfigError, PrivacySection, SecaggSection, load_config
from fedlora.privacy.ledger import Charge, Ledger, combined_noise_multiplier, present_noise_multiplier
from fedlora.privacy.user_level import UserLevelDP
from fedlora.secagg import clip
from fedlora.secagg.plan import RunBinding
from fedlora.wire import config_sha256, reply_content
from participant import ledger as site_ledger
from participant import secure as participant_secure
from participant.app import app as participant_app
from participant.isolation import isolation_refusals
from participant.masked import MASKED_FILE, remember_isolated
from participant.site import EVENTS
from participant.terms import Terms
from tests.conftest import SMALL
from tests.test_privacy_views import _sites, gaussian, rdp, sampled

D = 20_000
Z, Q = 1.0, 0.5
ROUND = 3


def _round(dirs: list[Path | None], attacker: int, isolation_rounds: int = 1, tag: str = "run-0"):
    """A secure round of len(dirs) members in buckets of 2 under distributed DP; `attacker` masks an input
    100 x the noise's reach past the clip bound (C = 1). Returns the grid, the gathered units, the updates."""
    app = ClientApp()
    participant_secure.register(app)
    nodes = [9000 + i for i in range(len(dirs))]
    grid = LocalGrid(app, {node: ({"participant-dir": str(d)} if d else {}) for node, d in zip(nodes, dirs)})
    binding = RunBinding(config_sha256(tag), "")
    sec = SecaggSection(enabled=True, bucket_size=2, timeout_s=1.0, isolation_rounds=isolation_rounds)
    privacy = PrivacySection(noise_multiplier=Z, dropout_margin=0.0)
    terms = Terms.of(sec, privacy, 1.0, binding)
    rng = np.random.default_rng(7)
    updates = {}
    for i, node in enumerate(nodes):
        direction = rng.normal(size=D)
        norm = 100 * noise_norm_bound(Z * math.sqrt(2), D) if i == attacker else 0.5
        updates[f"participant-{i}"] = (direction / np.linalg.norm(direction) * norm).astype(np.float32)
        participant_secure.keep_update(
            grid.contexts[node], updates[f"participant-{i}"], 10, ROUND, os.urandom(32), terms, adversary=i == attacker, sample_rate=Q,
        )
    members = [Member(node, f"participant-{i}", 10) for i, node in enumerate(nodes)]
    gathered = gather_secure(grid, members, sec, ROUND, D, tag, 1.0, privacy=privacy, binding=binding)
    assert all(bucket["status"] == "ok" for bucket in gathered.row["secagg"]["buckets"])
    return grid, gathered, updates


def _isolate(grid: LocalGrid, gathered) -> dict[str, float]:
    def send(nodes, content):
        return exchange(grid, nodes, content, MESSAGE_TYPE, ROUND, 1.0)

    return isolate_set_aside(gathered, D, 1.0, Z * 1.0, send, ROUND)


def _partner(gathered, name: str) -> str:
    (bucket,) = [b["members"] for b in gathered.row["secagg"]["buckets"] if name in b["members"]]
    return next(member for member in bucket if member != name)


def test_the_cheating_member_is_blamed_by_name_and_its_honest_partner_is_still_summed() -> None:
    grid, gathered, updates = _round([None] * 4, attacker=0)
    partner = _partner(gathered, "participant-0")
    other_bucket = next(u for u in gathered.units if "participant-0" not in u.members)
    released = _isolate(grid, gathered)
    assert released == {"participant-0": Z, partner: Z}  # both released; the coordinator saw both alone
    (report,) = gathered.row["secagg"]["isolated"]
    assert "exceeds robust.clip_norm" in report["set_aside"]
    assert set(report["blamed"]) == {"participant-0"} and report["summed"] == [partner]
    assert gathered.blamed == ["participant-0"]
    assert [r.participant for r in gathered.skipped if r.fault] == ["participant-0"]
    # The honest partner is a unit of one, the untouched bucket stays; the cheater is in no unit.
    assert sorted(u.members for u in gathered.units) == sorted([other_bucket.members, (partner,)])
    assert {m.name for m in gathered.included} == {"participant-1", "participant-2", "participant-3"}
    # The partner's release is its clipped update plus noise of std z C of its own (drawn fresh, mean 0).
    (single,) = [u for u in gathered.units if u.members == (partner,)]
    noise = single.mean - clip(updates[partner].astype(np.float64), 1.0)
    assert np.std(noise) == pytest.approx(Z * 1.0, rel=0.03) and abs(np.mean(noise)) < 5 * Z / math.sqrt(D)
    assert single.noise_std == Z and single.weight == 1.0
    # Asked again for the same round, it refuses: it released once (participant/masked.py keeps the record).
    node = next(m.node for m in gathered.included if m.name == partner)
    (reply,) = exchange(grid, [node], isolation_request(ROUND), MESSAGE_TYPE, ROUND, 1.0).values()
    assert reply.has_error() and "it already released its round-3 input alone" in reply.error.reason


def test_a_malformed_release_is_blamed_on_its_sender_not_taken_for_a_refusal() -> None:
    grid, gathered, _ = _round([None] * 4, attacker=0)
    partner = _partner(gathered, "participant-0")

    def send(nodes, content):  # the attacker answers with a vector of the wrong length
        replies = exchange(grid, nodes, content, MESSAGE_TYPE, ROUND, 1.0)
        node = next(m.node for m in gathered.included if m.name == "participant-0")
        replies[node] = Message(reply_content({}, np.zeros(3, dtype=np.float32)), reply_to=replies[node])
        return replies

    isolate_set_aside(gathered, D, 1.0, Z * 1.0, send, ROUND)
    (report,) = gathered.row["secagg"]["isolated"]
    assert "expected (20000,)" in report["blamed"]["participant-0"] and report["summed"] == [partner]
    assert gathered.blamed == ["participant-0"] and "not_released" not in report


def test_a_run_that_plans_no_isolation_gets_refusals_and_blames_nobody() -> None:
    grid, gathered, _ = _round([None] * 4, attacker=0, isolation_rounds=0)
    partner = _partner(gathered, "participant-0")
    assert _isolate(grid, gathered) == {}
    (report,) = gathered.row["secagg"]["isolated"]
    assert "blamed" not in report and report["summed"] == []
    assert all("refused" in why and "secagg.isolation_rounds" in why for why in report["not_released"].values())
    assert {"participant-0", partner}.isdisjoint(m.name for m in gathered.included) and gathered.blamed == []
    assert not any(r.fault for r in gathered.skipped)


def test_a_deployed_site_releases_alone_only_by_its_policy_and_charges_its_ledger_first(tmp_path: Path) -> None:
    dirs = _sites(tmp_path / "allow", 4, allow_isolation=True)
    grid, gathered, _ = _round(dirs, attacker=0)
    partner = _partner(gathered, "participant-0")
    site = dirs[int(partner.rsplit("-", 1)[1])]
    assert set(_isolate(grid, gathered)) == {"participant-0", partner}
    # Seen in the bucket's sum (all 2 shares: z) and alone (z): once at z / sqrt(2), in both views.
    both = combined_noise_multiplier(present_noise_multiplier(Z, 2, 2, 0.0), Z)
    assert both == pytest.approx(Z / math.sqrt(2))
    report = site_ledger.site_status(site)
    assert report["contributions"] == 1
    assert report["epsilon"] == pytest.approx(rdp([sampled(Q, both)]), rel=1e-9)
    assert report["epsilon_coordinator"] == pytest.approx(rdp([gaussian(both)]), rel=1e-9)
    events = [json.loads(line) for line in (site / EVENTS).read_text().splitlines()]
    assert any(e["event"] == "isolated-release" and e["round"] == ROUND for e in events)
    assert json.loads((site / MASKED_FILE).read_text())["isolated"] == [f"{config_sha256('run-0')}/{ROUND}"]
    # A site whose policy does not allow it refuses, naming the rule; its ledger keeps the bucket's charge alone.
    dirs = _sites(tmp_path / "deny", 4)
    grid, gathered, _ = _round(dirs, attacker=0, tag="run-1")
    partner = _partner(gathered, "participant-0")
    site = dirs[int(partner.rsplit("-", 1)[1])]
    _isolate(grid, gathered)
    (report,) = gathered.row["secagg"]["isolated"]
    assert "policy.allow_isolation" in report["not_released"][partner] and partner not in report.get("blamed", {})
    assert site_ledger.site_status(site)["epsilon_coordinator"] == pytest.approx(rdp([gaussian(Z)]), rel=1e-9)


def test_the_first_k_rounds_are_charged_at_z_over_sqrt_2_whether_or_not_they_isolate() -> None:
    overrides = [*SMALL, "federation.participants=4", f"federation.fraction={Q}", f"privacy.noise_multiplier={Z}", "privacy.delta=1e-5",
                 "secagg.enabled=true", "secagg.isolation_rounds=2", "federation.rounds=30"]
    dp = UserLevelDP(load_config(None, overrides))
    for server_round in (1, 2, 3):
        spent = dp.spend(server_round, {})
    assert spent["epsilon"] == pytest.approx(rdp([sampled(Q, Z / math.sqrt(2))] * 2 + [sampled(Q, Z)]), rel=1e-9)
    # The plan keeps room for the reserve: fewer rounds fit a budget than without it.
    budget = rdp([sampled(Q, Z)] * 10) + 1e-9
    plain = UserLevelDP(load_config(None, [o for o in overrides if "isolation" not in o] + [f"privacy.epsilon_budget={budget}"]))
    reserved = UserLevelDP(load_config(None, [*overrides, f"privacy.epsilon_budget={budget}"]))
    assert plain.planned == 10 and reserved.planned < 10
    assert rdp([sampled(Q, Z / math.sqrt(2))] * 2 + [sampled(Q, Z)] * (reserved.planned - 2)) <= budget
    assert rdp([sampled(Q, Z / math.sqrt(2))] * 2 + [sampled(Q, Z)] * (reserved.planned - 1)) > budget
    # At most K rounds isolate, across a resumption too.
    dp.isolations_used = 2
    assert not dp.may_isolate()
    resumed = UserLevelDP(load_config(None, overrides))
    resumed.load_state_dict(dp.state_dict())
    assert not resumed.may_isolate()


def test_a_site_releases_alone_in_at_most_the_rounds_the_run_accounts_for() -> None:
    sha = config_sha256("run-cap")
    held = ConfigRecord({"server_round": 4, "config_sha256": sha, "isolation_rounds": 1, "noise_multiplier": Z})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert isolation_refusals(context, held, 4) == {}
    remember_isolated(None, context.state, sha, 3)  # released alone in round 3 of this run
    assert "the 1 the run accounts for" in isolation_refusals(context, held, 4)["secagg.isolation_rounds"]
    remember_isolated(None, context.state, config_sha256("another run"), 3)
    assert isolation_refusals(context, ConfigRecord({**held, "config_sha256": config_sha256("another run")}), 4)


def test_the_coordinator_isolates_in_no_more_rounds_than_accounted() -> None:
    grid, gathered, _ = _round([None] * 4, attacker=0)
    units = list(gathered.units)
    cfg = load_config(None, [*SMALL, "federation.participants=4", "secagg.enabled=true", "privacy.noise_multiplier=1.0", "secagg.isolation_rounds=1"])
    dp = UserLevelDP(cfg)
    dp.isolations_used = 1
    coordinator = SimpleNamespace(cfg=cfg, dp=dp)  # Coordinator.isolate returns before it needs anything else
    assert Coordinator.isolate(coordinator, gathered, ROUND) == {} and gathered.units == units


def test_a_second_release_replaces_a_charge_only_by_a_costlier_one() -> None:
    assert combined_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert combined_noise_multiplier(2.0, 0.0) == 0.0  # a release in the clear
    ledger = Ledger(1e-5)
    ledger.charge("r", Charge(Q, Z, Z))
    assert not ledger.charge("r", Charge(Q, Z, 2 * Z), costlier=True)  # less costly: kept
    assert ledger.charge("r", Charge(Q, Z / math.sqrt(2), Z / math.sqrt(2)), costlier=True)
    assert ledger.epsilons()[1] == pytest.approx(rdp([gaussian(Z / math.sqrt(2))]), rel=1e-9)


def test_isolation_needs_secure_aggregation_with_distributed_dp() -> None:
    with pytest.raises(ConfigError, match="secagg.isolation_rounds"):
        load_config(None, [*SMALL, "secagg.enabled=true", "secagg.isolation_rounds=1"])
    with pytest.raises(ConfigError, match="secagg.isolation_rounds"):
        load_config(None, [*SMALL, "privacy.noise_multiplier=1.0", "secagg.isolation_rounds=1"])
    with pytest.raises(ConfigError, match="secagg.isolation_rounds"):
        load_config(None, [*SMALL, "secagg.enabled=true", "privacy.noise_multiplier=1.0", "secagg.isolation_rounds=-1"])


def test_a_federation_under_distributed_dp_blames_the_attacker_and_its_robust_rule_sums_the_partner(tmp_path: Path) -> None:
    cfg = load_config(None, [
        *SMALL, "federation.participants=6", "federation.fraction=1.0", "federation.rounds=1", "federation.min_participants=2",
        "secagg.enabled=true", "secagg.bucket_size=2", "secagg.isolation_rounds=1", "privacy.noise_multiplier=1.0",
        "simulation.adversaries=0.17", "simulation.attack=scaling:100000", "robust.rule=geomedian",
    ])
    grid = LocalGrid(participant_app, {p + 1: {"partition-id": p, "num-partitions": 6} for p in range(6)})
    run = Coordinator(cfg, tmp_path)
    (row,) = [r for r in run.run(grid) if r["round"] == 1]
    (attacker,) = [f"participant-{p}" for p in run.adversaries]
    (report,) = row["secagg"]["isolated"]
    assert set(report["blamed"]) == {attacker} and len(report["summed"]) == 1
    assert row["applied"] and row["participants"] == 5 and row["secagg"]["isolation_rounds_used"] == 1
    # The rule runs over the noisy units (post-processing: examples/dp-robust-secure.toml's combination):
    # the two untouched buckets and the partner's release.
    assert row["robust"]["rule"] == "geomedian" and len(row["bucket_updates"]) == 3
    assert any(s["participant"] == attacker and "blamed by name" in s["reason"] for s in row["skipped"])
    assert row["epsilon"] == pytest.approx(rdp([sampled(1.0, 1.0 / math.sqrt(2))]), rel=1e-9)
    # Against the coordinator the partner is charged both releases it saw: its bucket's sum and its own.
    (partner,) = report["summed"]
    (bucket,) = [b for b in row["secagg"]["buckets"] if partner in b["members"]]
    both = combined_noise_multiplier(bucket["noise_multiplier"], 1.0)
    assert run.dp.coordinator_epsilons()[partner] == pytest.approx(rdp([gaussian(both)]), rel=1e-9)
