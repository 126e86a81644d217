"""Epsilon where privacy is spent: the noise actually present, two views, and each site's own ledger.

Every figure is checked against an independent dp_accounting computation built here from
DpEvents (never against our own accountant), on real secure sums over Flower messages
(`coordinator.local_grid.LocalGrid`) with real participant handlers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import secure_sum, seen_noise
from fedlora.config import PrivacySection, SecaggSection, load_config
from fedlora.privacy.ledger import Charge, Ledger, present_noise_multiplier
from fedlora.privacy.user_level import UserLevelDP
from fedlora.secagg.plan import RunBinding
from fedlora.wire import config_sha256
from fedlora.secure_wire import STAGE
from participant import ledger as site_ledger
from participant import secure as participant_secure
from participant.local_config import LOCAL_CONFIG
from participant.site import EVENTS, Refusal
from participant.terms import Terms
from tests.conftest import SMALL
from tests.secagg.deviating import make_sites
from tests.test_participant_policy import site

DELTA = 1e-5
D = 2_000


def rdp(events: list[dp_accounting.DpEvent]) -> float:
    """Independent reference: dp_accounting's RDP accountant over the composed events."""
    return dp_accounting.rdp.RdpAccountant().compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(DELTA)


def gaussian(z: float) -> dp_accounting.DpEvent:
    return dp_accounting.GaussianDpEvent(z)


