"""Base-model fingerprints that name what a model is, not how a library version happened to write it.

Sites compare fingerprints to agree that they fine-tune the same base (`model.sha256`, a
participant's `policy.allowed_base_sha256`, the base named in a signed manifest). Hashing the
files byte for byte made that depend on installed versions: `save_pretrained` stamps
`transformers_version` into config.json and writes library-specific safetensors headers, so
the same weights re-saved elsewhere looked like another model. This module hashes content
instead and imports nothing heavier than the standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "fedlora-model-fingerprint/2"
# Keys that record who wrote a config, or restate what the weights already say (their dtype),
# dropped at every depth of a JSON file named `*config*` (nested sub-configs carry them too).
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version",
    "__version__",  # sentence-transformers' stamp of the library versions that wrote the file
    "_name_or_path",
    "_commit_hash",
    "_from_model_config",
    "_attn_implementation_autoset",
    "torch_dtype",  # transformers < 4.56 ...
    "dtype",  # ... and after: the same fact, renamed; each tensor's own dtype is hashed
})
CHUNK = 1 << 20


@dataclass(frozen=True)
class Tensor:
    """One tensor of a safetensors file: where its bytes lie, and what they mean."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int


def model_directory_fingerprint(directory: Path) -> str:
    """SHA-256 of what defines the model in `directory` (format `fedlora-model-fingerprint/2`).

    Hashed, in sorted order, each record as one canonical JSON header line then its bytes:
    - every tensor of the `*.safetensors` files of a folder, as name, dtype, shape and data, so
      safetensors headers and metadata, tensor order and sharding (and `*.safetensors.index.json`)
      do not count;
    - every `.json` file parsed and re-serialised canonically (sorted keys, no whitespace),
      with `VOLATILE_CONFIG_KEYS` dropped from files named `*config*` (config.json,
      generation_config.json, tokenizer_config.json, config_sentence_transformers.json, ...);
    - every other file byte for byte (tokenizer.model, pytorch_model.bin, README.md, ...).
    Hidden files and folders (`.git`, `.cache/huggingface` download records) and `__pycache__`
    are skipped. So a copy of the directory, or the same model re-saved by another library
    version, keeps its fingerprint; any changed weight, shape, config value or tokenizer entry
    changes it. (A version that renames config keys, as transformers 5 did `rope_theta`, does
    change it: the config's text is what other sites load.) Weights and other files are streamed
    in chunks, only JSON files are read whole: a multi-gigabyte checkpoint is never in memory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory; a base model is a local Hugging Face model directory")
    digest = hashlib.sha256(FORMAT.encode() + b"\n")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not _skipped(p.relative_to(directory)))
    records: list[tuple[tuple[str, str], dict[str, Any], Any]] = []
    weights: dict[str, dict[str, Tensor]] = {}
    for path in files:
        relative = path.relative_to(directory).as_posix()
        if path.name.endswith(".safetensors.index.json"):
            continue  # which shard holds which tensor: the tensors themselves are hashed
        if path.suffix == ".safetensors":
            folder = path.parent.relative_to(directory).as_posix()
            _add_tensors(weights.setdefault(folder, {}), path)
        elif path.suffix == ".json" and (canonical := _canonical_json(path)) is not None:
            records.append(((relative, ""), {"json": relative, "bytes": len(canonical)}, canonical))
        else:
            records.append(((relative, ""), {"file": relative, "bytes": path.stat().st_size}, path))
    for folder, tensors in weights.items():
        for tensor in tensors.values():
            header = {"tensor": tensor.name, "folder": folder, "dtype": tensor.dtype, "shape": list(tensor.shape), "bytes": tensor.end - tensor.begin}
            records.append(((folder + "/*.safetensors", tensor.name), header, tensor))
    for _key, header, content in sorted(records, key=lambda record: record[0]):
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n")
        for chunk in _content(content):
            digest.update(chunk)
    return digest.hexdigest()


def _skipped(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in relative.parts)


def _canonical_json(path: Path) -> bytes | None:
    """The file's JSON, canonically serialised (volatile keys dropped from configs); None if not JSON."""
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if "config" in path.name:
        value = _without_volatile_keys(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _without_volatile_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_volatile_keys(item) for key, item in value.items() if key not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile_keys(item) for item in value]
    return value


def safetensors_index(path: Path) -> list[Tensor]:
    """The tensors of a safetensors file, read from its header only (the data stays on disk)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {length}, file size {size}); re-copy or remove it")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: unreadable safetensors header ({error}); re-copy or remove the file") from error
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + length + int(offset) for offset in info["data_offsets"])
        if not 8 + length <= begin <= end <= size:
            raise ValueError(f"{path}: tensor {name!r} lies outside the file (truncated copy?); re-copy it")
        tensors.append(Tensor(name, str(info["dtype"]), tuple(int(d) for d in info["shape"]), path, begin, end))
    return tensors


def _add_tensors(into: dict[str, Tensor], path: Path) -> None:
    for tensor in safetensors_index(path):
        if tensor.name in into:
            raise ValueError(
                f"tensor {tensor.name!r} is in both {into[tensor.name].path.name} and {path.name} of {path.parent}; "
                "a model directory holds each weight once (remove the stray file)"
            )
        into[tensor.name] = tensor


def _content(content: bytes | Path | Tensor) -> Iterator[bytes]:
    """The bytes of a record, in chunks."""
    if isinstance(content, bytes):
        yield content
        return
    path, begin, end = (content, 0, None) if isinstance(content, Path) else (content.path, content.begin, content.end)
    with path.open("rb") as handle:
        handle.seek(begin)
        remaining = end - begin if end is not None else None
        while remaining is None or remaining > 0:
            chunk = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
