"""Secure aggregation wired into the coordinator and participant over Flower messages.

The message stages run first in-process (`coordinator.local_grid.LocalGrid`: real Flower
messages through protobuf, no engine) on synthetic updates; then whole federations on the
Simulation Engine compare a secure run with a plaintext one and exercise dropout recovery
and an aborted round.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from coordinator.local_grid import LocalGrid
from coordinator.gather import Member
from coordinator.secure import gather_secure, secure_sum
from fedlora.aggregate import combine_units
from fedlora.aggregate.robust import make_rule
from fedlora.aggregate.weights import unit_weights
from fedlora.config import ConfigError, PrivacySection, SecaggSection, load_config
from fedlora.secagg import clip
from fedlora.secagg.fixedpoint import widest_clip
from fedlora.secagg.plan import check_fixed_point
from fedlora.secure_wire import STAGE, read_meta
from fedlora.simulation import simulate
from fedlora.wire import config_sha256, instruction_content
from participant import app as participant_app
from participant import secure as participant_secure
from participant.terms import Terms
from tests.conftest import SMALL

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- in-process: the stages over Flower messages ---------------------------------------

TERMS = Terms.of(SecaggSection(enabled=True), PrivacySection(), 1.0)  # what the tests' secure_sum calls plan (clip_norm 1)


def _federation(n: int, d: int, app: ClientApp | None = None, seed: int = 0, big: tuple[int, ...] = (), terms: Terms = TERMS):
    """n nodes holding random updates for round 3 (those in `big` exceed clip_norm), under `terms`."""
    if app is None:
        app = ClientApp()
        participant_secure.register(app)
    nodes = [1000 + 7 * i for i in range(n)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    rng = np.random.default_rng(seed)
    updates, counts = {}, {}
    for i, node in enumerate(nodes):
        updates[node] = (rng.normal(size=d) * (1.0 if i in big else 0.01)).astype(np.float32)
        counts[node] = int(rng.integers(5, 200))
        participant_secure.keep_update(grid.contexts[node], updates[node], counts[node], 3, os.urandom(32), terms)
    members = [Member(node, f"participant-{i}", counts[node]) for i, node in enumerate(nodes)]
    return grid, members, updates, counts


def _expected(members, updates, counts, clip_norm, names, weighting=("capped", 2.0)):
    """The plaintext weighted sum of `names`' clipped updates, each weighed as `unit_weights` says."""
    weights = dict(zip((m.node for m in members), unit_weights([counts[m.node] for m in members], *weighting)))
    chosen = [m for m in members if m.name in names]
    total = sum(weights[m.node] * clip(updates[m.node], clip_norm) for m in chosen)
    return total, float(sum(weights[m.node] for m in chosen))


def _check_sum(result, members, updates, counts, clip_norm, names, weighting=("capped", 2.0)):
    total, weight = _expected(members, updates, counts, clip_norm, names, weighting)
    got_total = sum(b.total for b in result.buckets)
    got_weight = sum(b.weight for b in result.buckets)
    assert sorted(n for b in result.buckets for n in b.members) == sorted(names)
    assert np.max(np.abs(got_total - total)) <= sum(b.error_bound for b in result.buckets)
    assert abs(got_weight - weight) <= 1e-6 * weight