def sampled(q: float, z: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(q, gaussian(z))


def _dp(q: float, z: float) -> UserLevelDP:
    cfg = load_config(None, [*SMALL, "federation.participants=4", f"federation.fraction={q}", f"privacy.noise_multiplier={z}", f"privacy.delta={DELTA}"])
    return UserLevelDP(cfg)


def _sites(tmp_path: Path, n: int, **policy: float) -> list[Path]:
    """n deployed sites (participant-0 ...: node key, pinned roster) with this policy."""
    sites, _ = make_sites(tmp_path, n)
    for directory in sites.values():
        (directory / LOCAL_CONFIG).write_text(site(**policy).to_toml())
    return list(sites.values())


def _deaf_at_unmask() -> ClientApp:
    def lost(msg, context):
        raise ConnectionError("the unmask request never arrived")

    app = ClientApp()
    handlers = dict(participant_secure.HANDLERS)
    participant_secure.HANDLERS["unmask"] = lost
    try:
        participant_secure.register(app)
    finally:
        participant_secure.HANDLERS.update(handlers)
    return app


def _secure_round(
    dirs: list[Path | None], z: float, q: float, margin: float, server_round: int, tag: str,
    silent_before_mask: int | None = None, deaf_at_unmask: int | None = None,
):
    """One secure sum of len(dirs) members holding updates, each deployed in its own directory (None: simulated)."""
    app = ClientApp()
    participant_secure.register(app)
    nodes = [7000 + i for i in range(len(dirs))]
    deaf = _deaf_at_unmask()  # never runs the unmask handler: as if the request never reached it
    grid = LocalGrid(lambda node: deaf if deaf_at_unmask is not None and node == nodes[deaf_at_unmask] else app,
                     {node: ({"participant-dir": str(d)} if d else {}) for node, d in zip(nodes, dirs)})
    rng = np.random.default_rng(server_round)
    binding = RunBinding(config_sha256(tag), "")  # each run its own configuration: a round is masked once per run
    terms = Terms.of(SecaggSection(enabled=True), PrivacySection(noise_multiplier=z, dropout_margin=margin), 1.0, binding)
    for node in nodes:
        participant_secure.keep_update(
            grid.contexts[node], (rng.normal(size=D) * 0.01).astype(np.float32), 10, server_round, os.urandom(32), terms, sample_rate=q,
        )
    if silent_before_mask is not None:
        grid.silent.add((nodes[silent_before_mask], STAGE["share_keys"].message_type))
    members = [Member(node, f"participant-{i}", 10) for i, node in enumerate(nodes)]
    privacy = PrivacySection(noise_multiplier=z, dropout_margin=margin)
    return secure_sum(grid, members, SecaggSection(enabled=True, timeout_s=1.0), server_round=server_round, length=D,
                      run_tag=tag, clip_norm=1.0, privacy=privacy, binding=binding)


# --- the noise actually present ------------------------------------------------------------

def test_a_loss_before_masking_is_charged_at_the_noise_present_and_its_sum_never_reaches_the_adapter() -> None:
    q, z = 0.5, 1.192
    result = _secure_round([None] * 3, z, q, 0.0, 3, "t", silent_before_mask=1)
    (bucket,) = result.layout
    assert bucket["status"] == "discarded" and not result.buckets  # the adapter gets nothing below z
    present = z * math.sqrt(2 / 3)
    seen = seen_noise(result.layout)
    assert seen == pytest.approx({"participant-0": present, "participant-2": present})
    dp = _dp(q, z)
    rows = [dp.spend(r, seen if r == 3 else {name: z for name in seen}) for r in range(1, 9)]
    # Against the coordinator, who decoded the under-noised sum: 7 rounds at z and one at the noise present.
    assert rows[-1]["epsilon_coordinator"] == pytest.approx(rdp([gaussian(z)] * 7 + [gaussian(present)]), rel=1e-9)
    # Against consumers: every round at (q, z), as the adapter only ever held sums at z (the 7.99, not 8.40).
    assert rows[-1]["epsilon"] == pytest.approx(rdp([sampled(q, z)] * 8), rel=1e-9)
    assert rows[-1]["epsilon"] == pytest.approx(7.99, abs=0.01)
    assert rdp([sampled(q, z)] * 7 + [sampled(q, present)]) == pytest.approx(8.40, abs=0.01)  # had it been kept


def test_present_noise_follows_the_shares_in_the_sum() -> None:
    assert present_noise_multiplier(1.0, 10, 9, 0.1) == pytest.approx(1.0)  # the margin covers one loss in ten
    assert present_noise_multiplier(1.0, 10, 10, 0.1) == pytest.approx(1 / math.sqrt(0.9))
    assert present_noise_multiplier(2.0, 4, 2, 0.0) == pytest.approx(2.0 / math.sqrt(2))
    with pytest.raises(ValueError, match="masked 5 of 4"):
        present_noise_multiplier(1.0, 4, 5, 0.0)


# --- the view against the coordinator ------------------------------------------------------

def test_the_coordinator_view_is_the_unamplified_composition_of_the_rounds_each_site_was_in() -> None:
    q, z = 0.3, 1.5
    dp = _dp(q, z)
    took_part = {"a": [1, 2, 3, 4, 5], "b": [2, 5]}
    for r in range(1, 6):
        row = dp.spend(r, {name: z for name, rounds in took_part.items() if r in rounds})
    assert dp.coordinator_epsilons() == pytest.approx({"a": rdp([gaussian(z)] * 5), "b": rdp([gaussian(z)] * 2)}, rel=1e-9)
    assert row["epsilon_coordinator"] == pytest.approx(rdp([gaussian(z)] * 5), rel=1e-9)  # the worst site
    assert row["epsilon"] == pytest.approx(rdp([sampled(q, z)] * 5), rel=1e-9)
    assert row["epsilon"] < row["epsilon_coordinator"]
    resumed = _dp(q, z)
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert resumed.coordinator_epsilons() == dp.coordinator_epsilons()


def test_central_dp_shows_the_coordinator_each_update_so_its_view_is_infinite() -> None:
    dp = _dp(0.5, 1.0)
    assert dp.spend(1, {"a": 0.0})["epsilon_coordinator"] == math.inf


# --- each site's own ledger ----------------------------------------------------------------

def test_a_sites_ledger_composes_three_runs_and_charges_a_retry_once(tmp_path: Path) -> None:
    dirs = _sites(tmp_path, 3)
    runs = [(1.0, 0.5), (2.0, 0.2), (1.0, 0.5)]  # (z, q) of three runs over the same records
    for number, (z, q) in enumerate(runs):
        result = _secure_round(dirs, z, q, 0.1, 1, f"run-{number}")
        assert result.layout[0]["status"] == "ok"
    # Every member masked and was told so at unmask: against the coordinator, z / sqrt(1 - m).
    expected_consumers = rdp([sampled(q, z) for z, q in runs])
    expected_coordinator = rdp([gaussian(z / math.sqrt(0.9)) for z, _ in runs])
    for directory in dirs:
        report = site_ledger.site_status(directory)
        assert report["contributions"] == 3
        assert report["epsilon"] == pytest.approx(expected_consumers, rel=1e-9)
        assert report["epsilon_coordinator"] == pytest.approx(expected_coordinator, rel=1e-9)
    # A retried charge of a contribution already in the ledger changes nothing.
    before = (dirs[0] / site_ledger.LEDGER).read_text()
    key = next(iter(json.loads(before)["entries"]))
    site_ledger.record_charge(dirs[0], key, Charge(0.5, 0.1, 0.1))
    assert (dirs[0] / site_ledger.LEDGER).read_text() == before


def test_a_site_that_masked_is_charged_even_if_it_never_hears_of_unmask(tmp_path: Path) -> None:
    dirs = _sites(tmp_path, 3)
    result = _secure_round(dirs, 1.0, 0.5, 0.1, 1, "run-0", deaf_at_unmask=0)
    assert [r["participant"] for r in result.recovered] == ["participant-0"]  # its masked input is in the sum
    # Charged before its masked input left, at the fewest shares the instance can unmask (threshold 2 of 3).
    worst = present_noise_multiplier(1.0, 3, 2, 0.1)
    report = site_ledger.site_status(dirs[0])
    assert report["contributions"] == 1 and report["epsilon_coordinator"] == pytest.approx(rdp([gaussian(worst)]), rel=1e-9)


def test_a_site_charges_the_fewest_shares_the_instance_can_unmask_until_told_more() -> None:
    ledger = Ledger(DELTA)
    worst = Charge(0.5, 1.0, present_noise_multiplier(1.0, 5, 3, 0.0))
    assert ledger.charge("i", worst)
    assert not ledger.charge("i", Charge(0.5, 1.0, 0.1), raise_only=True)  # never lowered
    assert ledger.charge("i", Charge(0.5, 1.0, 1.0), raise_only=True)  # raised once survivors are known
    assert ledger.epsilons()[1] == pytest.approx(rdp([gaussian(1.0)]), rel=1e-9)


def test_a_site_refuses_a_round_past_its_max_epsilon_and_logs_it(tmp_path: Path) -> None:
    # Set up, a site charges the fewest shares the instance can unmask (threshold 2 of 3); room for one such.
    limit = rdp([gaussian(present_noise_multiplier(1.0, 3, 2, 0.1))]) * (1 + 1e-6)
    dirs = _sites(tmp_path, 3, max_epsilon_coordinator=limit)
    assert _secure_round(dirs, 1.0, 0.5, 0.1, 1, "run-0").layout[0]["status"] == "ok"
    result = _secure_round(dirs, 1.0, 0.5, 0.1, 2, "run-1")
    assert not result.buckets and all("policy.max_epsilon_coordinator" in r.reason for r in result.skipped)
    for directory in dirs:
        logged = [json.loads(line) for line in (directory / EVENTS).read_text().splitlines()]
        assert [(e["event"], e["round"]) for e in logged] == [("contributed", 1), ("refused", 2)]
        assert "privacy ledger" in logged[1]["reason"] and logged[1]["rules"] == ["policy.max_epsilon_coordinator"]
        assert site_ledger.site_status(directory)["contributions"] == 1  # the refused round is not charged
    one = sampled(0.5, 1.0)
    consumers = _sites(tmp_path / "consumers", 1, max_epsilon=(rdp([one]) + rdp([one, one])) / 2)[0]
    site_ledger.record_charge(consumers, "run-1/round-1", Charge(0.5, 1.0, 0.0))
    with pytest.raises(Refusal, match="policy.max_epsilon=.*against adapter consumers"):
        site_ledger.check_charge(consumers, Charge(0.5, 1.0, 0.0), "round 2", round=2)
