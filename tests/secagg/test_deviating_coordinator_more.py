"""Issue 22, attacks not listed in the issue, written as the attacker against the real participant handlers.

Each test below is a deviation a coordinator (alone, or with members colluding with it) could try
beyond the four of the issue. Where the defence held from the start the test is a regression
test; where it did not, the fix is named in the test's comment (and in docs/secagg-mutations.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import secure_sum
from fedlora.config import PrivacySection, SecaggSection
from fedlora.secagg.messages import UnmaskRequest
from fedlora.secagg.participant import open_bundle, x_coord
from fedlora.secagg.plan import RunBinding, input_clip_norm, round_context
from fedlora.secagg.server import SecAggServer
from fedlora.secure_wire import STAGE, protocol_content
from fedlora.wire import adapter_sha256, config_sha256
from participant import app as participant_app
from participant import ledger as site_ledger
from participant import secure as participant_secure
from participant.local_config import (
    LOCAL_CONFIG,
    LocalConfig,
    LocalDataSection,
    LocalModelSection,
    PolicySection,
    SiteSection,
)
from participant.terms import Terms
from tests.secagg import test_deviating_coordinator_setup as setup_tests
from tests.secagg.deviating import Federation, events
from tests.test_privacy_views import _sites, gaussian, rdp, sampled

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


# --- accusations provoked by the relay ---------------------------------------------------------

TARGET = 0


def _garble(relay, what: str):
    """The target's bundle in `relay` as the coordinator edits it: garbled ciphertext, or another commitment."""
    at = relay.senders.index(TARGET)
    field = "ciphertexts" if what == "ciphertext" else "b_share_commitments"
    values = list(getattr(relay, field))
    values[at] = bytes(len(values[at]))
    return dataclasses.replace(relay, **{field: values})


@pytest.mark.parametrize("what", ["ciphertext", "commitment"])
def test_bundles_garbled_by_the_relay_do_not_hand_the_coordinator_the_targets_secrets(tmp_path: Path, what: str) -> None:
    # An accuser reveals its receiving key for the accused so that the coordinator can judge the
    # accusation: "one share of each of the accused's secrets, below the threshold". But the
    # coordinator itself could garble the target's bundle (or its commitment) to *every* neighbour:
    # each accused the target and revealed its key, and the coordinator opened the genuine bundles
    # it kept: t shares of the target's self-mask seed and of its masking key, so its masked input
    # was an open book (both secrets recovered exactly, nobody blaming the coordinator). Fixed: each
    # bundle and its commitments are signed by their dealer (`identity.bundle_statement`); a
    # receiver accuses only a signed bundle, and blames the coordinator for an unsigned one.
    fed = Federation(tmp_path, n=5)
    relays = fed.server.collect_keys(fed.answers("setup", fed.send("setup", fed.server.setup())))
    uploads = fed.answers("share_keys", fed.send("share_keys", relays))
    (upload,) = [u for u in uploads if u.sender == TARGET]
    genuine = dict(zip(upload.receivers, zip(upload.ciphertexts, upload.b_share_commitments, upload.s_share_commitments)))
    shares = fed.server.collect_shares(uploads)
    replies = fed.send("mask_input", [_garble(r, what) if TARGET in r.senders else r for r in shares])
    masked = fed.answers("mask_input", replies)
    b_shares, s_shares = {}, {}
    for y in masked:  # what the coordinator can open with the receiving keys revealed to it
        if TARGET in y.accused:
            blob, b_commit, s_commit = genuine[y.sender]
            key = y.revealed_keys[y.accused.index(TARGET)]
            b_shares[x_coord(y.sender)], s_shares[x_coord(y.sender)] = open_bundle(
                fed.server.params, key, blob, TARGET, y.sender, fed.server.s_publics[TARGET], b_commit, s_commit)
    assert not b_shares and not s_shares  # not one share of the target's secrets
    for i in upload.receivers:  # each neighbour refused, blaming the coordinator with the relayed bundle as evidence
        assert replies[i].has_error() and "did not sign" in replies[i].error.reason
        (blame,) = events(fed.sites[i])
        assert blame["evidence"]["owner"] == TARGET and fed.state(i)["stage"] == "aborted"
    assert not events(fed.sites[TARGET])  # the target is blamed by nobody


