"""How a federated round uses the protocol: bucket sizes, graph degree, threshold, weighted input.

Pure functions shared by the config check (fail at load time), the coordinator (one
`SecAggServer` per bucket) and the participant (what vector it masks).

Weighted input. The coordinator needs the example-weighted mean sum_i n_i x_i / sum_i n_i but
may see only sums. Each participant masks the d+1 vector

    [w_i * clip(x_i, C), w_i * C],   w_i = min(n_i / n_ref, 1),

where n_ref is the largest example count in its bucket (public, sent by the coordinator in the
setup request's bound context, `round_context`). The last coordinate sums to C * sum_i w_i, so the bucket's weighted sum and
its total weight both come out of one secure sum, consistent with each other even if a
participant misreports its count in plaintext metadata. The L2 norm of the vector is at most
sqrt(2) * C, which is the norm the fixed-point encoding is sized for (`input_clip_norm`).

Distributed DP (privacy.noise_multiplier z > 0). Every participant counts once: the coordinator
binds n_ref = 1 (so w_i = 1, the sum is unweighted and the weight slot decodes to the member
count), and each participant adds Skellam noise to its encoded update coordinates (not to the
weight or count slot) before masking: Sk(mu) with 2 mu = (z * Delta)^2 / (k (1 - m)), k the
bucket's members at setup, m = privacy.dropout_margin and Delta = C * scale + sqrt(d)
(`rounded_sensitivity`: the L2 norm a clipped update can have after stochastic rounding, so the
guarantee covers the rounding too). `check_fixed_point` then plans the scale so that:

- the noise fits: every coordinate keeps room for a 10-sigma tail of the sum's noise (std
  z * Delta / sqrt(1 - m) with all k members present) above the n members' worst case, planned
  as ceil(10 z / sqrt(2 (1 - m))) extra members (the noise std in units of one member's range
  sqrt(2) C scale) plus ceil(10 z sqrt(d) / sqrt(1 - m)) integers for the rounding term, and
  checked exactly in integers (`check_no_overflow(..., reserve=)`). Skellam noise of variance
  s^2 is sub-gamma (variance s^2, scale 1/3), so a coordinate leaves the range with probability
  at most 2 exp(-50 / (1 + 10 / (3 s))), ~4e-22 for the s >= 6e4 of buckets up to 10^4; a wrapped
  coordinate corrupts the sum, it does not reveal anything;
- numpy can draw it: each participant's mu stays at or below `SKELLAM_MU_MAX` (2^30), where
  numpy's Poisson sampler is still accurate, and the bucket's k mu below `SKELLAM_SUM_MU_MAX`
  (2^34), which bounds the sampler's error in the sum (fedlora.privacy.noise). Noise of std
  ~1e5 integers dwarfs the fixed point's resolution anyway: the rounding error of a sum (std at
  most sqrt(k) / 2 integers) stays below 1e-3 of the noise's std.

The 16-bit wire (secagg.wire_bits = 16, `fedlora.secagg.narrow`). The update's d coordinates are
rotated, so each stays within B = `rotated_bound(C, d)` but with probability 1e-9, and the scale
is the largest at which n members' ceil(B * scale) fit 2^15 - 1; the weight slot keeps 32 bits
at that scale. Distributed DP is refused: the 10-sigma tail of the noise alone needs
10 z (C * scale + sqrt(d)) of the 2^15 integers, so the rounding term 10 z sqrt(d) leaves no room
at all once d > 1.07e7 / z^2, and below that the scale it leaves inflates the noise
(z (C * scale + sqrt(d)) integers, calibrated to the rounded sensitivity) by 1 + sqrt(d) / (C * scale):
~1.44x at d = 1e6 and ~2.6x at d = 4e6 for z = 1, against ~1.007x on the 32-bit wire.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from fedlora.privacy.clipping import clip
from fedlora.privacy.noise import SKELLAM_MU_MAX, SKELLAM_SUM_MU_MAX, skellam_mu

from .fixedpoint import check_no_overflow, choose_scale
from .graph import default_degree
from .narrow import WIRE_WIDTHS
from .rotation import rotated_bound


def bucket_sizes(participants: int, bucket_size: int) -> list[int]:
    """Sizes of the buckets `assign_buckets` makes of `participants` (bucket_size 0 = one bucket)."""
    if bucket_size == 0 or participants < bucket_size:
        return [participants]
    count = participants // bucket_size
    return sorted(participants // count + (b < participants % count) for b in range(count))


def neighbourhood_degree(members: int, degree: int = 0) -> int:
    """Graph degree k of a bucket: `degree` (0 = ~3 log2 n, Bell et al.), at most members - 1."""
    return min(members - 1, default_degree(members) if degree == 0 else degree)


def threshold_range(k: int) -> tuple[int, int]:
    """Allowed Shamir thresholds for degree k: more than half the neighbourhood, at most all of it."""
    return (k + 1) // 2 + 1, k + 1


def resolve_threshold(setting: float, k: int) -> int:
    """secagg.threshold -> a share count: 0 = smallest secure, (0.5, 1] = fraction of k+1, >= 2 = count."""
    low, high = threshold_range(k)
    if setting == 0:
        return low
    t = math.ceil(setting * (k + 1) - 1e-9) if setting <= 1 else int(setting)
    if not low <= t <= high:
        raise ValueError(
            f"threshold {t} does not fit a neighbourhood of {k + 1} (degree {k}): it must be in "
            f"[{low}, {high}] (more than half, so no two disjoint groups can both reconstruct)"
        )
    return t


def input_clip_norm(clip_norm: float) -> float:
    """L2 bound of the masked vector [w * clip(x, C), w * C] with w <= 1."""
    return math.sqrt(2.0) * clip_norm


NOISE_TAIL_SIGMAS = 10  # room kept per coordinate for the noise of a bucket's sum, in its std


def rounded_sensitivity(clip_norm: float, scale: float, update_length: int) -> float:
    """L2 bound, in fixed-point integers, of one clipped update (norm <= C) after stochastic
    rounding: C * scale + sqrt(d), as rounding moves each of the d coordinates by less than 1."""
    return clip_norm * scale + math.sqrt(update_length)


def participant_skellam_mu(
    noise_multiplier: float, clip_norm: float, scale: float, members: int, dropout_margin: float, update_length: int
) -> float:
    """The Skellam parameter of one member's noise share (see the module docstring)."""
    return skellam_mu(noise_multiplier, rounded_sensitivity(clip_norm, scale, update_length), members, dropout_margin)


