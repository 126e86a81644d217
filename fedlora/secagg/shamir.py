"""Shamir t-of-n secret sharing of short byte strings (Shamir, CACM 1979).

Used to share each participant's self-mask seed and masking private key with
its neighbours so the server can recover exactly one of them per participant
after dropouts (Bonawitz et al., CCS 2017). The field is GF(p) with the
Mersenne prime p = 2^521 - 1, larger than any 64-byte secret, so a 32-byte key
is shared whole (no folding, no splitting into chunks).
"""

from __future__ import annotations

import secrets
from typing import Protocol

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): a field element, big-endian
MAX_SECRET_BYTES = 64
_SYSTEM_RNG = secrets.SystemRandom()


class _RandRange(Protocol):
    def randrange(self, start: int, /) -> int: ...


def split(
    secret: bytes, t: int, x_coords: list[int], rng: _RandRange | None = None
) -> dict[int, bytes]:
    """Share `secret` so that any `t` of the returned {x: share} recover it.

    x coordinates must be distinct and in [1, p); the secret is prefixed with a
    0x01 byte inside the field element so leading zero bytes survive `combine`.
    """
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(x_coords)) != len(x_coords):
        raise ValueError("x coordinates must be distinct")
    if any(not 0 < x < PRIME for x in x_coords):
        raise ValueError("x coordinates must be in [1, 2^521 - 1)")
    if not 1 <= t <= len(x_coords):
        raise ValueError(f"threshold t={t} must be in [1, {len(x_coords)}] (number of shares)")
    draw: _RandRange = rng or _SYSTEM_RNG
    coeffs = [int.from_bytes(b"\x01" + secret, "big")]
    coeffs += [draw.randrange(PRIME) for _ in range(t - 1)]
    shares = {}
    for x in x_coords:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: dict[int, bytes], t: int) -> bytes:
    """Recover the secret from at least `t` shares by Lagrange interpolation at 0.

    Raises ValueError on fewer than `t` shares or on a result that is not a
    well-formed secret (a sign of wrong or tampered shares).
    """
    if len(shares) < t:
        raise ValueError(f"need at least t={t} shares to reconstruct, got {len(shares)}")
    points = sorted(shares.items())[:t]
    xs = [x for x, _ in points]
    value = 0
    for i, (x_i, share) in enumerate(points):
        if len(share) != SHARE_BYTES:
            raise ValueError(f"share for x={x_i} must be {SHARE_BYTES} bytes, got {len(share)}")
        y_i = int.from_bytes(share, "big")
        num, den = 1, 1
        for j, x_j in enumerate(xs):
            if j != i:
                num = num * x_j % PRIME
                den = den * (x_j - x_i) % PRIME
        value = (value + y_i * num * pow(den, -1, PRIME)) % PRIME
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    if raw[0] != 1 or not 2 <= len(raw) <= MAX_SECRET_BYTES + 1:
        raise ValueError("shares are inconsistent: reconstruction is not a valid secret")
    return raw[1:]