def test_a_dealer_that_does_not_sign_its_bundles_is_blamed_by_the_checking_server_not_the_relay(tmp_path: Path) -> None:
    # A malicious member that leaves its bundles unsigned would make its honest neighbours blame the
    # coordinator; the honest server checks every bundle signature first, blames the dealer and
    # relays nothing of it. The rest of the bucket completes, with nobody blaming anyone.
    fed = Federation(tmp_path, n=5)
    relays = fed.server.collect_keys(fed.answers("setup", fed.send("setup", fed.server.setup())))
    uploads = fed.answers("share_keys", fed.send("share_keys", relays))
    uploads = [dataclasses.replace(u, signatures=[bytes(64)] * len(u.signatures)) if u.sender == 2 else u for u in uploads]
    shares = fed.server.collect_shares(uploads)
    assert list(fed.server.blamed) == [2] and "not signed by its identity" in fed.server.blamed[2]
    assert all(2 not in r.senders for r in shares)
    masked = fed.answers("mask_input", fed.send("mask_input", shares))
    assert sorted(y.sender for y in masked) == [0, 1, 3, 4] and not any(y.accused for y in masked)
    assert not any(events(site) for site in fed.sites.values())


def test_an_honest_run_with_signed_bundles_completes_with_dropouts(tmp_path: Path) -> None:
    fed = Federation(tmp_path, n=5)
    result = fed.honest_sum({(2, "mask_input"), (4, "unmask")})
    (unit,) = result.buckets
    assert sorted(unit.members) == ["participant-0", "participant-1", "participant-3", "participant-4"]
    assert not any(events(site) for site in fed.sites.values())


def test_a_target_set_up_twice_in_one_instance_cannot_be_made_to_deal_into_an_accusation(tmp_path: Path) -> None:
    # A setup request sent again for the same instance is answered with fresh keys under the same
    # parameter digest, so every signature of the first setup still verifies. The coordinator
    # relays the target's first keys to its neighbours, sets the target up again, has it deal its
    # new secrets to the same neighbour keys, and hands each neighbour the new bundle: sealed under
    # another masking key, it cannot open, and an accusation would reveal the receiving key that
    # opens it. The bundle signature binds both keys: each neighbour blames the coordinator instead.
    fed = Federation(tmp_path, n=5)
    setups = fed.server.setup()
    relays = fed.server.collect_keys(fed.answers("setup", fed.send("setup", setups)))
    uploads = fed.answers("share_keys", fed.send("share_keys", relays))
    shares = fed.server.collect_shares(uploads)
    fed.send("setup", [s for s in setups if s.receiver == TARGET])  # the target's second set of keys
    (again,) = fed.answers("share_keys", fed.send("share_keys", [r for r in relays if r.receiver == TARGET]))
    second = {j: (c, b, s, sig) for j, c, b, s, sig in zip(
        again.receivers, again.ciphertexts, again.b_share_commitments, again.s_share_commitments, again.signatures)}

    def second_bundle(relay):
        at = relay.senders.index(TARGET)
        c, b, s, sig = second[relay.receiver]
        swap = lambda field, value: [*getattr(relay, field)[:at], value, *getattr(relay, field)[at + 1:]]
        return dataclasses.replace(relay, ciphertexts=swap("ciphertexts", c), b_share_commitments=swap("b_share_commitments", b),
                                   s_share_commitments=swap("s_share_commitments", s), signatures=swap("signatures", sig))

    replies = fed.send("mask_input", [second_bundle(r) for r in shares if r.receiver != TARGET])
    for i in again.receivers:
        assert replies[i].has_error() and "did not sign" in replies[i].error.reason  # no accusation, no key revealed
        (blame,) = events(fed.sites[i])
        assert blame["evidence"]["owner"] == TARGET


# --- replays and malformed setups that held ----------------------------------------------------


def test_a_setup_naming_a_member_twice_is_refused(tmp_path: Path) -> None:
    # The recipient listed twice (so that it counts twice toward the member count and the majority),
    # or a name given to two ids: refused before any key is made.
    fed = Federation(tmp_path, n=4)
    setups = fed.server.setup()
    twice = dataclasses.replace(setups[0], members=[*setups[0].members, 0], member_names=[*setups[0].member_names, "participant-0"])
    renamed = dataclasses.replace(setups[1], member_names=["participant-1", *setups[1].member_names[1:]])
    replies = fed.send("setup", [twice, renamed])
    assert replies[0].has_error() and replies[1].has_error()
    assert all(participant_secure.STATE not in fed.grid.contexts[fed.nodes[i]].state for i in (0, 1))


def _send(fed: Federation, stage: str, requests: list, server_round: int) -> dict:
    messages = [
        Message(protocol_content(r, {"server_round": server_round}), dst_node_id=fed.nodes[r.receiver],
                message_type=STAGE[stage].message_type, group_id=str(server_round))
        for r in requests
    ]
    ids = {node: i for i, node in fed.nodes.items()}
    return {ids[reply.metadata.src_node_id]: reply for reply in fed.grid.send_and_receive(messages)}