@pytest.mark.parametrize("weighting", ["capped", "claimed"])
def test_a_member_claiming_a_million_examples_weighs_in_a_secure_bucket_what_it_would_in_plaintext(weighting: str) -> None:
    # The bucket's weight reference comes from robust.weighting: under the cap, the liar's weight
    # slot and its update count 2 median claims, not 10^6 (with `claimed` they count 10^6).
    sec = SecaggSection(enabled=True, bucket_size=3)
    grid, members, updates, counts = _federation(6, 300)
    liar = members[2] = dataclasses.replace(members[2], num_examples=10**6)
    counts[liar.node] = grid.contexts[liar.node].state[participant_secure.HELD]["num_examples"] = 10**6
    result = secure_sum(grid, members, sec, server_round=3, length=300, run_tag="t", clip_norm=1.0, weighting=(weighting, 2.0))
    assert not result.aborted and not result.skipped
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members}, (weighting, 2.0))
    weights = dict(zip((m.name for m in members), unit_weights([counts[m.node] for m in members], weighting, 2.0)))
    (bucket,) = [b for b in result.buckets if liar.name in b.members]
    liar_weight = bucket.weight - sum(weights[name] for name in bucket.members if name != liar.name)
    median = float(np.median([counts[m.node] for m in members]))
    assert liar_weight == pytest.approx(2.0 * median if weighting == "capped" else 10**6, rel=1e-6)


def test_bucket_sums_equal_the_weighted_plaintext_sum() -> None:
    sec = SecaggSection(enabled=True, bucket_size=3)
    grid, members, updates, counts = _federation(7, 3000, big=(1, 4))
    result = secure_sum(grid, members, sec, server_round=3, length=3000, run_tag="t", clip_norm=1.0)
    assert not result.aborted and not result.skipped
    assert sorted(len(b.members) for b in result.buckets) == [3, 4]
    assert sorted(n for b in result.buckets for n in b.members) == sorted(m.name for m in members)
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members})
    # What travelled up is masked uint32: 4 bytes per parameter (+1 weight slot) plus keys, signatures
    # and shares (about 2.2 KB per participant here, fixed whatever d).
    per_param = result.bytes_up / (len(members) * 3001)
    assert 4.0 <= per_param < 4.75
    # Each participant masked its update once and answered one unmask: its state says so.
    for context in grid.contexts.values():
        assert participant_secure.UPDATE not in context.state
        assert context.state[participant_secure.STATE]["stage"] == "unmasked"


def test_a_robust_rule_over_bucket_sums_drops_the_bucket_with_the_attacker() -> None:
    # The coordinator sees one sum per bucket of 2; participant 0 sends a sign-flipped update
    # (clipped like everyone's), and Multi-Krum over the 5 bucket means leaves its bucket out.
    app = ClientApp()
    participant_secure.register(app)
    nodes = [2000 + i for i in range(10)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    rng = np.random.default_rng(1)
    honest = rng.normal(size=400)
    honest *= 0.5 / np.linalg.norm(honest)
    for i, node in enumerate(nodes):
        update = -10 * honest if i == 0 else honest + rng.normal(size=400) * 0.005
        participant_secure.keep_update(grid.contexts[node], update.astype(np.float32), 50, 3, os.urandom(32), TERMS)
    members = [Member(node, f"participant-{i}", 50) for i, node in enumerate(nodes)]
    sec = SecaggSection(enabled=True, bucket_size=2)
    gathered = gather_secure(grid, members, sec, server_round=3, length=400, run_tag="t", clip_norm=1.0)
    assert [len(u.members) for u in gathered.units] == [2] * 5  # sums of two, never one update
    attacked = next(k for k, u in enumerate(gathered.units) if "participant-0" in u.members)
    robust = combine_units(gathered.units, make_rule("multi-krum:1"))
    assert robust.metrics["robust"]["dropped"] == [attacked]
    # Honest noise is 0.1 per participant, ~0.035 over the 8 kept: the rule stays within that,
    # while the mean is pulled by the attacker's clipped update (norm 1) over 10 members: ~0.15.
    robust_error = np.linalg.norm(robust.delta - honest)
    plain_error = np.linalg.norm(combine_units(gathered.units).delta - honest)
    assert robust_error < 0.06 and plain_error > 0.12


def test_a_simulated_attacker_ignores_clipping_and_is_bounded_only_by_the_encoding() -> None:
    # Honest members are clipped to C = 1; the attacker (node 0) masks its update unclipped, up
    # to the whole 32-bit range the bucket's scale leaves one member: about n * sqrt(2) C.
    sec = SecaggSection(enabled=True)
    app = ClientApp()
    participant_secure.register(app)
    nodes = [3000 + i for i in range(4)]
    grid = LocalGrid(app, {node: {} for node in nodes})
    huge = np.ones(300, np.float32) * 100.0
    for i, node in enumerate(nodes):
        update = huge if i == 0 else np.zeros(300, np.float32)
        participant_secure.keep_update(grid.contexts[node], update, 50, 3, os.urandom(32), TERMS, adversary=i == 0)
    members = [Member(node, f"participant-{i}", 50) for i, node in enumerate(nodes)]
    (unit,) = secure_sum(grid, members, sec, server_round=3, length=300, run_tag="t", clip_norm=1.0).buckets
    sent = np.linalg.norm(unit.total) / 50  # the attacker's update as it reached the sum
    widest = widest_clip(check_fixed_point(1.0, 4, update_length=300))
    assert 4.0 < widest * (1 - 1e-3) < sent <= widest * (1 + 1e-6)  # far above C = 1: the whole encoding's range


def test_dropouts_before_and_after_masking() -> None:
    sec = SecaggSection(enabled=True, timeout_s=1.0)
    grid, members, updates, counts = _federation(5, 500)
    before, after = members[1], members[3]
    grid.silent |= {(before.node, STAGE["mask_input"].message_type), (after.node, STAGE["unmask"].message_type)}
    result = secure_sum(grid, members, sec, server_round=3, length=500, run_tag="t", clip_norm=1.0)
    # `after` sent its masked input, then vanished: recovered from its neighbours' shares.
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members} - {before.name})
    assert [r["participant"] for r in result.recovered] == [after.name]
    assert [(r.participant, "mask_input" in r.reason) for r in result.skipped] == [(before.name, True)]


