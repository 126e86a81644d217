"""A deviating coordinator against sites that check its setup (issue 22, attacks 3 and 4).

Written as the attacker: the coordinator below is ours, and it sends what it likes; the sites
run the real participant ClientApp (participant/app.py: policy, replay checks, participant/secure.py
stages) over `LocalGrid`, each with its own directory and participant.toml. Only local training is
replaced (a fixed update per site, so no model loads); everything from the train instruction on is
the shipped code. Each attack must be refused in the target's events.jsonl, naming what the
coordinator did, and nothing of the target's update may reach a sum.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import SecureSum, secure_sum
from fedlora.config import Config, load_config
from fedlora.pki import create_node_key, public_key_fingerprint
from fedlora.secagg.identity import Roster, roster_toml
from fedlora.secagg.messages import SetupRequest
from fedlora.secagg.participant import request_params
from fedlora.secagg.plan import RunBinding, round_context
from fedlora.secure_wire import STAGE, protocol_content, read_meta, read_protocol
from fedlora.wire import adapter_sha256, config_sha256, instruction_content
from participant import app as participant_app
from participant.local_config import (
    LOCAL_CONFIG,
    LocalConfig,
    LocalDataSection,
    LocalModelSection,
    PolicySection,
    SiteSection,
)
from participant.masked import MASKED_FILE
from participant.secure import UPDATE
from participant.site import EVENTS, ROSTER, SITE_KEY
from tests.conftest import SMALL

SHA = "a" * 64
D = 64  # update length: the fake training's
ROUND = 1
NODES = [7001, 7002, 7003]
TARGET = NODES[0]


@pytest.fixture(autouse=True)
def fixed_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local training replaced by a fixed update per node (the app imports participant.runtime when it trains)."""

    def get_runtime(cfg: Config, node_config: dict, own_rank: bool = False) -> dict:
        return node_config

    def train_round(runtime: dict, cfg: Config, vector: np.ndarray, server_round: int, **_: object) -> tuple[np.ndarray, dict]:
        update = np.random.default_rng(int(runtime["fake-node"])).normal(size=D).astype(np.float32) * 0.05
        return update, {"num-examples": 50, "train_loss": 0.5}

    fake = types.ModuleType("participant.runtime")
    fake.get_runtime, fake.train_round = get_runtime, train_round
    monkeypatch.setitem(sys.modules, "participant.runtime", fake)


def run_config(*overrides: str) -> Config:
    return load_config(None, [*SMALL, f"model.sha256={SHA}", "data.label_names=no,yes", "secagg.enabled=true", *overrides])


def make_site(directory: Path, min_bucket_size: int) -> Path:
    directory.mkdir()
    local = LocalConfig(
        site=SiteSection(name=directory.name),
        model=LocalModelSection(path="builtin:tiny-llama", sha256=SHA),
        data=LocalDataSection(path="diabetes", label_names=["no", "yes"]),
        policy=PolicySection(min_bucket_size=min_bucket_size, require_approval=False),  # approved: not what is tested
    )
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    return directory


def sites(tmp_path: Path, policies: dict[int, int]) -> dict[int, dict]:
    """Node configs: a site directory (policy.min_bucket_size) per node in `policies`, the rest without one.

    Each site has a node key and pins the roster of every site's key under its member name (node-<id>).
    """
    directories = {node: make_site(tmp_path / f"site-{node}", policies[node]) for node in NODES if node in policies}
    for directory in directories.values():
        create_node_key(directory)
    roster = Roster({f"node-{node}": public_key_fingerprint(directory / "node.pub") for node, directory in directories.items()})
    for directory in directories.values():
        (directory / ROSTER).write_text(roster_toml(roster))
    return {node: {"fake-node": node, **({SITE_KEY: str(directories[node])} if node in directories else {})} for node in NODES}


def train(grid: LocalGrid, configs: dict[int, str], adapters: dict[int, np.ndarray], server_round: int = ROUND) -> dict[int, Message]:
    """The coordinator's train exchange; it may send each node its own config and adapter."""
    messages = [
        Message(instruction_content(adapters[node], server_round, configs[node]), dst_node_id=node, message_type="train", group_id=str(server_round))
        for node in configs
    ]
    return {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(messages)}


def members_of(replies: dict[int, Message]) -> list[Member]:
    return [Member(node, f"node-{node}", 50) for node, reply in sorted(replies.items()) if not reply.has_error()]