def test_survivor_signatures_of_an_earlier_round_do_not_count_in_a_later_instance_of_the_same_id(tmp_path: Path) -> None:
    # The coordinator names round 4's instance as round 3's and relays round 3's survivor-set
    # signatures (on the set without the target) to the target's neighbours: the round is in the
    # bound context, so the digest differs and none verifies; the coordinator is blamed.
    fed = Federation(tmp_path, n=5)
    old = fed.server
    relays = old.collect_keys(fed.answers("setup", fed.send("setup", old.setup())))
    shares = old.collect_shares(fed.answers("share_keys", fed.send("share_keys", relays)))
    asks = old.collect_masked(fed.answers("mask_input", fed.send("mask_input", shares)))
    without_target = [dataclasses.replace(a, survivors=[j for j in a.survivors if j != TARGET]) for a in asks if a.receiver != TARGET]
    stale = {s.sender: s.signature for s in fed.answers("consistency", fed.send("consistency", without_target))}
    for i, node in fed.nodes.items():  # round 4: every site holds a new update
        participant_secure.keep_update(fed.grid.contexts[node], fed.updates[i], 100, 4, os.urandom(32), fed.terms)
    new = SecAggServer(old.round_id, list(range(fed.n)), fed.d + 1, input_clip_norm(1.0), context=round_context(4, fed.weight_ref),
                       names=[f"participant-{i}" for i in range(fed.n)], roster=fed.roster)
    relays = new.collect_keys(fed.answers("setup", _send(fed, "setup", new.setup(), 4)))
    shares = new.collect_shares(fed.answers("share_keys", _send(fed, "share_keys", relays, 4)))
    asks = new.collect_masked(fed.answers("mask_input", _send(fed, "mask_input", shares, 4)))
    everyone = sorted(asks[0].survivors)
    fed.answers("consistency", _send(fed, "consistency", [dataclasses.replace(a, survivors=[j for j in everyone if j != TARGET]) for a in asks if a.receiver != TARGET], 4))
    requests = []
    for i in range(1, fed.n):
        others = [j for j in stale if j != i]
        requests.append(UnmaskRequest(new.round_id, i, [j for j in new.relayed[i] if j != TARGET], [TARGET], others,
                                      [stale[j] for j in others], [new.identities[j] for j in others]))
    replies = _send(fed, "unmask", requests, 4)
    for i in range(1, fed.n):
        assert replies[i].has_error() and "did not sign the survivor set" in replies[i].error.reason
        assert events(fed.sites[i])[-1]["evidence"]["signer"] in stale


@pytest.mark.usefixtures("deterministic_training")
def test_a_flower_run_id_reused_for_another_configuration_does_not_make_the_ledger_forget_a_plaintext_round(tmp_path: Path) -> None:
    # Plaintext rounds were keyed by the Flower run id and the round; the run id is the SuperLink's,
    # which the coordinator runs: two configurations under one run id charged the site once. Fixed:
    # the key names the configuration's sha256 too.
    directory = setup_tests.make_site(tmp_path / "site", 1)
    local = LocalConfig(
        site=SiteSection(name="site"), model=LocalModelSection(path="builtin:tiny-llama", sha256=setup_tests.SHA),
        data=LocalDataSection(path="diabetes", label_names=["no", "yes"]),
        policy=PolicySection(require_secagg=False, require_approval=False),  # plaintext under central DP, approved
    )
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    node = setup_tests.NODES[0]
    configs = {node: {"fake-node": node, "participant-dir": str(directory)}}
    for lr in ("1e-3", "2e-3"):  # two runs, one Flower run id
        cfg = setup_tests.run_config("federation.participants=1", "secagg.enabled=false", "privacy.noise_multiplier=1.0", f"train.lr={lr}")
        grid = LocalGrid(participant_app.app, configs, run_id=7)
        (reply,) = setup_tests.train(grid, {node: cfg.to_toml()}, {node: setup_tests.ADAPTER}).values()
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert site_ledger.site_status(directory)["contributions"] == 2


# --- not defended: the same update retrained under a second configuration ------------------------