def test_below_threshold_the_bucket_aborts_with_a_reason() -> None:
    sec = SecaggSection(enabled=True)
    grid, members, updates, counts = _federation(4, 200)  # complete graph, threshold 3
    for member in members[:2]:
        grid.silent.add((member.node, STAGE["unmask"].message_type))
    result = secure_sum(grid, members, sec, server_round=3, length=200, run_tag="t", clip_norm=1.0)
    assert not result.buckets and result.layout[0]["status"] == "aborted"
    assert "threshold" in result.aborted[0]
    assert {r.participant for r in result.skipped} == {m.name for m in members}


def _tampered_by(node: int, stage: str, tamper: Callable[[ConfigRecord], None]) -> ClientApp:
    """An honest ClientApp, except that `node` edits its reply to `stage` with `tamper` before sending it."""
    app = ClientApp()
    for name, handler in participant_secure.HANDLERS.items():
        if name != stage:
            app.query(STAGE[name].action)(handler)

    @app.query(STAGE[stage].action)
    def _tampered(msg: Message, context: Context) -> Message:
        reply = participant_secure.HANDLERS[stage](msg, context)
        if context.node_id == node:
            tamper(reply.content["secagg"])
        return reply

    return app


def _add_stray_receiver(record: ConfigRecord) -> None:
    """Address an extra share to participant 42, which never got keys."""
    record["receivers"] = [*record["receivers"], 42]
    for key in ("ciphertexts", "b_share_commitments", "s_share_commitments"):
        record[key] = [*record[key], record[key][0]]


def _garble_second_b_share(record: ConfigRecord) -> None:
    """Garbage instead of the self-mask share of the first neighbour (the first is its own)."""
    record["b_shares"] = [record["b_shares"][0], os.urandom(len(record["b_shares"][1])), *record["b_shares"][2:]]


