"""Participant side of secure aggregation: hold the update, then answer the SecAgg+ stages.

In secure mode the train handler does not send its update: `hold_update` keeps it in Flower's
`context.state` (a RecordDict that persists per node across the messages of a run) and
replies with metadata only. The coordinator then runs the stages of `fedlora.secagg` as
`query.secagg_<stage>` messages. Each handler loads this node's protocol state from
`context.state`, runs the pure stage function, and saves the new state before replying, so
the protocol's invariants (e.g. one unmask per instance) hold across stateless calls.

The update is masked at most once: it is deleted from `context.state` as its masked input is
built, so a coordinator that restarts an instance after seeing masked inputs (and could then
difference two sums) gets nothing.
"""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedlora.attacks import choose_adversaries, resolve_attack
from fedlora.config import Config
from fedlora.secagg import participant as protocol
from fedlora.secagg.messages import ParticipantState
from fedlora.secagg.plan import weighted_input
from fedlora.secure_wire import STAGE, STAGES, array_view, protocol_content, read_meta, read_protocol
from fedlora.wire import reply_content

UPDATE = "secagg.update"  # ArrayRecord: the update held for masking (float32)
HELD = "secagg.held"  # ConfigRecord: its round, example count, rounding seed, weight reference
STATE = "secagg.state"  # ConfigRecord: the ParticipantState of the current instance


def _rounding_seed(cfg: Config, server_round: int, partition_id: int) -> int:
    """Seed of the stochastic rounding: fixed by the run seed, so a secure run is reproducible."""
    text = f"fedlora/secagg/rounding/{cfg.federation.seed}/{server_round}/{partition_id}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def simulated_attack(cfg: Config, update: np.ndarray, server_round: int, partition_id: int) -> np.ndarray:
    """A simulated adversary's update under secure aggregation: attacked here, before masking.

    Omniscient attacks get `benign = []`: no party can see the honest updates in secure mode.
    """
    sim = cfg.simulation
    if sim.adversaries <= 0 or partition_id not in choose_adversaries(cfg.federation.participants, sim.adversaries, cfg.federation.seed):
        return update
    rng = np.random.default_rng([cfg.federation.seed, server_round, 0xBAD, partition_id])
    return np.asarray(resolve_attack(sim.attack)(update, [], rng))


def hold_update(msg: Message, context: Context, cfg: Config, update: np.ndarray, metrics: dict, server_round: int) -> Message:
    """Keep this round's update for the secure stages; reply with the metadata only."""
    partition_id = int(metrics.get("partition_id", -1))
    update = simulated_attack(cfg, update, server_round, partition_id)
    keep_update(context, update, int(metrics["num-examples"]), server_round, _rounding_seed(cfg, server_round, partition_id))
    return Message(reply_content(metrics), reply_to=msg)


def keep_update(context: Context, update: np.ndarray, num_examples: int, server_round: int, rounding_seed: int) -> None:
    """Store an update (float32) in `context.state` until the mask_input stage consumes it."""
    context.state[UPDATE] = ArrayRecord({"update": Array(np.ascontiguousarray(update, dtype=np.float32))})
    context.state[HELD] = ConfigRecord({"server_round": server_round, "num_examples": num_examples, "rounding_seed": rounding_seed})


def _held(context: Context, server_round: int) -> ConfigRecord:
    if HELD not in context.state or UPDATE not in context.state:
        raise RuntimeError(f"holds no unmasked update for round {server_round} (not trained, or already masked)")
    held = context.state[HELD]
    if held["server_round"] != server_round:
        raise RuntimeError(f"holds the update of round {held['server_round']}, not of round {server_round}")
    return held


def _load(context: Context) -> ParticipantState:
    if STATE not in context.state:
        raise RuntimeError("no secure-aggregation state: the setup stage never reached this participant")
    return ParticipantState.from_dict(dict(context.state[STATE]))


def _save(context: Context, state: ParticipantState) -> None:
    context.state[STATE] = ConfigRecord(state.to_dict())


def setup(msg: Message, context: Context) -> Message:
    """Stage 1: check the round, make key pairs, advertise the public keys."""
    meta = read_meta(msg.content)
    held = _held(context, int(meta["server_round"]))
    state, advert = protocol.setup(read_protocol(msg.content, STAGE["setup"].request))
    held["weight_ref"] = float(meta["weight_ref"])
    _save(context, state)
    return Message(protocol_content(advert), reply_to=msg)


def share_keys(msg: Message, context: Context) -> Message:
    """Stage 2: Shamir-share the secrets, encrypted to each neighbour whose keys were relayed."""
    state, upload = protocol.share_keys(_load(context), read_protocol(msg.content, STAGE["share_keys"].request))
    _save(context, state)
    return Message(protocol_content(upload), reply_to=msg)


def mask_input(msg: Message, context: Context) -> Message:
    """Stage 3: mask [w * clip(update), w * C] in Z_2^32 and upload it (uint32); forget the update."""
    relay = read_protocol(msg.content, STAGE["mask_input"].request)
    state = _load(context)
    held = _held(context, int(read_meta(msg.content)["server_round"]))
    clip_norm = state.clip_norm / np.sqrt(2.0)  # the protocol's bound is sqrt(2) C (fedlora.secagg.plan)
    update = array_view(context.state[UPDATE]["update"])
    vector = weighted_input(update, int(held["num_examples"]), float(held["weight_ref"]), clip_norm)
    rng = np.random.default_rng(int(held["rounding_seed"]))
    state, masked = protocol.mask_input(state, relay, vector, rng)
    del context.state[UPDATE]  # masked at most once
    _save(context, state)
    return Message(protocol_content(masked), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4: reveal exactly one kind of share per neighbour; a second request is refused."""
    state, response = protocol.unmask(_load(context), read_protocol(msg.content, STAGE["unmask"].request))
    _save(context, state)
    return Message(protocol_content(response), reply_to=msg)


HANDLERS = {"setup": setup, "share_keys": share_keys, "mask_input": mask_input, "unmask": unmask}


def register(app: ClientApp) -> None:
    """Route `query.secagg_<stage>` messages of `app` to the handlers above."""
    for stage in STAGES:
        app.query(stage.action)(HANDLERS[stage.name])
