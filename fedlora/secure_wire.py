"""Secure-aggregation messages as Flower records, for both sides (the secagg twin of `wire.py`).

Each SecAgg+ stage is one Flower message exchange of type `query.secagg_<stage>`. The
protocol message (`fedlora.secagg.messages`, plain fields plus at most one uint32 array)
travels as a ConfigRecord `secagg` and an ArrayRecord `secagg_arrays`; the server round, which
the handlers route by, rides in a ConfigRecord `round`. Everything the protocol depends on
travels inside the protocol message, where it is bound into the keys. The masked vector
travels as uint32, 4 bytes per parameter, or on the 16-bit wire (`secagg.wire_bits = 16`) as
uint16, 2 bytes per parameter (`fedlora.secagg.narrow`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora.secagg import messages as sa
from fedlora.wire import array_view


@dataclass(frozen=True)
class Stage:
    name: str
    request: type[sa.Message]
    reply: type[sa.Message]

    @property
    def message_type(self) -> str:
        return f"query.secagg_{self.name}"

    @property
    def action(self) -> str:
        return f"secagg_{self.name}"


STAGES = (
    Stage("setup", sa.SetupRequest, sa.KeysAdvert),
    Stage("share_keys", sa.KeysRelay, sa.SharesUpload),
    Stage("mask_input", sa.SharesRelay, sa.MaskedInput),
    Stage("consistency", sa.SurvivorsRequest, sa.SurvivorsSignature),
    Stage("unmask", sa.UnmaskRequest, sa.UnmaskResponse),
)
STAGE = {stage.name: stage for stage in STAGES}


def protocol_content(msg: sa.Message, meta: dict[str, Any] | None = None) -> RecordDict:
    """A protocol message (and optional public round parameters) as a Flower RecordDict."""
    fields, arrays = {}, {}
    for key, value in msg.to_dict().items():
        if isinstance(value, np.ndarray):
            arrays[key] = Array(np.ascontiguousarray(value))
        else:
            fields[key] = value
    records: dict[str, Any] = {"secagg": ConfigRecord(fields)}
    if arrays:
        records["secagg_arrays"] = ArrayRecord(arrays)
    if meta:
        records["round"] = ConfigRecord(meta)
    return RecordDict(records)


def read_protocol(content: RecordDict, cls: type[sa.M], sender: int | None = None) -> sa.M:
    """Rebuild and type-check a protocol message; SecAggProtocolError blames `sender` if malformed."""
    data = dict(content["secagg"])
    if "secagg_arrays" in content:
        data.update({key: array_view(array) for key, array in content["secagg_arrays"].items()})
    return cls.from_dict(data, sender)


def read_meta(content: RecordDict) -> dict[str, Any]:
    return dict(content["round"]) if "round" in content else {}


def _value_bytes(value: Any) -> int:
    if isinstance(value, (bytes, str)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8  # int, float, bool


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records: array data, bytes and strings, 8 per number.

    Keys and Flower's framing are not counted (they are the same for any protocol on Flower).
    """
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(array.data) for array in record.values())
        else:
            total += sum(_value_bytes(value) for value in record.values())
    return total
