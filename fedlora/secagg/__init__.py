"""Secure aggregation (SecAgg+, Bell et al. CCS 2020; Bonawitz et al. CCS 2017).

Pure Python/numpy, no Flower: the coordinator relays the plain-data messages of
`messages` between a `SecAggServer` (one per bucket) and the stage functions of
`participant` (`setup`, `share_keys`, `mask_input`, `unmask`); every key is signed with its
owner's long-term identity and checked against a roster (`identity`).
"""

from . import crypto, participant, shamir
from .buckets import assign_buckets, assign_named_buckets, draw_bucket_secret
from .errors import SecAggAbort, SecAggCoordinatorFault, SecAggError, SecAggProtocolError
from .fixedpoint import check_no_overflow, choose_scale, clip, decode, encode, error_bound
from .graph import communication_graph, default_degree, default_threshold
from .local import run_secure_sum
from .messages import (
    KeysAdvert,
    KeysRelay,
    MaskedInput,
    Message,
    ParticipantState,
    SetupRequest,
    SharesRelay,
    SharesUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from .prg import apply_mask, expand_mask
from .server import SecAggServer, SumResult

__all__ = [
    "KeysAdvert",
    "KeysRelay",
    "MaskedInput",
    "Message",
    "ParticipantState",
    "SecAggAbort",
    "SecAggCoordinatorFault",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggServer",
    "SetupRequest",
    "SharesRelay",
    "SharesUpload",
    "SumResult",
    "UnmaskRequest",
    "UnmaskResponse",
    "apply_mask",
    "assign_buckets",
    "assign_named_buckets",
    "check_no_overflow",
    "choose_scale",
    "clip",
    "communication_graph",
    "crypto",
    "decode",
    "default_degree",
    "default_threshold",
    "draw_bucket_secret",
    "encode",
    "error_bound",
    "expand_mask",
    "participant",
    "run_secure_sum",
    "shamir",
]