def sum_noise_std(noise_multiplier: float, clip_norm: float, scale: float, dropout_margin: float, update_length: int) -> float:
    """Std (fixed-point integers) of the noise in a bucket's sum with all its members present."""
    return noise_multiplier * rounded_sensitivity(clip_norm, scale, update_length) / math.sqrt(1.0 - dropout_margin)


def noise_headroom(noise_multiplier: float, dropout_margin: float) -> int:
    """Extra members' worth of range kept for the noise's 10-sigma tail: ceil(10 z / sqrt(2 (1 - m)))."""
    if noise_multiplier == 0:
        return 0
    return math.ceil(NOISE_TAIL_SIGMAS * noise_multiplier / math.sqrt(2.0 * (1.0 - dropout_margin)))


def _skellam_scale_cap(noise_multiplier: float, clip_norm: float, members: int, dropout_margin: float, update_length: int) -> float:
    """Largest scale at which each member's Skellam parameter mu stays <= SKELLAM_MU_MAX and the
    bucket's k mu <= SKELLAM_SUM_MU_MAX (fedlora.privacy.noise)."""
    mu_max = min(SKELLAM_MU_MAX, SKELLAM_SUM_MU_MAX / members)
    # 2 mu = (z (C scale + sqrt d))^2 / (k (1 - m)) <= 2 mu_max
    reach = math.sqrt(2.0 * members * (1.0 - dropout_margin) * mu_max) / noise_multiplier - math.sqrt(update_length)
    if not reach > 0:
        raise ValueError(
            f"noise_multiplier {noise_multiplier:g} over {update_length} coordinates needs Skellam noise above the "
            f"sampler's bound {mu_max:.3g} even at the smallest scale"
        )
    scale = reach / clip_norm
    while participant_skellam_mu(noise_multiplier, clip_norm, scale, members, dropout_margin, update_length) > mu_max:
        scale = math.nextafter(scale, 0.0)  # float rounding went up: step down
    return scale


def check_fixed_point(
    clip_norm: float, members: int, noise_multiplier: float = 0.0, dropout_margin: float = 0.0, update_length: int = 0,
    wire_bits: int = 32,
) -> float:
    """The fixed-point scale for a bucket of `members`; ValueError if it cannot be planned.

    Without noise: the largest scale at which n inputs cannot overflow 32 bits. With distributed
    DP (`noise_multiplier` > 0) the plan also keeps room for the noise and bounds each member's
    Skellam parameter (module docstring). `update_length` d (0 = not known yet, as at config load)
    adds the rounding term. `wire_bits` 16: n rotated update coordinates fit 16 bits, the weight
    slot 32 (module docstring). Coordinator and config both plan here; participants get the scale.
    """
    if wire_bits not in WIRE_WIDTHS:
        raise ValueError(f"wire_bits must be one of {WIRE_WIDTHS}, got {wire_bits}")
    norm = input_clip_norm(clip_norm)
    if wire_bits == 16:
        if noise_multiplier:
            raise ValueError("distributed DP noise does not fit the 16-bit wire (module docstring); use 32 bits")
        scale = choose_scale(rotated_bound(clip_norm, update_length) if update_length else clip_norm, members, 16)
        check_no_overflow(norm, members, scale)  # the weight slot, in 32 bits
        return scale
    if noise_multiplier == 0:
        scale = choose_scale(norm, members)
        check_no_overflow(norm, members, scale)
        return scale
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier) and 0 <= dropout_margin < 1 and update_length >= 0):
        raise ValueError(f"need noise_multiplier > 0, 0 <= dropout_margin < 1, update_length >= 0; got {noise_multiplier}, {dropout_margin}, {update_length}")
    extra = noise_headroom(noise_multiplier, dropout_margin)
    rounding = math.ceil(NOISE_TAIL_SIGMAS * noise_multiplier * math.sqrt(update_length) / math.sqrt(1.0 - dropout_margin)) + 1
    try:
        scale = choose_scale(norm, members + extra, reserve=rounding)
    except ValueError as err:
        raise ValueError(
            f"a bucket of {members} with noise multiplier {noise_multiplier:g} (dropout margin {dropout_margin:g}) needs the "
            f"range of {members + extra} members (a 10-sigma noise tail is {extra} members' worth), which 32-bit fixed "
            f"point cannot hold ({err})"
        ) from None
    scale = min(scale, _skellam_scale_cap(noise_multiplier, clip_norm, members, dropout_margin, update_length))
    tail = math.ceil(NOISE_TAIL_SIGMAS * sum_noise_std(noise_multiplier, clip_norm, scale, dropout_margin, update_length) * (1 + 1e-12))
    check_no_overflow(norm, members, scale, reserve=tail)  # exact, in integers: the plan holds
    return scale