def _dealing_garbage_by(node: int) -> ClientApp:
    """An honest ClientApp, except that `node` seals random bytes as its first neighbour's share bundle
    and signs them as its own (a dealer signs what it deals: the relay cannot forge that)."""
    from fedlora.secagg import crypto as secagg_crypto

    app = ClientApp()
    for name, handler in participant_secure.HANDLERS.items():
        if name != "share_keys":
            app.query(STAGE[name].action)(handler)

    @app.query(STAGE["share_keys"].action)
    def _garbling(msg: Message, context: Context) -> Message:
        if context.node_id != node:
            return participant_secure.HANDLERS["share_keys"](msg, context)
        seal, sealed = secagg_crypto.seal_bundle, []

        def garbage_first(*args, **kwargs) -> bytes:
            blob = seal(*args, **kwargs)
            sealed.append(blob)
            return os.urandom(len(blob)) if len(sealed) == 1 else blob

        secagg_crypto.seal_bundle = garbage_first
        try:
            return participant_secure.HANDLERS["share_keys"](msg, context)
        finally:
            secagg_crypto.seal_bundle = seal

    return app


def test_a_participant_addressing_shares_to_a_stranger_is_excluded_and_the_rest_summed() -> None:
    sec = SecaggSection(enabled=True)
    grid, members, updates, counts = _federation(5, 300, app=_tampered_by(1007, "share_keys", _add_stray_receiver))
    result = secure_sum(grid, members, sec, server_round=3, length=300, run_tag="t", clip_norm=1.0)
    assert result.layout[0]["status"] == "ok"
    assert list(result.layout[0]["blamed"]) == ["participant-1"]
    assert [r.participant for r in result.skipped] == ["participant-1"]
    assert "protocol violation" in result.skipped[0].reason and "42" in result.skipped[0].reason
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members} - {"participant-1"})


def test_garbage_sent_to_one_neighbour_is_blamed_on_its_sender_over_flower_messages() -> None:
    sec = SecaggSection(enabled=True)
    grid, members, updates, counts = _federation(6, 300, app=_dealing_garbage_by(1014))
    result = secure_sum(grid, members, sec, server_round=3, length=300, run_tag="t", clip_norm=1.0)
    assert result.layout[0]["status"] == "ok"
    assert list(result.layout[0]["blamed"]) == ["participant-2"]  # node 1014, never its accuser
    assert "bad share bundle" in result.layout[0]["blamed"]["participant-2"]
    assert [r.participant for r in result.skipped] == ["participant-2"] and result.skipped[0].fault
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members} - {"participant-2"})


def _claim_to_be_participant_2(record: ConfigRecord) -> None:
    record["sender"] = 2


def test_a_reply_claiming_another_sender_is_blamed_on_its_authenticated_node_never_on_the_one_it_names() -> None:
    grid, members, updates, counts = _federation(5, 200, app=_tampered_by(1007, "setup", _claim_to_be_participant_2))
    result = secure_sum(grid, members, SecaggSection(enabled=True), server_round=3, length=200, run_tag="t", clip_norm=1.0)
    assert result.layout[0]["status"] == "ok"
    assert list(result.layout[0]["blamed"]) == ["participant-1"]  # node 1007, not participant-2
    assert "claiming to be participant 2" in result.layout[0]["blamed"]["participant-1"]
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members} - {"participant-1"})


def test_a_participant_blamed_at_unmask_stays_in_the_sum_and_is_booked_a_fault() -> None:
    grid, members, updates, counts = _federation(6, 200, app=_tampered_by(1007, "unmask", _garble_second_b_share))
    gathered = gather_secure(grid, members, SecaggSection(enabled=True), server_round=3, length=200, run_tag="t", clip_norm=1.0)
    assert gathered.blamed == ["participant-1"] and not gathered.skipped
    assert "participant-1" in {m.name for m in gathered.included}  # its masked input is in the sum


