"""Participant side of secure aggregation: hold the update, then answer the SecAgg+ stages.

In secure mode the train handler does not send its update: `hold_update` keeps it in Flower's
`context.state` (a RecordDict that persists per node across the messages of a run) and
replies with metadata only. The coordinator then runs the stages of `fedlora.secagg` as
`query.secagg_<stage>` messages. Each handler loads this node's protocol state from
`context.state`, runs the pure stage function, and saves the new state before replying, so
the protocol's invariants (e.g. one unmask per instance) hold across stateless calls.

The update is masked at most once per run round: it is deleted from `context.state` as its masked
input is built, and the (run configuration, round) is recorded (participant/masked.py: in the site
directory when deployed, so a restart or a resumed run cannot make it mask again), so a train,
setup or mask request for a round already masked is refused (logged, and answered with an error):
a coordinator that could get two sums over the same members, one with and one without a target,
could difference them.

Nothing in a setup request is trusted: the site compares every parameter it can recompute with
the terms it fixed when it held its update, from the run configuration that came with the train
instruction and its own policy (participant/terms.py: member count, graph, threshold, encoding,
noise, weight reference, and the hashes of the run configuration and global adapter), and
refuses a contradiction in its events.jsonl, blaming the coordinator. The bound context reaches
every key derivation, so members told different parameters cannot sum anyway.

Identity (DESIGN decision 8): a deployed participant signs its keys with its registered node key
and checks its neighbours' against the roster pinned in its directory (`participant.site`); what
the coordinator relays that its owner did not sign aborts the instance, with the evidence in the
site's events.jsonl (`blame_coordinator`). Before revealing any share it signs the survivor set it
is told and checks its neighbours' signatures on the same set (`fedlora.secagg.reveal`); an
inconsistent story aborts the same way. A simulation has no directories: identities there are
derived from names and protect nothing (`fedlora.secagg.identity`).

Distributed DP (privacy.noise_multiplier z > 0 in the configuration that came with the train
instruction): the setup must bind the same z and privacy.dropout_margin m and the weight
reference 1 (each participant counts once). At mask_input the participant adds
Skellam noise, drawn from the OS CSPRNG, to its encoded update coordinates (not to the weight
or count slot), calibrated from the instance's scale and member count
(`fedlora.secagg.plan.participant_skellam_mu`). Only a simulated adversary leaves it out.

A deployed site (participant/ledger.py) refuses a setup whose fewest unmaskable noise shares
would pass its ledger's limits, charges its ledger and records the contribution in events.jsonl at
mask_input before the masked input leaves, and raises that charge at unmask to what the surviving
neighbours imply. The charge is keyed by the run round (`contribution_key`), never by the instance
id the coordinator names.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedlora.attacks import Knowledge, Sent, choose_adversaries, resolve_attack
from fedlora.config import Config
from fedlora.privacy.ledger import Charge, present_noise_multiplier
from fedlora.privacy.noise import secret_rng, skellam
from fedlora.secagg import participant as protocol
from fedlora.secagg.errors import SecAggCoordinatorFault
from fedlora.secagg.identity import Identity, simulated_identity
from fedlora.secagg.messages import ParticipantState
from fedlora.secagg.fixedpoint import widest_clip
from fedlora.secagg.plan import RunBinding, participant_skellam_mu, weighted_input
from fedlora.secure_wire import STAGE, STAGES, content_bytes, protocol_content, read_meta, read_protocol
from fedlora.wire import Instruction, array_view, reply_content
from participant import ledger
from participant.isolation import ACTION as ISOLATE_ACTION, ISOLATION, keep_for_isolation, release_alone
from participant.masked import remember_masked, replay_reason
from participant.report import answered
from participant.site import REPLAY, SETUP_TERMS, Refusal, min_bucket_size, record_event, refuse, remember_cards, site_identity, site_of
from participant.terms import Terms, setup_contradictions

UPDATE = "secagg.update"  # ArrayRecord: the update held for masking (float32)
HELD = "secagg.held"  # ConfigRecord: its round, example count, rounding key, the site's `Terms`, the instance it is set up for
STATE = "secagg.state"  # ConfigRecord: the ParticipantState of the current instance


def rounding_key(cfg: Config, server_round: int, partition_id: int) -> bytes:
    """Key of the stochastic rounding: fresh from the OS CSPRNG, so nobody can recompute it.

    `simulation.reproducible_rounding` derives it from (seed, round, partition) instead, so a
    simulated secure run repeats exactly; the coordinator could then recompute it too.
    """
    if not cfg.simulation.reproducible_rounding:
        return os.urandom(32)
    text = f"fedlora/secagg/rounding/{cfg.federation.seed}/{server_round}/{partition_id}".encode()
    return hashlib.sha256(text).digest()


def refuse_replay(context: Context, config_sha256: str, server_round: int, adapter_sha256: str, what: str) -> None:
    """Refuse (logged, in a deployed participant's events.jsonl too) a request for a run round already masked, or for
    an update trained from a global adapter an earlier masked update was trained from (participant/masked.py)."""
    site = site_of(dict(context.node_config))
    reason = replay_reason(site, context.state, config_sha256, server_round, adapter_sha256)
    if reason is not None:
        raise refuse(site, f"refused {what} for round {server_round} (replay): {reason}", [REPLAY], round=server_round)


def is_adversary(cfg: Config, partition_id: int) -> bool:
    sim = cfg.simulation
    return sim.adversaries > 0 and partition_id in choose_adversaries(cfg.federation.participants, sim.adversaries, cfg.federation.seed)


def simulated_attack(cfg: Config, update: np.ndarray, server_round: int, partition_id: int) -> Sent:
    """What a participant sends under secure aggregation: a simulated adversary attacks here, before masking.

    Omniscient attacks get `benign = []`: no party can see the honest updates in secure mode. The
    adversary knows the defence as configured and its coalition as planned (all adversaries, in a
    round of the planned size). Its claims go into the reply's metadata and its weight slot, and
    it then skips clipping (`mask_input`), as a real one would.
    """
    if not is_adversary(cfg, partition_id):
        return Sent(update)
    adversaries = choose_adversaries(cfg.federation.participants, cfg.simulation.adversaries, cfg.federation.seed)
    sampled = cfg._sampled_per_round()
    knowledge = Knowledge.of(cfg, participants=sampled, attackers=min(len(adversaries), sampled), index=adversaries.index(partition_id))
    rng = np.random.default_rng([cfg.federation.seed, server_round, 0xBAD, partition_id])
    return resolve_attack(cfg.simulation.attack)(update, [], rng, knowledge)


def hold_update(msg: Message, context: Context, cfg: Config, instruction: Instruction, update: np.ndarray, metrics: dict) -> Message:
    """Keep this round's update for the secure stages, with the terms it may be masked under; reply with the metadata only."""
    server_round, partition_id = instruction.server_round, int(metrics.get("partition_id", -1))
    sent = simulated_attack(cfg, update, server_round, partition_id)
    metrics = sent.claims(metrics)
    binding = RunBinding(instruction.config_sha256, instruction.adapter_sha256, instruction.targets_sha256)
    terms = Terms.of(cfg.secagg, cfg.privacy, cfg.robust.clip_norm, binding, min_bucket_size(site_of(dict(context.node_config))))
    keep_update(
        context, sent.update, int(metrics["num-examples"]), server_round, rounding_key(cfg, server_round, partition_id), terms,
        adversary=is_adversary(cfg, partition_id),
        sample_rate=cfg.federation.fraction,
    )
    return Message(reply_content(metrics), reply_to=msg)


def keep_update(
    context: Context, update: np.ndarray, num_examples: int, server_round: int, key: bytes, terms: Terms, adversary: bool = False,
    sample_rate: float = 1.0,
) -> None:
    """Store an update (float32) in `context.state` until the mask_input stage consumes it.

    `terms`: what a setup must agree with (participant/terms.py; noise_multiplier > 0: distributed DP).
    `adversary` marks a simulated attacker: it will mask its update unclipped, its weight uncapped (and without noise).
    `sample_rate`: the run's q, for a deployed site's ledger (participant/ledger.py).
    """
    refuse_replay(context, terms.config_sha256, server_round, terms.adapter_sha256, "an update to hold")
    if ISOLATION in context.state:  # an earlier round's copy is never released once another round starts
        del context.state[ISOLATION]
    context.state[UPDATE] = ArrayRecord({"update": Array(np.ascontiguousarray(update, dtype=np.float32))})
    context.state[HELD] = ConfigRecord({
        "server_round": server_round, "num_examples": num_examples, "rounding_key": key, "adversary": adversary,
        "sample_rate": float(sample_rate), **terms.to_dict(),
    })


def _held(context: Context, server_round: int, what: str) -> ConfigRecord:
    if HELD not in context.state:
        raise RuntimeError(f"holds no update for round {server_round} (not trained in this run)")
    held = context.state[HELD]
    refuse_replay(context, str(held["config_sha256"]), server_round, str(held["adapter_sha256"]), what)
    if UPDATE not in context.state:
        raise RuntimeError(f"holds no unmasked update for round {server_round} (already masked)")
    if held["server_round"] != server_round:
        raise RuntimeError(f"holds the update of round {held['server_round']}, not of round {server_round}")
    return held


def _load(context: Context) -> ParticipantState:
    if STATE not in context.state:
        raise RuntimeError("no secure-aggregation state: the setup stage never reached this participant")
    return ParticipantState.from_dict(dict(context.state[STATE]))


def _save(context: Context, state: ParticipantState) -> None:
    context.state[STATE] = ConfigRecord(state.to_dict())


def identity(context: Context, name: str, names: list[str]) -> Identity:
    """This node's identity: deployed, its registered node key named by its pinned roster; in
    simulation (no participant directory), SIMULATION ONLY, a key derived from the name the
    coordinator gives it, with `names` as the roster (no protection against the coordinator)."""
    site = site_of(dict(context.node_config))
    return site_identity(site) if site else simulated_identity(name, names)


def blame_coordinator(context: Context, fault: SecAggCoordinatorFault, state: ParticipantState | None) -> Refusal:
    """Abort the instance (secrets erased) and record the evidence in the site's events.jsonl."""
    record_event(site_of(dict(context.node_config)), "coordinator-blamed", reason=str(fault), evidence=fault.evidence)
    if state is not None:
        _save(context, protocol.erase_secrets(state, "aborted"))
    return Refusal(str(fault))


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: check the request against this site's terms, make key pairs, advertise the public keys."""
    request = read_protocol(msg.content, STAGE["setup"].request)
    server_round = int(read_meta(msg.content)["server_round"])
    held = _held(context, server_round, "a setup request")
    problems = setup_contradictions(request, Terms.from_dict(dict(held)), server_round, context.state[UPDATE]["update"].shape[0])
    if problems:
        raise refuse(
            site_of(dict(context.node_config)),
            f"refused the setup of instance {request.round_id!r}: the coordinator's setup request for round {server_round} "
            "contradicts this site's terms (participant/terms.py): " + "; ".join(problems),
            [SETUP_TERMS], round=server_round, instance=request.round_id,
        )
    site = site_of(dict(context.node_config))
    if site is not None:  # the fewest noise shares this instance can release must fit the site's ledger
        ledger.check_charge(site, site_charge(held, len(request.members), request.threshold), f"round {server_round}", round=server_round)
    names = dict(zip(request.members, request.member_names))
    try:
        state, advert = protocol.setup(request, identity(context, names.get(request.receiver, ""), request.member_names))
    except SecAggCoordinatorFault as fault:
        raise blame_coordinator(context, fault, None) from None
    held["weight_ref"] = float.fromhex(json.loads(request.context)["weight_ref"])
    held["threshold"] = request.threshold
    held["members"] = len(request.members)  # k: the noise share is calibrated to the bucket at setup
    held["instance"] = state.round_id  # the held update is masked in this instance and no other
    _save(context, state)
    return Message(protocol_content(advert), reply_to=msg)


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share the secrets, encrypted to each neighbour whose keys were relayed."""
    state = _load(context)
    me = identity(context, state.name, state.member_names)
    try:
        state, upload = protocol.share_keys(state, read_protocol(msg.content, STAGE["share_keys"].request), me)
    except SecAggCoordinatorFault as fault:
        raise blame_coordinator(context, fault, state) from None
    remember_cards(site_of(dict(context.node_config)), me)
    _save(context, state)
    return Message(protocol_content(upload), reply_to=msg)


def mask_input(msg: Message, context: Context) -> Message:
    """Stage 3: mask [w * clip(update), w * C] in Z_2^32 and upload it (uint32, or uint16 words on the
    16-bit wire, `fedlora.secagg.narrow`); forget the update."""
    relay = read_protocol(msg.content, STAGE["mask_input"].request)
    state = _load(context)
    server_round = int(read_meta(msg.content)["server_round"])
    held = _held(context, server_round, "a mask request")
    if held.get("instance") != state.round_id:
        raise RuntimeError(f"the held update of round {server_round} was not set up for instance {state.round_id!r}; refusing to mask it")
    clip_norm = state.clip_norm / np.sqrt(2.0)  # the protocol's bound is sqrt(2) C (fedlora.secagg.plan)
    update = array_view(context.state[UPDATE]["update"])
    widest = widest_clip(state.scale) if held["adversary"] else None  # an attacker ignores clipping and caps
    vector = weighted_input(update, int(held["num_examples"]), float(held["weight_ref"]), clip_norm, widest)
    noise = None if held["adversary"] else dp_noise(held, state.scale, clip_norm, state.vector_length)  # an attacker sends what it wants
    try:
        state, masked = protocol.mask_input(state, relay, vector, bytes(held["rounding_key"]), widest, noise)
    except SecAggCoordinatorFault as fault:
        raise blame_coordinator(context, fault, state) from None
    content = protocol_content(masked)
    site = site_of(dict(context.node_config))
    if site is not None:  # on disk before the masked input leaves; keyed by the run round, a retry is free
        charge = site_charge(held, int(held["members"]), int(held["threshold"]))
        ledger.record_contribution(
            site, contribution_key(held), charge, context.run_id, str(held["config_sha256"]), server_round, str(held["adapter_sha256"]),
            content_bytes(content), instance=state.round_id,
        )
    keep_for_isolation(context, held, vector)  # only when the run plans isolated releases (participant/isolation.py)
    del context.state[UPDATE]  # masked at most once ...
    remember_masked(site, context.state, str(held["config_sha256"]), server_round, str(held["adapter_sha256"]))  # ... ever, before it leaves
    _save(context, state)
    return Message(content, reply_to=msg)


def dp_noise(held: ConfigRecord, scale: float, clip_norm: float, vector_length: int) -> np.ndarray | None:
    """This participant's Skellam noise share for [update, weight] (None without DP; 0 on the weight slot)."""
    z = float(held["noise_multiplier"])
    if z == 0:
        return None
    d = vector_length - 1
    mu = participant_skellam_mu(z, clip_norm, scale, int(held["members"]), float(held["dropout_margin"]), d)
    noise = np.zeros(vector_length, dtype=np.int64)
    noise[:d] = skellam(mu, d, secret_rng())
    return noise


def contribution_key(held: ConfigRecord) -> str:
    """The ledger key of the masked input of the held update: its run round (configuration sha256, round),
    which this site computes itself and masks at most one input for, ever (participant/masked.py). Not
    the instance id: the coordinator names that, and one id reused across runs or rounds would make
    the ledger take every contribution after the first for a retry of it (charged nothing)."""
    return f"config-{held['config_sha256']}/round-{int(held['server_round'])}"


def site_charge(held: ConfigRecord, members: int, masked: int) -> Charge:
    """A contribution to an instance of `members` whose sum holds at least `masked` noise shares
    (the coordinator view: what it can unmask; participant/ledger.py)."""
    z = float(held["noise_multiplier"])
    return Charge(float(held["sample_rate"]), z, present_noise_multiplier(z, members, masked, float(held["dropout_margin"])))


def consistency(msg: Message, context: Context) -> Message:
    """Stage 4: sign the survivor set the coordinator states (ConsistencyCheck); only one per instance."""
    state = _load(context)
    state, signature = protocol.sign_survivors(
        state, read_protocol(msg.content, STAGE["consistency"].request), identity(context, state.name, state.member_names)
    )
    _save(context, state)
    return Message(protocol_content(signature), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 5: with a majority's signatures on the set it signed, reveal exactly one kind of share per
    neighbour; a second request is refused, an inconsistent one aborts and blames the coordinator.
    A deployed site then raises its ledger's charge to the noise shares the survivors hold."""
    request = read_protocol(msg.content, STAGE["unmask"].request)
    state = _load(context)
    me = identity(context, state.name, state.member_names)
    try:
        state, response = protocol.unmask(state, request, me)
    except SecAggCoordinatorFault as fault:
        raise blame_coordinator(context, fault, state) from None
    site, held = site_of(dict(context.node_config)), context.state.get(HELD)
    remember_cards(site, me)
    if site is not None and held is not None and held.get("instance") == state.round_id:  # told whose inputs arrived
        members = int(held["members"])
        ledger.record_charge(site, contribution_key(held), site_charge(held, members, min(members, len(request.survived) + 1)), raise_only=True)
    _save(context, state)
    return Message(protocol_content(response), reply_to=msg)


def isolate(msg: Message, context: Context) -> Message:
    """After the stages: release the input masked for the round named alone, noised (participant/isolation.py)."""
    server_round = int(read_meta(msg.content)["server_round"])
    if HELD not in context.state:
        raise RuntimeError(f"holds no masked input of round {server_round} to release alone")
    held = context.state[HELD]
    site = site_of(dict(context.node_config))
    charge = (ledger.charged(site, contribution_key(held)) if site else None) or site_charge(held, int(held["members"]), int(held["threshold"]))
    release = release_alone(context, held, server_round, contribution_key(held), charge)
    return Message(reply_content({"isolated-round": server_round}, release), reply_to=msg)


HANDLERS = {"setup": setup, "share_keys": share_keys, "mask_input": mask_input, "consistency": consistency, "unmask": unmask}


def register(app: ClientApp) -> None:
    """Route `query.secagg_<stage>` messages of `app` to the handlers above, and `query.secagg_isolate`
    to `isolate` (a refusal answered as one line)."""
    for stage in STAGES:
        app.query(stage.action)(answered(HANDLERS[stage.name]))
    app.query(ISOLATE_ACTION)(answered(isolate))
