"""Mask expansion: a 256-bit seed -> a uint32 vector, with AES-256-CTR.

Bonawitz et al. (CCS 2017) expand each self-mask and pairwise seed with a PRG.
We use AES-256-CTR from `cryptography` over the full 256-bit seed (Flower's
SecAgg+ folds seeds to 32 bits and uses Mersenne Twister, which is neither
secure nor fast). `Cipher.update_into` writes the keystream straight into a
numpy buffer: no per-call bytes allocation, ~6x faster than `update()`.
Each seed is used as a key exactly once per round, so a zero nonce is safe.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SEED_BYTES = 32
CHUNK_BYTES = 1 << 20  # 1 MiB: keystream chunk stays in cache while it is added
_ZEROS = memoryview(bytes(CHUNK_BYTES))
_NONCE = bytes(16)


def _encryptor(seed: bytes) -> CipherContext:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"mask seed must be {SEED_BYTES} bytes, got {len(seed)!r}")
    return Cipher(algorithms.AES(seed), modes.CTR(_NONCE)).encryptor()


def _keystream_chunks(seed: bytes, length: int, scratch: np.ndarray) -> Iterator[tuple[int, int]]:
    """Fill `scratch` (uint32) with successive keystream words; yield (start, stop) each time."""
    enc = _encryptor(seed)
    raw = scratch.view(np.uint8)
    step = scratch.size
    for start in range(0, length, step):
        stop = min(length, start + step)
        nbytes = 4 * (stop - start)
        enc.update_into(_ZEROS[:nbytes], raw[:nbytes].data)
        yield start, stop


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """Return `length` pseudorandom uint32 words derived from a 32-byte seed."""
    enc = _encryptor(seed)
    out = np.empty(length, dtype=np.uint32)
    raw = out.view(np.uint8)
    for start in range(0, raw.size, CHUNK_BYTES):
        stop = min(raw.size, start + CHUNK_BYTES)
        enc.update_into(_ZEROS[: stop - start], raw[start:stop].data)
    return out


def apply_mask(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """Add (sign=+1) or subtract (sign=-1) PRG(seed) into `acc` in place, mod 2^32.

    Equal to `acc += sign * expand_mask(seed, acc.size)` but never materialises
    the whole mask: only one cache-sized chunk of keystream exists at a time.
    """
    if acc.dtype != np.uint32 or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("accumulator must be a contiguous 1-D uint32 array")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    op = np.add if sign == 1 else np.subtract
    scratch = np.empty(min(acc.size, CHUNK_BYTES // 4) or 1, dtype=np.uint32)
    for start, stop in _keystream_chunks(seed, acc.size, scratch):
        view = acc[start:stop]
        op(view, scratch[: stop - start], out=view)