def test_an_update_replaced_after_setup_is_not_masked_in_that_instance() -> None:
    # A second train message for the round, arriving between setup and masking, replaces the held
    # update; the instance was set up for the first one, so the participant refuses to mask.
    app = ClientApp()
    for stage in set(participant_secure.HANDLERS) - {"setup"}:
        app.query(STAGE[stage].action)(participant_secure.HANDLERS[stage])

    @app.query(STAGE["setup"].action)
    def _setup_then_retrain(msg: Message, context: Context) -> Message:
        reply = participant_secure.setup(msg, context)
        if context.node_id == 1007:
            participant_secure.keep_update(context, np.ones(50, np.float32), 10, 3, os.urandom(32), TERMS)
        return reply

    grid, members, updates, counts = _federation(5, 50, app=app)
    result = secure_sum(grid, members, SecaggSection(enabled=True), server_round=3, length=50, run_tag="t", clip_norm=1.0)
    assert [r.participant for r in result.skipped] == ["participant-1"]
    assert "was not set up for instance" in result.skipped[0].reason
    _check_sum(result, members, updates, counts, 1.0, {m.name for m in members} - {"participant-1"})


def test_a_participant_masks_its_update_only_once() -> None:
    sec = SecaggSection(enabled=True)
    grid, members, _, _ = _federation(3, 50)
    first = secure_sum(grid, members, sec, server_round=3, length=50, run_tag="t", clip_norm=1.0)
    assert len(first.buckets) == 1
    again = secure_sum(grid, members, sec, server_round=3, length=50, run_tag="t2", clip_norm=1.0)
    assert not again.buckets
    assert all("(replay): this participant already masked an input for it" in r.reason for r in again.skipped)


def test_a_replayed_train_message_for_a_masked_round_is_refused_before_training() -> None:
    sec = SecaggSection(enabled=True)
    config = load_config(None, SMALL + ["secagg.enabled=true"])
    terms = dataclasses.replace(TERMS, config_sha256=config_sha256(config.to_toml()))  # held from this run's instruction
    grid, members, _, _ = _federation(3, 50, app=participant_app.app, terms=terms)
    secure_sum(grid, members, sec, server_round=3, length=50, run_tag="t", clip_norm=1.0, binding=terms.binding)
    node = members[0].node
    content = instruction_content(np.zeros(4, np.float32), 3, config.to_toml())
    train = Message(content, dst_node_id=node, message_type="train", group_id="3")
    (reply,) = grid.send_and_receive([train])
    assert reply.has_error() and "refused a train request for round 3" in reply.error.reason
    assert participant_secure.UPDATE not in grid.contexts[node].state  # nothing trained or held


def test_a_simulated_count_inflation_reaches_the_metadata_and_the_weight_slot_under_secure_aggregation() -> None:
    """The claim travels in the train reply and in the masked weight slot. The bucket's weight reference
    is capped (2 median claims: 120), so the claim itself buys nothing; but the attacker writes its
    weight slot as far as the bucket's encoding lets one member (3 x 120 in a bucket of 3), more
    than its plaintext cap: a per-member bound inside the protocol is open (docs/decisions.md,
    "Aggregation weights")."""
    from coordinator.gather import read_train_replies
    from coordinator.rounds import exchange
    from fedlora.attacks import choose_adversaries
    from fedlora.secagg.plan import RunBinding
    from fedlora.wire import adapter_sha256, read_instruction

    overrides = ["secagg.enabled=true", "secagg.bucket_size=3", "federation.participants=6", "robust.clip_norm=1.0",
                 "simulation.adversaries=0.17", "simulation.attack=count-inflation:1000000"]
    cfg = load_config(None, [*SMALL, *overrides])
    (bad,) = choose_adversaries(6, 0.17, cfg.federation.seed)
    d, rng = 200, np.random.default_rng(0)
    direction = np.ones(d) / np.sqrt(d)
    updates = {p: (0.6 * direction + 0.2 * rng.standard_normal(d) / np.sqrt(d)).astype(np.float32) for p in range(6)}
    app = ClientApp()
    participant_secure.register(app)

    @app.train()
    def train(msg, context):  # a participant that trained `updates[p]` on 60 records
        instruction = read_instruction(msg.content)
        pid = int(context.node_config["partition-id"])
        metrics = {"num-examples": 60, "train_loss": 1.0, "partition_id": pid}
        return participant_secure.hold_update(msg, context, instruction.config, instruction, updates[pid], metrics)

    grid = LocalGrid(app, {100 + p: {"partition-id": p} for p in range(6)})
    adapter, toml = np.zeros(4, np.float32), cfg.to_toml()
    replies = exchange(grid, list(grid.contexts), instruction_content(adapter, 1, toml), "train", 1, 10.0)
    members, rejected = read_train_replies(replies, lambda node, metrics: f"participant-{node - 100}", 10.0, with_vector=False)
    assert not rejected and {m.name: m.num_examples for m in members}[f"participant-{bad}"] == 10**6
    binding = RunBinding(config_sha256(toml), adapter_sha256(adapter))
    gathered = gather_secure(grid, members, cfg.secagg, 1, d, "t", 1.0, binding=binding)
    (liars,) = [u for u in gathered.units if f"participant-{bad}" in u.members]
    (honest,) = [u for u in gathered.units if u is not liars]
    assert honest.weight == pytest.approx(180, rel=1e-6)
    assert liars.weight == pytest.approx(60 + 60 + 3 * 120, rel=1e-6)  # not 10^6 + 120, as before the capped reference
    assert np.linalg.norm(liars.mean) <= 1.0 + 1e-4  # at the clip bound: it passes the screen
    own = updates[bad] / np.linalg.norm(updates[bad])  # blind, it points against what it trained
    assert float(liars.mean @ own) / np.linalg.norm(liars.mean) < -0.99  # it still dominates its bucket (360 of 480)