def secure_round(grid: LocalGrid, members: list[Member], cfg: Config, binding: RunBinding, tag: str = "t") -> SecureSum:
    return secure_sum(grid, members, cfg.secagg, ROUND, D, tag, cfg.robust.clip_norm, cfg.privacy, binding)


def refusals(node_config: dict) -> list[str]:
    path = Path(node_config[SITE_KEY]) / EVENTS
    return [event["reason"] for event in map(json.loads, path.read_text().splitlines()) if event["event"] == "refused"] if path.exists() else []


def summed(result: SecureSum) -> set[str]:
    return {name for unit in result.buckets for name in unit.members}


ADAPTER = np.zeros(16, np.float32)


def test_an_honest_round_completes_between_sites_that_check_its_setup(tmp_path: Path) -> None:
    cfg = run_config("federation.participants=3")
    configs = sites(tmp_path, {node: 3 for node in NODES})
    grid = LocalGrid(participant_app.app, configs)
    replies = train(grid, {node: cfg.to_toml() for node in NODES}, {node: ADAPTER for node in NODES})
    result = secure_round(grid, members_of(replies), cfg, RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(ADAPTER)))
    assert summed(result) == {f"node-{node}" for node in NODES}
    assert all(refusals(config) == [] for config in configs.values())
    for config in configs.values():  # each site remembers the run round it masked
        assert json.loads((Path(config[SITE_KEY]) / MASKED_FILE).read_text())["masked"] == [f"{config_sha256(cfg.to_toml())}/{ROUND}"]


@pytest.mark.parametrize(("stated_bucket", "policy"), [(0, 10), (10, 2)], ids=["site-policy", "run-states-10"])
def test_a_two_member_instance_is_refused_by_a_site_that_accepts_no_fewer_than_ten(tmp_path: Path, stated_bucket: int, policy: int) -> None:
    # The run states buckets of 10 (or one bucket of the 10 sampled), so the train instruction passes
    # the site's policy; the coordinator then sets up an instance of the target and its own node.
    cfg = run_config("federation.participants=10", f"secagg.bucket_size={stated_bucket}")
    configs = sites(tmp_path, {TARGET: policy})
    grid = LocalGrid(participant_app.app, configs)
    replies = train(grid, {node: cfg.to_toml() for node in NODES[:2]}, {node: ADAPTER for node in NODES[:2]})
    assert not any(reply.has_error() for reply in replies.values())  # the words passed the policy
    lax = dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, bucket_size=0))  # the plan it actually runs
    result = secure_round(grid, members_of(replies), lax, RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(ADAPTER)))
    assert not result.buckets  # no sum: the other member alone is below any threshold
    (reason,) = refusals(configs[TARGET])
    assert "the coordinator's setup request for round 1 contradicts this site's terms" in reason
    assert "it has 2 members, below the 10 this site accepts" in reason
    assert UPDATE in grid.contexts[TARGET].state  # its update never left, not even masked
    assert not (Path(configs[TARGET][SITE_KEY]) / MASKED_FILE).exists()


def _lied_to(what: str, cfg: Config) -> tuple[str, np.ndarray, str]:
    """What the coordinator sends the target instead: another config or another global adapter, and the words it names."""
    if what == "adapter":
        return cfg.to_toml(), np.full(16, 0.25, np.float32), "global adapter"
    return run_config("federation.participants=3", "train.lr=1e-2").to_toml(), ADAPTER, "run configuration"


@pytest.mark.parametrize("what", ["adapter", "config"])
def test_a_member_given_another_model_or_config_refuses_the_instance_and_is_in_no_sum(tmp_path: Path, what: str) -> None:
    # Pasquini et al. (CCS 2022): a crafted model sent to one member makes its update readable in the
    # sum. The coordinator binds what the others received; the target compares with its own.
    cfg = run_config("federation.participants=3")
    configs = sites(tmp_path, {node: 2 for node in NODES})
    grid = LocalGrid(participant_app.app, configs)
    toml, adapter, words = _lied_to(what, cfg)
    replies = train(grid, {**{node: cfg.to_toml() for node in NODES}, TARGET: toml}, {**{node: ADAPTER for node in NODES}, TARGET: adapter})
    result = secure_round(grid, members_of(replies), cfg, RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(ADAPTER)))
    assert f"node-{TARGET}" not in summed(result)
    (reason,) = refusals(configs[TARGET])
    assert f"it binds {words} sha256" in reason and "must not sum" in reason
    assert UPDATE in grid.contexts[TARGET].state


