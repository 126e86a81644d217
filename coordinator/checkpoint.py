"""The coordinator's state after each completed round, written so a `kill -9` loses nothing.

A checkpoint holds the global adapter, the server optimiser's state (its moment arrays), the
user-level DP accountant, the reputation book, the round number and the config hash, in one
`.npz` file replaced atomically (fedlora/atomic.py): after a crash the file is the last
completed round's, whole. Arrays are stored as arrays; everything else as one JSON document.

Randomness needs no saved state: sampling and simulated attacks are drawn from generators
seeded by (federation.seed, round), so a resumed round draws what it would have; DP noise,
Poisson sampling and secure aggregation's bucket secret come fresh from the OS CSPRNG and must
never be replayed (a re-run secure round draws new buckets; the audit log keeps both draws).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.atomic import write_bytes_atomic

CHECKPOINT = "checkpoint.npz"
VERSION_CHECKPOINTS = "checkpoints"  # <version>.npz: the state after each adapter version
_STATE = "__state__"


def _split_arrays(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    """`value` with every numpy array replaced by a reference into `arrays`."""
    if isinstance(value, np.ndarray):
        arrays[path] = value
        return {"__array__": path}
    if isinstance(value, dict):
        return {key: _split_arrays(item, arrays, f"{path}/{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(item, arrays, f"{path}/{index}") for index, item in enumerate(value)]
    return value


def _join_arrays(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return np.array(arrays[value["__array__"]])
        return {key: _join_arrays(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_join_arrays(item, arrays) for item in value]
    return value


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (JSON-able values and numpy arrays, nested) atomically."""
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps(_split_arrays(state, arrays, ""), allow_nan=True).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **{_STATE: np.frombuffer(document, dtype=np.uint8)}, **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state written by `save_checkpoint`; FileNotFoundError or ValueError with the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (start the run without --resume)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            return _join_arrays(json.loads(stored[_STATE].tobytes()), stored)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # a torn zip is BadZipFile, an empty file EOFError
        raise ValueError(f"{path} is not a readable checkpoint: {err}") from err