def test_rounding_keys_are_fresh_unless_a_simulation_asks_for_reproducible_ones() -> None:
    secret = load_config(None, SMALL + ["secagg.enabled=true"])
    keys = {participant_secure.rounding_key(secret, 3, 0) for _ in range(3)}
    reproducible = load_config(None, SMALL + ["secagg.enabled=true", "simulation.reproducible_rounding=true"])
    derived = participant_secure.rounding_key(reproducible, 3, 0)
    assert len(keys) == 3 and derived not in keys  # the coordinator cannot recompute the rounding
    assert derived == participant_secure.rounding_key(reproducible, 3, 0) != participant_secure.rounding_key(reproducible, 3, 1)


def test_attacks_apply_before_masking() -> None:
    cfg = load_config(None, SMALL + ["secagg.enabled=true", "simulation.adversaries=0.34", "simulation.attack=sign-flip"])
    update = np.arange(4, dtype=np.float32)
    from fedlora.attacks import choose_adversaries

    bad = choose_adversaries(3, 0.34, cfg.federation.seed)[0]
    good = next(i for i in range(3) if i != bad)
    np.testing.assert_array_equal(participant_secure.simulated_attack(cfg, update, 1, bad).update, -update)
    np.testing.assert_array_equal(participant_secure.simulated_attack(cfg, update, 1, good).update, update)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["secagg.bucket_size=1"], "secagg.bucket_size", "in the clear"),
        (["secagg.threshold=5"], "secagg.threshold", "exceeds the bucket size 3"),
        (["secagg.threshold=0.5"], "secagg.threshold", "fraction in (0.5, 1]"),
        (["secagg.threshold=2", "federation.participants=8"], "secagg.threshold", "must be in [5, 8]"),
        (["secagg.bucket_size=4"], "secagg.bucket_size", "exceeds the 3 participants"),
        (["secagg.degree=3"], "secagg.degree", "even"),
        (["robust.clip_norm=0"], "robust.clip_norm", "positive"),
        (["secagg.clip_norm=5"], "secagg.clip_norm", "is now robust.clip_norm"),  # the old name points to the new one
        (["lora.mode=exact"], "lora.mode", "secure aggregation"),
    ],
)
def test_impossible_secagg_settings_fail_at_load_time(overrides, key, words) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, SMALL + ["secagg.enabled=true", *overrides])
    assert str(err.value).startswith(key) and words in str(err.value)


