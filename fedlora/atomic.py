"""Crash-safe file replacement: a reader sees the old content or the new, never a torn file.

The new content goes to a temporary sibling created with its final permissions (a private key is
never readable by others, even briefly), is flushed to disk, and is renamed over the target
(atomic on POSIX within one file system); the directory is then synced so the rename itself
survives a power loss. `exclusive=True` publishes with a hard link instead, which fails if the
target appeared meanwhile, so an existing key is never clobbered.

An append-only log (a site's events.jsonl) gets each line with `append_line`: one write to a
descriptor opened for appending, so writers never interleave within a line, flushed before it
returns; a crash can leave at most a last line without its newline, which readers skip.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644, *, exclusive: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; not every platform can open a directory, which is harmless."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def append_line(path: Path, line: str, mode: int = 0o644) -> None:
    """Append `line` and a newline in one write, on disk before returning."""
    data = (line + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        if os.write(descriptor, data) != len(data):
            raise OSError(f"{path}: only part of a line was written (disk full?)")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: Path, payload: Any, mode: int = 0o644) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file's content, or `default` when it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default