@dataclass(frozen=True)
class RunBinding:
    """What every member of an instance must have received with its train instruction (sha256 hex).

    Bound into the instance's context, so members given a different run configuration or global
    adapter derive different keys and cannot sum (Pasquini et al., CCS 2022: a server that hands
    one member a crafted model can otherwise read that member's update out of the sum).
    Empty strings in tests and benchmarks that hold updates without a train instruction. With
    [distillation] the soft targets the instruction carried are bound too (`targets_sha256`; left out
    of the context when there are none, so other runs' contexts are as they were).
    """

    config_sha256: str = ""
    adapter_sha256: str = ""
    targets_sha256: str = ""


def round_context(
    server_round: int, weight_ref: float, noise_multiplier: float = 0.0, dropout_margin: float = 0.0,
    binding: RunBinding = RunBinding(),
) -> str:
    """The round's public parameters as the protocol binds them (`SetupRequest.context`).

    Canonical JSON with the floats written exactly, so coordinator and participant derive the
    same key schedule from the same values, and different keys from any difference. With
    distributed DP the noise parameters are bound too, so the members of a bucket either all
    calibrate their noise shares alike or cannot unmask at all; the run binding always is.
    """
    bound: dict[str, object] = {"server_round": server_round, "weight_ref": float(weight_ref).hex(), **dataclasses.asdict(binding)}
    if not binding.targets_sha256:
        del bound["targets_sha256"]
    if noise_multiplier:
        bound |= {"noise_multiplier": float(noise_multiplier).hex(), "dropout_margin": float(dropout_margin).hex()}
    return json.dumps(bound, sort_keys=True)


def context_noise(context: dict) -> tuple[float, float]:
    """(noise_multiplier, dropout_margin) bound in a parsed round context ((0, 0) without DP)."""
    if "noise_multiplier" not in context:
        return 0.0, 0.0
    return float.fromhex(context["noise_multiplier"]), float.fromhex(context["dropout_margin"])


def context_binding(context: dict) -> RunBinding:
    """The run binding in a parsed round context (KeyError if it has none)."""
    return RunBinding(str(context["config_sha256"]), str(context["adapter_sha256"]), str(context.get("targets_sha256", "")))


def weighted_input(
    update: np.ndarray, num_examples: int, weight_ref: float, clip_norm: float, widest: float | None = None
) -> np.ndarray:
    """The float64 vector a participant masks: [w * clip(update, C), w * C] (see module doc).

    `widest` (a simulated attacker's): its input may lie anywhere in the encoding's range. Its
    weight is its claim over the reference, uncapped, its update unclipped, and the whole vector is
    scaled down, keeping its direction, only to L2 norm `widest` (`fedlora.secagg.fixedpoint.widest_clip`).
    """
    if num_examples <= 0:
        raise ValueError(f"example count {num_examples} is not positive")
    if not weight_ref > 0:
        raise ValueError(f"weight reference {weight_ref} is not positive")
    weight = num_examples / weight_ref
    if widest is None:
        weight, update = min(weight, 1.0), clip(update, clip_norm)  # float64 copy; raises on NaN/inf
    out = np.empty(np.size(update) + 1, dtype=np.float64)
    np.multiply(np.ravel(update), weight, out=out[:-1])
    out[-1] = weight * clip_norm
    return out if widest is None else clip(out, widest)


def split_weighted_sum(total: np.ndarray, clip_norm: float, weight_ref: float) -> tuple[np.ndarray, float]:
    """Decoded secure sum -> (sum_i n_i clip(x_i), sum_i n_i), in example units (float64)."""
    return total[:-1] * weight_ref, float(total[-1]) / clip_norm * weight_ref