def test_fixed_point_overflow_is_refused_at_load_time() -> None:
    from fedlora.secagg.plan import check_fixed_point

    check_fixed_point(10.0, 50)
    with pytest.raises(ValueError, match="buckets"):
        check_fixed_point(1.0, 2**31)


# --- whole federations on the Simulation Engine ----------------------------------------

VANISH_AT_UNMASK = {1: {3}, 2: {2, 3}}  # server round -> partitions that go offline after masking

vanishing_app = ClientApp()
vanishing_app.train()(participant_app.train)
vanishing_app.evaluate()(participant_app.evaluate_global)
for _stage in (name for name in participant_secure.HANDLERS if name != "unmask"):  # every stage but the one it vanishes at
    vanishing_app.query(STAGE[_stage].action)(participant_secure.HANDLERS[_stage])


@vanishing_app.query(STAGE["unmask"].action)
def _vanish(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    if partition in VANISH_AT_UNMASK.get(int(read_meta(msg.content)["server_round"]), ()):
        raise ConnectionError(f"participant {partition} went offline after sending its masked input")
    return participant_secure.unmask(msg, context)


FOUR = SMALL + ["federation.participants=4", "lora.mode=frozen-a"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    plain_dir, secure_dir = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("secure")
    plain = simulate(load_config(None, FOUR + ["federation.rounds=1"]), plain_dir)
    original = participant_app.app
    participant_app.app = vanishing_app
    try:
        secure = simulate(load_config(None, FOUR + ["federation.rounds=2", "secagg.enabled=true"]), secure_dir)
    finally:
        participant_app.app = original
    return {"plain": (plain_dir, plain), "secure": (secure_dir, secure)}


def _adapter(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapters" / name / "adapter_model.safetensors"))


@pytest.mark.slow
def test_secure_round_matches_plaintext_within_the_fixed_point_bound(runs) -> None:
    (plain_dir, _), (secure_dir, rows) = runs["plain"], runs["secure"]
    row = rows[1]
    assert row["applied"] and row["participants"] == 4
    bound = row["mean_error_bound"]
    assert 0 < bound < 1e-6
    plain, secure = _adapter(plain_dir, "round-0001"), _adapter(secure_dir, "round-0001")
    before = _adapter(secure_dir, "round-0000")
    moved = 0.0
    for name, expected in plain.items():
        slack = 4 * np.finfo(np.float32).eps * np.abs(expected).max()
        assert np.max(np.abs(secure[name] - expected)) <= bound + slack, name
        moved = max(moved, float(np.max(np.abs(expected - before[name]))))
    assert moved > 100 * bound  # the round did move the adapter, far beyond the tolerance


@pytest.mark.slow
def test_participant_vanishing_after_masking_is_recovered(runs) -> None:
    (_, plain_rows), (_, rows) = runs["plain"], runs["secure"]
    row = rows[1]
    assert [r["participant"] for r in row["secagg"]["recovered"]] == ["participant-3"]
    assert "went offline" in row["secagg"]["recovered"][0]["reason"]
    assert row["skipped"] == [] and row["secagg"]["buckets"][0]["survivors"] == [f"participant-{i}" for i in range(4)]
    # Masked uint32 vectors are as big as the float32 uploads; keys and shares add a little.
    assert plain_rows[1]["bytes_up"] < row["bytes_up"] < 1.25 * plain_rows[1]["bytes_up"]


@pytest.mark.slow
def test_round_below_threshold_aborts_and_leaves_the_adapter_unchanged(runs) -> None:
    secure_dir, rows = runs["secure"]
    row = rows[2]
    assert row["applied"] is False and "threshold" in row["aborted"]
    assert len(row["skipped"]) == 4 and row["participants"] == 0
    before, after = _adapter(secure_dir, "round-0001"), _adapter(secure_dir, "final")
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert np.isfinite(row["eval_loss"])
