"""The records a coordinator and a participant exchange, in one place for both sides.

Vectors travel as float32 `Array`s (bf16 has no numpy form); the round's configuration
travels as TOML text so a participant trains exactly what the coordinator resolved.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.config import Config, build_config


@dataclass(frozen=True)
class Instruction:
    """What the coordinator sends: the global adapter, the round and the run's config."""

    vector: np.ndarray
    server_round: int
    config: Config


def instruction_content(vector: np.ndarray, server_round: int, config_toml: str) -> RecordDict:
    return RecordDict(
        {
            "global": ArrayRecord({"adapter": Array(np.ascontiguousarray(vector, dtype=np.float32))}),
            "round": ConfigRecord({"round": server_round, "config_toml": config_toml}),
        }
    )


MAX_CONFIG_BYTES = 64 * 1024  # a resolved config is ~2 KiB; anything far larger is not one


def read_instruction(content: RecordDict) -> Instruction:
    """The instruction in a message; KeyError/ValueError (TOML, config, size) if it is not one."""
    record = content["round"]
    text = str(record["config_toml"])
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"the run configuration is {len(text.encode())} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    config = build_config(tomllib.loads(text))
    return Instruction(content["global"]["adapter"].numpy(), int(record["round"]), config)


def reply_content(metrics: dict[str, float], vector: np.ndarray | None = None) -> RecordDict:
    records: dict = {"metrics": MetricRecord(metrics)}
    if vector is not None:
        records["update"] = ArrayRecord({"delta": Array(np.ascontiguousarray(vector, dtype=np.float32))})
    return RecordDict(records)


def read_reply(content: RecordDict) -> tuple[np.ndarray | None, dict[str, float]]:
    """The update (None for evaluation replies) and the metrics; KeyError if malformed."""
    metrics = dict(content["metrics"])
    vector = content["update"]["delta"].numpy() if "update" in content else None
    return vector, metrics
