"""Run a whole SecAgg+ instance in one process: tests, benchmarks, examples.

Drives the same participant functions and server methods the Flower apps
relay (with simulated identities, `identity.simulated_identity`), passing every message (and each participant's state, which a stateless
ClientApp keeps in `context.state`) through `to_dict`/`from_dict` as the wire
would, and simulates dropouts at each stage.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from . import participant as part
from .identity import Identity, simulated_identity
from .messages import M, ParticipantState
from .server import SecAggServer, SumResult


def _wire(msg: M, sender: int | None = None) -> M:
    return type(msg).from_dict(msg.to_dict(), sender)


def run_secure_sum(
    vectors: dict[int, np.ndarray],
    clip_norm: float,
    *,
    threshold: int | None = None,
    degree: int | None = None,
    drop_before_shares: Iterable[int] = (),
    drop_before_masking: Iterable[int] = (),
    drop_before_unmask: Iterable[int] = (),
    seed: int = 0,
    round_id: str = "local-0",
    wire_bits: int = 32,
) -> SumResult:
    """Securely sum `vectors` (id -> float vector) with simulated dropouts.

    `drop_before_shares`: advertise keys, then vanish. `drop_before_masking`: share
    keys, never send a masked input (excluded from the sum; their pairwise masks
    are removed via their recovered keys). `drop_before_unmask`: send a masked
    input, then vanish (included; their self masks are recovered from shares). `wire_bits` 16:
    the 16-bit wire (`narrow`), whose last input coordinate travels in 32 bits.
    """
    ids = sorted(vectors)
    d = len(np.asarray(vectors[ids[0]]))
    server = SecAggServer(
        round_id, ids, d, clip_norm, degree=degree, threshold=threshold, graph_seed=seed, wire_bits=wire_bits
    )
    identities: dict[int, Identity] = {i: simulated_identity(name, server.names) for i, name in zip(ids, server.names, strict=True)}
    states: dict[int, ParticipantState] = {}
    adverts = []
    for setup in server.setup():
        states[setup.receiver], advert = part.setup(_wire(setup), identities[setup.receiver])
        adverts.append(_wire(advert, setup.receiver))
    gone = set(drop_before_shares)
    uploads = []
    for keys in server.collect_keys(adverts):
        if keys.receiver not in gone:
            states[keys.receiver], upload = part.share_keys(
                _wire(states[keys.receiver]), _wire(keys), identities[keys.receiver]
            )
            uploads.append(_wire(upload, keys.receiver))
    gone |= set(drop_before_masking)
    masked = []
    for shares in server.collect_shares(uploads):
        i = shares.receiver
        if i not in gone:
            states[i], y = part.mask_input(_wire(states[i]), _wire(shares), vectors[i])
            masked.append(_wire(y, i))
    signatures = []
    for ask in server.collect_masked(masked):
        states[ask.receiver], signature = part.sign_survivors(_wire(states[ask.receiver]), _wire(ask), identities[ask.receiver])
        signatures.append(_wire(signature, ask.receiver))
    asks = server.collect_signatures(signatures)
    gone |= set(drop_before_unmask)
    responses = []
    for ask in asks:
        if ask.receiver not in gone:
            states[ask.receiver], response = part.unmask(_wire(states[ask.receiver]), _wire(ask), identities[ask.receiver])
            responses.append(_wire(response, ask.receiver))
    return server.collect_unmask(responses)
