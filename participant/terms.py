"""The terms a site masks its update under, and the setup requests that contradict them.

DESIGN decisions 7 and 8: the coordinator may deviate, so a site checks what a setup request
actually contains, not what the run configuration said it would be. A policy of buckets of at
least 10 means nothing if the site then takes part in a 2-member instance whose other member is
the coordinator's own node: the "sum" is its update (issue 22, attack 3). The terms are fixed
when the site holds its update: from the run configuration that came with its train instruction
(what the round is) and its own policy (the least it accepts). At setup every public parameter
the site can recompute is recomputed with the functions the coordinator plans with
(`fedlora.secagg.plan`, `fedlora.secagg.graph`) and must be equal:

- members: at least max(2, secagg.bucket_size, policy.min_bucket_size);
- this site's neighbours: the degree the plan gives that many members (`neighbourhood_degree`:
  ~3 log2 n, Bell et al., CCS 2020, or secagg.degree), drawn as the instance's public graph (the
  round id seeds it), so the coordinator cannot hand-pick a site's neighbours;
- the threshold: `resolve_threshold` of secagg.threshold for that degree (more than half the
  neighbourhood, so no two disjoint groups can both reconstruct);
- clip norm, wire width, vector length and fixed-point scale: the run's, for that many members;
- the bound context: this round, the run's noise multiplier and dropout margin, weight reference 1
  under distributed DP, and the hashes of the run configuration and the global adapter this site
  received (`RunBinding`: members given different models or configurations must not sum,
  Pasquini et al., CCS 2022).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from fedlora.config import PrivacySection, SecaggSection
from fedlora.secagg.graph import communication_graph
from fedlora.secagg.messages import SetupRequest
from fedlora.secagg.plan import (
    RunBinding,
    check_fixed_point,
    context_binding,
    context_noise,
    input_clip_norm,
    neighbourhood_degree,
    resolve_threshold,
    round_context,
)


@dataclass(frozen=True)
class Terms:
    """What this site agreed to for its held update (plain scalars: kept in `context.state`)."""

    config_sha256: str  # of the run configuration its train instruction carried
    adapter_sha256: str  # of the global adapter it carried
    clip_norm: float  # robust.clip_norm
    min_members: int  # max(2, secagg.bucket_size, policy.min_bucket_size)
    degree: int  # secagg.degree (0 = the plan's ~3 log2 n)
    threshold: float  # secagg.threshold, as the run states it
    wire_bits: int
    noise_multiplier: float  # privacy.noise_multiplier (> 0: distributed DP)
    dropout_margin: float
    targets_sha256: str = ""  # of the soft targets it carried ([distillation]; empty without)
    isolation_rounds: int = 0  # secagg.isolation_rounds: the rounds the run accounts an isolated release in (distributed DP)

    @classmethod
    def of(
        cls, sec: SecaggSection, privacy: PrivacySection, clip_norm: float, binding: RunBinding = RunBinding(), min_bucket_size: int = 1
    ) -> Terms:
        """The terms of a run's sections (`min_bucket_size`: the site's policy; 1 in simulation)."""
        return cls(
            binding.config_sha256, binding.adapter_sha256, float(clip_norm), max(2, sec.bucket_size, min_bucket_size),
            sec.degree, float(sec.threshold), sec.wire_bits, float(privacy.noise_multiplier),
            float(privacy.dropout_margin) if privacy.noise_multiplier > 0 else 0.0,  # a margin only sizes DP noise shares
            binding.targets_sha256, sec.isolation_rounds if privacy.noise_multiplier > 0 else 0,
        )

    @property
    def binding(self) -> RunBinding:
        return RunBinding(self.config_sha256, self.adapter_sha256, self.targets_sha256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Terms:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def parse_context(context: str) -> tuple[dict[str, Any], list[str]]:
    """The bound context as a dict, or {} and why it is not one."""
    try:
        bound = json.loads(context)
        int(bound["server_round"]), float.fromhex(bound["weight_ref"]), context_noise(bound), context_binding(bound)  # each field parses
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        return {}, [f"its context {context[:200]!r} is not a round context ({type(err).__name__}: {err})"]
    return bound, []


def context_contradictions(bound: dict[str, Any], terms: Terms, server_round: int, canonical: str) -> list[str]:
    """What the bound context says against this site's terms (the context parsed by `parse_context`)."""
    problems = []
    if int(bound["server_round"]) != server_round:
        problems.append(f"it binds round {bound['server_round']}, this site holds the update of round {server_round}")
    noise, mine = context_noise(bound), (terms.noise_multiplier, terms.dropout_margin)
    if noise != mine:
        problems.append(
            f"it binds noise_multiplier={noise[0]:g}, dropout_margin={noise[1]:g}; the run configuration that came with "
            f"the train instruction has {mine[0]:g}, {mine[1]:g}"
        )
    weight_ref = float.fromhex(bound["weight_ref"])
    if terms.noise_multiplier > 0 and weight_ref != 1.0:
        problems.append(f"distributed DP counts every participant once, but it binds weight reference {weight_ref:g}, not 1")
    if not weight_ref > 0:
        problems.append(f"it binds weight reference {weight_ref:g}, which is not positive")
    binding = context_binding(bound)
    for what, told, held in (
        ("run configuration", binding.config_sha256, terms.config_sha256),
        ("global adapter", binding.adapter_sha256, terms.adapter_sha256),
        ("soft targets", binding.targets_sha256, terms.targets_sha256),
    ):
        if told != held:
            problems.append(
                f"it binds {what} sha256 {told[:12] or '(none)'}…, but this site's train instruction carried {held[:12] or '(none)'}… "
                "(members given different models or configurations must not sum)"
            )
    if not problems and canonical != round_context(server_round, weight_ref, *noise, binding):
        problems.append(f"its context {canonical!r} is not in canonical form")
    return problems


