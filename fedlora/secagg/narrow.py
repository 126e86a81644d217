"""The 16-bit wire: which coordinates travel in 16 bits, how they are packed, summed and read.

In the style of Kairouz, Liu & Steinke (ICML 2021, "The Distributed Discrete Gaussian"), a
16-bit instance (`wire_bits = 16`) rotates the first `vector_length - 1` input coordinates
(the update; `fedlora.secagg.plan` puts its weight slot last) with `rotation`, so that none
carries much of the norm, and clips each one to the member's share of the signed 16-bit range,
`cap = (2^15 - 1) // n` integers: the honest sum of n members can never wrap. The scale is
planned so that this clip bites with probability at most `rotation.ROTATION_FAILURE` per
update; when it does, it only shortens the vector.

Masking is unchanged, in Z_{2^32}: 2^16 divides 2^32, so the low 16 bits of a masked word are
the low 16 bits of (input + masks), and masks that cancel mod 2^32 cancel mod 2^16. A
participant sends the low 16 bits of each narrow coordinate and the weight and count slots as
whole 32-bit words (each as two uint16 words): one uint16 array of `vector_length + 3`. The
server adds the words into its uint32 sum zero-extended, unmasks as usual, and reads the low 16
bits of each narrow coordinate as int16; the slots keep all 32 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .crypto import rotation_seed

WIRE_WIDTHS = (32, 16)  # bits of an update coordinate on the wire
NARROW_MAX = (1 << 15) - 1  # largest |sum| a narrow coordinate can hold


@dataclass(frozen=True)
class Narrow:
    """How one 16-bit instance narrows its inputs."""

    length: int  # leading input coordinates rotated and sent in 16 bits
    seed: bytes  # public seed of the rotation (`crypto.rotation_seed`)
    cap: int  # largest |integer| one member puts on a narrow coordinate


def narrowing(wire_bits: int, vector_length: int, members: int, params: bytes) -> Narrow | None:
    """The narrowing of an instance (None on the 32-bit wire); ValueError if it has none."""
    if wire_bits not in WIRE_WIDTHS:
        raise ValueError(f"wire_bits must be one of {WIRE_WIDTHS}, got {wire_bits}")
    if wire_bits == 32:
        return None
    if vector_length < 2 or not 1 <= members <= NARROW_MAX:
        raise ValueError(
            f"a 16-bit wire needs an update and a weight slot (vector_length >= 2) and at most {NARROW_MAX} "
            f"members, got {vector_length}, {members}"
        )
    return Narrow(vector_length - 1, rotation_seed(params), NARROW_MAX // members)


def wire_shape(narrow: Narrow | None, vector_length: int) -> tuple[np.dtype, int]:
    """dtype and length of a masked input (input and count slot) on this wire."""
    if narrow is None:
        return np.dtype(np.uint32), vector_length + 1
    return np.dtype(np.uint16), narrow.length + 2 * (vector_length + 1 - narrow.length)


def pack(masked: np.ndarray, narrow: Narrow | None) -> np.ndarray:
    """A masked uint32 vector as it travels: low 16 bits of the narrow words, the rest whole."""
    if narrow is None:
        return masked
    return np.concatenate([masked[: narrow.length].astype(np.uint16), masked[narrow.length :].view(np.uint16)])


def add_packed(total: np.ndarray, y: np.ndarray, narrow: Narrow | None) -> None:
    """total += y mod 2^32, in place, the narrow words zero-extended."""
    if narrow is None:
        np.add(total, y, out=total)
        return
    m = narrow.length
    np.add(total[:m], y[:m], out=total[:m])
    np.add(total[m:], np.frombuffer(y[m:].tobytes(), dtype=np.uint32), out=total[m:])


def narrowed(total: np.ndarray, narrow: Narrow | None) -> np.ndarray:
    """An unmasked uint32 sum with each narrow coordinate reduced to its low 16 bits, sign-extended:
    every coordinate then decodes as int32 (`fixedpoint.decode`)."""
    if narrow is None:
        return total
    out = total.copy()
    out[: narrow.length] = total[: narrow.length].astype(np.uint16).view(np.int16).astype(np.int32).view(np.uint32)
    return out
