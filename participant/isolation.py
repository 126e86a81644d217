"""A member's isolated release: the update it masked, sent again alone with noise of its own.

Under distributed DP a coordinator that sets a bucket aside (its noisy sum is longer than the clip
bound allows) cannot tell which member cheated. With `secagg.isolation_rounds` it asks each member
for the input it masked, alone (coordinator/isolation.py). An honest member sends that input, its
clipped update (weight 1: under DP each participant counts once), plus Gaussian noise of std z C
drawn from the OS CSPRNG: what one member of a sum contributes under the run's guarantee. The
coordinator screens each release on its own, so a member whose input is out of bound is blamed by
name, and the others are summed as units of one. A simulated adversary sends its masked input as
it was, without noise.

The site decides, never the request: it releases only the input it masked for the round named (a
copy kept at mask_input only when the run's terms plan isolation), at most once per run round and in
at most `secagg.isolation_rounds` rounds of a run (participant/masked.py keeps the record, in the
site directory when deployed, so a restart cannot reset it), and a deployed site only with
`policy.allow_isolation`. Its ledger is charged first: the coordinator has now seen the update in
the bucket's sum and alone, `combined_noise_multiplier` of the two, and its consumers' view (the
adapter depends on both) takes the same (q, z / sqrt(2)) the run's accountant charges.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedlora.privacy.ledger import Charge, combined_noise_multiplier
from fedlora.privacy.noise import secret_rng
from fedlora.wire import array_view
from participant import ledger
from participant.masked import isolated_rounds, remember_isolated
from participant.site import REPLAY, record_event, refuse, site_of

ISOLATION = "secagg.isolation"  # ArrayRecord: the update part of the input this site masked, kept for one isolated release
ACTION = "secagg_isolate"  # query.secagg_isolate
ISOLATED_EVENT = "isolated-release"


def keep_for_isolation(context: Context, held: ConfigRecord, masked_input: np.ndarray) -> None:
    """Keep the update part of the input being masked when the run's terms plan isolation; drop any older copy."""
    if ISOLATION in context.state:
        del context.state[ISOLATION]
    if int(held.get("isolation_rounds", 0)) > 0:
        context.state[ISOLATION] = ArrayRecord({"input": Array(np.ascontiguousarray(masked_input[:-1], dtype=np.float32))})


def isolation_charge(previous: Charge, noise_multiplier: float) -> Charge:
    """The round's charge once the same input is released again alone at `noise_multiplier`."""
    return Charge(
        previous.sample_rate,
        combined_noise_multiplier(previous.noise_multiplier, noise_multiplier),
        combined_noise_multiplier(previous.coordinator_noise_multiplier, noise_multiplier),
    )


def isolation_refusals(context: Context, held: ConfigRecord, server_round: int) -> dict[str, str]:
    """Why this site will not release its round-`server_round` input alone, by the rule that says so."""
    site = site_of(dict(context.node_config))
    allowed, z = int(held.get("isolation_rounds", 0)), float(held["noise_multiplier"])
    done = isolated_rounds(site, context.state, str(held["config_sha256"]))
    out = {}
    if not (allowed > 0 and z > 0):
        out["secagg.isolation_rounds"] = "the run's configuration plans no isolated release (secagg.isolation_rounds with distributed DP)"
    elif server_round in done:
        out[REPLAY] = f"it already released its round-{server_round} input alone"
    elif len(done) >= allowed:
        out["secagg.isolation_rounds"] = f"it already released alone in rounds {done}, the {allowed} the run accounts for"
    if site is not None and not ledger.policy_of(site).allow_isolation:
        out["policy.allow_isolation"] = "this site's policy.allow_isolation is off"
    return out


def release_alone(context: Context, held: ConfigRecord, server_round: int, key: str, charge: Charge) -> np.ndarray:
    """The input masked for `server_round`, noised with z C (module docstring); refused (logged) when the
    site will not, charged to a deployed site's ledger (`key`: the contribution's; `charge`: what it holds
    for it so far) and recorded before it leaves. The kept copy is then dropped."""
    site = site_of(dict(context.node_config))
    refusals = isolation_refusals(context, held, server_round)
    if refusals:
        raise refuse(site, f"refused to release its round-{server_round} input alone: " + "; ".join(refusals.values()), list(refusals), round=server_round)
    if int(held["server_round"]) != server_round or ISOLATION not in context.state:
        raise RuntimeError(f"holds no masked input of round {server_round} to release alone")
    z, clip_norm = float(held["noise_multiplier"]), float(held["clip_norm"])
    masked_input = array_view(context.state[ISOLATION]["input"]).astype(np.float64)
    release = masked_input if held["adversary"] else masked_input + secret_rng().normal(0.0, z * clip_norm, size=masked_input.shape)
    if site is not None:  # charged on disk before the release leaves
        charge = isolation_charge(charge, z)
        ledger.check_charge(site, charge, f"the isolated release of round {server_round}", round=server_round)
        ledger.record_charge(site, key, charge, costlier=True)
        record_event(site, ISOLATED_EVENT, round=server_round, config_sha256=str(held["config_sha256"]), contribution=key)
    remember_isolated(site, context.state, str(held["config_sha256"]), server_round)
    del context.state[ISOLATION]
    return release