def instance_contradictions(request: SetupRequest, terms: Terms, update_length: int) -> list[str]:
    """What the instance's shape (members, graph, threshold, encoding) says against this site's terms."""
    n = len(request.members)
    if n < terms.min_members:
        return [
            f"it has {n} members, below the {terms.min_members} this site accepts (the larger of its "
            "policy.min_bucket_size and the run's secagg.bucket_size, and at least 2)"
        ]
    k = neighbourhood_degree(n, terms.degree)
    problems = neighbour_contradictions(request, k, terms.degree)
    try:
        threshold = resolve_threshold(terms.threshold, k)
        if request.threshold != threshold:
            problems.append(f"it sets threshold {request.threshold}, the plan for degree {k} gives {threshold} (secagg.threshold={terms.threshold:g})")
    except ValueError as err:
        problems.append(f"the run's secagg.threshold does not fit its degree-{k} graph: {err}")
    if request.clip_norm != input_clip_norm(terms.clip_norm):
        problems.append(f"it sets clip norm {request.clip_norm:g}, the run's robust.clip_norm gives {input_clip_norm(terms.clip_norm):g}")
    if request.wire_bits != terms.wire_bits:
        problems.append(f"it sets a {request.wire_bits}-bit wire, the run's secagg.wire_bits is {terms.wire_bits}")
    if request.vector_length != update_length + 1:
        problems.append(f"it sets vector length {request.vector_length}, this site's update has {update_length} values (+1 weight slot)")
    try:
        scale = check_fixed_point(terms.clip_norm, n, terms.noise_multiplier, terms.dropout_margin, update_length, terms.wire_bits)
        if request.scale != scale:
            problems.append(f"it sets fixed-point scale {request.scale!r}, the plan for {n} members gives {scale!r}")
    except ValueError as err:
        problems.append(f"the plan cannot encode {n} members: {err}")
    return problems


def neighbour_contradictions(request: SetupRequest, k: int, degree_setting: int) -> list[str]:
    """This site's neighbours against the degree-k graph the plan draws over the members from the round id."""
    me, n = request.receiver, len(request.members)
    if me not in request.members:
        return []  # the protocol refuses a receiver that is not a member (fedlora.secagg.participant.setup)
    try:
        expected = communication_graph(list(request.members), k, request.round_id.encode())[me]
    except ValueError as err:
        return [f"no graph of degree {k} exists over its {n} members ({err})"]
    if sorted(request.neighbours) != expected:
        return [
            f"it gives this site the neighbours {sorted(request.neighbours)}, but the degree-{k} graph the plan draws for "
            f"{n} members from its round id gives {expected} (secagg.degree={degree_setting})"
        ]
    return []


def setup_contradictions(request: SetupRequest, terms: Terms, server_round: int, update_length: int) -> list[str]:
    """Everything in `request` that contradicts this site's terms (empty: the site may take part)."""
    bound, problems = parse_context(request.context)
    if bound:
        problems = context_contradictions(bound, terms, server_round, request.context)
    return problems + instance_contradictions(request, terms, update_length)