def test_members_told_different_adapter_hashes_derive_different_instance_digests() -> None:
    # Were a target told its own adapter's hash (so that its check passes), its keys would still be
    # derived from another digest than its neighbours': their masks and share bundles do not meet.
    request = SetupRequest("r", 0, [0, 1], [1], 2, D + 1, 1.0, 1.0, round_context(1, 1.0, binding=RunBinding("c", "a")), b"k" * 32, ["p0", "p1"])
    other = dataclasses.replace(request, context=round_context(1, 1.0, binding=RunBinding("c", "b")))
    assert request_params(request) != request_params(other)


def _tamper_setup(grid: LocalGrid, node: int, edit) -> None:
    """Make the coordinator rewrite the setup request it sends `node` (`edit`: SetupRequest -> SetupRequest)."""
    send = grid.send_and_receive

    def deviating(messages, *, timeout=None):
        out = []
        for message in messages:
            if message.metadata.dst_node_id == node and message.metadata.message_type == STAGE["setup"].message_type:
                request = edit(read_protocol(message.content, SetupRequest))
                message = Message(protocol_content(request, read_meta(message.content)), dst_node_id=node,
                                  message_type=message.metadata.message_type, group_id=message.metadata.group_id)
            out.append(message)
        return send(out, timeout=timeout)

    grid.send_and_receive = deviating


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda r: dataclasses.replace(r, threshold=r.threshold + 1), "it sets threshold"),
        (lambda r: dataclasses.replace(r, clip_norm=r.clip_norm * 100), "it sets clip norm"),
        (lambda r: dataclasses.replace(r, scale=r.scale * 2), "it sets fixed-point scale"),
        (lambda r: dataclasses.replace(r, wire_bits=16), "it sets a 16-bit wire"),
        (lambda r: dataclasses.replace(r, vector_length=r.vector_length + 1), "it sets vector length"),
        (lambda r: dataclasses.replace(r, neighbours=[m for m in r.members if m not in (r.receiver, *r.neighbours)][:2]), "the degree-2 graph"),
    ],
    ids=["threshold", "clip-norm", "scale", "wire", "length", "graph"],
)
def test_setup_parameters_other_than_the_plans_are_refused_and_blamed_on_the_coordinator(tmp_path: Path, edit, words: str) -> None:
    cfg = run_config("federation.participants=6", "secagg.degree=2")  # a sparse graph: neighbours are a choice
    nodes = [7001 + i for i in range(6)]
    configs = {node: {"fake-node": node, **({SITE_KEY: str(make_site(tmp_path / "target", 2))} if node == TARGET else {})} for node in nodes}
    grid = LocalGrid(participant_app.app, configs)
    replies = train(grid, {node: cfg.to_toml() for node in nodes}, {node: ADAPTER for node in nodes})
    _tamper_setup(grid, TARGET, edit)
    result = secure_round(grid, members_of(replies), cfg, RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(ADAPTER)))
    assert f"node-{TARGET}" not in summed(result)
    (reason,) = refusals(configs[TARGET])
    assert "the coordinator's setup request for round 1 contradicts" in reason and words in reason, reason


def test_a_resumed_run_cannot_make_a_site_mask_a_round_again(tmp_path: Path) -> None:
    # Attack 4: the round is summed once with everyone; the coordinator "resumes" (a new Flower run:
    # fresh contexts, same site directories, same configuration) and asks for the round again, to
    # sum it without the target and read the target's update as the difference.
    cfg = run_config("federation.participants=3")
    configs = sites(tmp_path, {node: 2 for node in NODES})
    binding = RunBinding(config_sha256(cfg.to_toml()), adapter_sha256(ADAPTER))
    first = LocalGrid(participant_app.app, configs)
    first.silent.add((TARGET, STAGE["unmask"].message_type))  # the target is recovered, as a crash after masking would leave it
    replies = train(first, {node: cfg.to_toml() for node in NODES}, {node: ADAPTER for node in NODES})
    assert summed(secure_round(first, members_of(replies), cfg, binding)) == {f"node-{node}" for node in NODES}
    resumed = LocalGrid(participant_app.app, configs, run_id=2)
    replies = train(resumed, {node: cfg.to_toml() for node in NODES[1:]}, {node: ADAPTER for node in NODES[1:]})
    assert all(reply.has_error() for reply in replies.values())  # refused before training
    for node in NODES[1:]:
        (reason,) = refusals(configs[node])
        assert "refused a train request for round 1 (replay): this participant already masked an input for it" in reason
        assert UPDATE not in resumed.contexts[node].state
    assert not secure_round(resumed, [Member(node, f"node-{node}", 50) for node in NODES[1:]], cfg, binding, "t2").buckets