@pytest.fixture
def deterministic_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local training replaced by a fixed update per node, as in test_deviating_coordinator_setup."""

    def get_runtime(cfg, node_config: dict, own_rank: bool = False) -> dict:
        return node_config

    def train_round(runtime: dict, cfg, vector: np.ndarray, server_round: int, **_: object) -> tuple[np.ndarray, dict]:
        update = np.random.default_rng(int(runtime["fake-node"])).normal(size=setup_tests.D).astype(np.float32) * 0.05
        return update, {"num-examples": 50, "train_loss": 0.5}

    fake = types.ModuleType("participant.runtime")
    fake.get_runtime, fake.train_round = get_runtime, train_round
    monkeypatch.setitem(sys.modules, "participant.runtime", fake)


@pytest.mark.usefixtures("deterministic_training")
def test_a_second_configuration_that_trains_alike_cannot_difference_out_a_target(tmp_path: Path) -> None:
    # Without DP. Run C sums round 1 over all three sites. The coordinator then runs C', the same
    # training under another hash (here federation.rounds differs), round 1 from the same global
    # adapter: each site would retrain the same update (its training is seeded by federation.seed,
    # the round and its partition; the fake training below is as deterministic), and a sum without
    # the target would leave C - C' = the target's update. Each site remembers which adapters its
    # masked updates were trained from and refuses to train from one again, in any configuration.
    cfg = setup_tests.run_config("federation.participants=3", "federation.rounds=3")
    again = setup_tests.run_config("federation.participants=3", "federation.rounds=4")
    configs = setup_tests.sites(tmp_path, {node: 2 for node in setup_tests.NODES})
    adapter = setup_tests.ADAPTER
    first = LocalGrid(participant_app.app, configs)
    replies = setup_tests.train(first, {node: cfg.to_toml() for node in setup_tests.NODES}, {node: adapter for node in setup_tests.NODES})
    everyone = setup_tests.secure_round(first, setup_tests.members_of(replies), cfg, RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(adapter)))
    assert setup_tests.summed(everyone) == {f"node-{node}" for node in setup_tests.NODES}
    second = LocalGrid(participant_app.app, configs, run_id=2)
    others = [node for node in setup_tests.NODES if node != setup_tests.TARGET]
    replies = setup_tests.train(second, {node: again.to_toml() for node in others}, {node: adapter for node in others})
    assert all(reply.has_error() for reply in replies.values())  # nothing trained, nothing to difference
    for node in others:
        assert any("of round 1 trained from global adapter" in reason for reason in setup_tests.refusals(configs[node]))
    # the next round from the same adapter (a round that applied nothing; prediction-only distillation) trains on
    replies = setup_tests.train(first, {node: cfg.to_toml() for node in setup_tests.NODES}, {node: adapter for node in setup_tests.NODES}, server_round=2)
    assert not any(reply.has_error() for reply in replies.values())
    fresh = adapter + 0.5  # a run from another adapter (another seed) trains and masks as usual
    replies = setup_tests.train(second, {node: again.to_toml() for node in others}, {node: fresh for node in others})
    later = setup_tests.secure_round(second, setup_tests.members_of(replies), again, RunBinding(config_sha256(again.to_toml()), adapter_sha256(fresh)))
    assert setup_tests.summed(later) == {f"node-{node}" for node in others}


@pytest.mark.usefixtures("deterministic_training")
@pytest.mark.parametrize(("change", "words"), [
    ({"noise_multiplier": 0.25}, "it binds noise_multiplier=0.25"),
    ({"dropout_margin": 0.0}, "dropout_margin=0"),
    ({"weight_ref": 1e-6}, "not 1"),
], ids=["smaller-z", "no-margin", "weight-ref"])
def test_a_bucket_bound_to_less_noise_or_another_weight_than_the_run_states_is_refused(tmp_path: Path, change: dict, words: str) -> None:
    # Under distributed DP the coordinator binds, for the whole bucket alike (so that the masks
    # cancel), a smaller noise multiplier, no dropout margin, or a tiny weight reference: each member
    # would then add less noise than the run it trained for states, or weigh its update up. The
    # target compares the bound context with its train instruction's configuration and refuses.
    cfg = setup_tests.run_config("federation.participants=3", "privacy.noise_multiplier=1.0")
    configs = setup_tests.sites(tmp_path, {node: 2 for node in setup_tests.NODES})
    grid = LocalGrid(participant_app.app, configs)
    binding = RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(setup_tests.ADAPTER))
    replies = setup_tests.train(grid, {node: cfg.to_toml() for node in setup_tests.NODES}, {node: setup_tests.ADAPTER for node in setup_tests.NODES})
    bound = {"noise_multiplier": cfg.privacy.noise_multiplier, "dropout_margin": cfg.privacy.dropout_margin, "weight_ref": 1.0} | change
    setup_tests._tamper_setup(grid, setup_tests.TARGET, lambda r: dataclasses.replace(
        r, context=round_context(setup_tests.ROUND, bound["weight_ref"], bound["noise_multiplier"], bound["dropout_margin"], binding)))
    result = setup_tests.secure_round(grid, setup_tests.members_of(replies), cfg, binding)
    assert f"node-{setup_tests.TARGET}" not in setup_tests.summed(result)
    (reason,) = setup_tests.refusals(configs[setup_tests.TARGET])
    assert "contradicts this site's terms" in reason and words in reason, reason
    assert site_ledger.site_status(Path(configs[setup_tests.TARGET]["participant-dir"]))["contributions"] == 0
