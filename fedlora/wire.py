"""The records a coordinator and a participant exchange, in one place for both sides.

Vectors travel as float32 `Array`s (bf16 has no numpy form); the round's configuration
travels as TOML text so a participant trains exactly what the coordinator resolved.
"""

from __future__ import annotations

import hashlib
import io
import math
import tomllib
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.config import Config, build_config, config_sha256


@dataclass(frozen=True)
class Instruction:
    """What the coordinator sends: the global adapter, the round and the run's config."""

    vector: np.ndarray
    server_round: int
    config: Config
    config_sha256: str  # of the TOML text as received: the run's identity (coordinator/outputs.py hashes the same text)
    adapter_sha256: str  # of the global adapter as received (`adapter_sha256`)
    soft_targets: np.ndarray | None = None  # [distillation]: the last round's mean predictions, P x C (none in round 1)

    @property
    def targets_sha256(self) -> str:
        """What secure aggregation binds of the soft targets (`RunBinding.targets_sha256`)."""
        return targets_sha256(self.soft_targets)


def adapter_sha256(vector: np.ndarray) -> str:
    """The global adapter's hash, over its float32 bytes as they travel."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def targets_sha256(targets: np.ndarray | None) -> str:
    """Distillation's soft targets' hash, over their float32 bytes as they travel ('' when there are none)."""
    return "" if targets is None else hashlib.sha256(np.ascontiguousarray(targets, dtype=np.float32).tobytes()).hexdigest()


def instruction_content(vector: np.ndarray, server_round: int, config_toml: str, soft_targets: np.ndarray | None = None) -> RecordDict:
    arrays = {"adapter": Array(np.ascontiguousarray(vector, dtype=np.float32))}
    if soft_targets is not None:  # federated distillation's targets for the public prompts
        arrays["soft_targets"] = Array(np.ascontiguousarray(soft_targets, dtype=np.float32))
    return RecordDict({"global": ArrayRecord(arrays), "round": ConfigRecord({"round": server_round, "config_toml": config_toml})})


MAX_CONFIG_BYTES = 64 * 1024  # a resolved config is ~2 KiB; anything far larger is not one


def read_instruction(content: RecordDict) -> Instruction:
    """The instruction in a message; KeyError/ValueError (TOML, config, size) if it is not one."""
    record = content["round"]
    text = str(record["config_toml"])
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"the run configuration is {len(text.encode())} bytes, over the {MAX_CONFIG_BYTES}-byte limit")
    config = build_config(tomllib.loads(text))
    vector = content["global"]["adapter"].numpy()
    targets = content["global"]["soft_targets"].numpy() if "soft_targets" in content["global"] else None
    return Instruction(vector, int(record["round"]), config, config_sha256(text), adapter_sha256(vector), targets)


def reply_content(metrics: dict[str, float], vector: np.ndarray | None = None) -> RecordDict:
    records: dict = {"metrics": MetricRecord(metrics)}
    if vector is not None:
        records["update"] = ArrayRecord({"delta": Array(np.ascontiguousarray(vector, dtype=np.float32))})
    return RecordDict(records)


def array_view(array: Array) -> np.ndarray:
    """A read-only, zero-copy numpy view of a Flower Array's .npy bytes.

    `Array.numpy()` goes through `np.load` on a BytesIO, which copies in small chunks (about
    1 GB/s here): for 16M-parameter masked vectors that was most of the coordinator's time, and
    a copy doubles what a round's uploads hold in memory.
    """
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def read_reply(content: RecordDict) -> tuple[np.ndarray | None, dict[str, float]]:
    """The update (None for evaluation replies; a read-only view of the message's bytes) and the
    metrics; KeyError if malformed."""
    metrics = dict(content["metrics"])
    vector = array_view(content["update"]["delta"]) if "update" in content else None
    return vector, metrics
