"""Shamir t-of-n secret sharing of short byte strings (Shamir, CACM 1979), with
error-correcting reconstruction (`reconstruct`) that names wrong shares.

Used to share each participant's self-mask seed and masking private key with
its neighbours so the server can recover exactly one of them per participant
after dropouts (Bonawitz et al., CCS 2017). The field is GF(p) with the
Mersenne prime p = 2^521 - 1, larger than any 64-byte secret, so a 32-byte key
is shared whole (no folding, no splitting into chunks).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
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
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in x_coords}


@dataclass(frozen=True)
class Reconstruction:
    """A recovered secret and the sorted x coordinates whose shares were wrong."""

    secret: bytes
    bad: list[int]


def combine(shares: dict[int, bytes], t: int) -> bytes:
    """Recover the secret from the `t` lowest-x shares; any others are ignored.

    ValueError on fewer than `t` shares or a malformed result (wrong shares);
    `reconstruct` uses every share and names the wrong ones instead.
    """
    _check_enough(shares, t)
    return _secret(_interpolate(_points(sorted(shares.items())[:t]))[0])


def reconstruct(shares: dict[int, bytes], t: int) -> Reconstruction:
    """Recover the secret from every share given, naming the wrong ones.

    A single bad share makes `combine` fail (or lie), and the server could only
    abort the whole bucket; here the shares are a Reed-Solomon codeword, so up
    to e = floor((n - t) / 2) wrong ones are corrected and reported in `bad`,
    letting the server blame the holders that sent them. Decoding uses the
    Berlekamp-Welch algorithm (Welch & Berlekamp, US patent 4,633,470, 1986;
    exposition in Gemmell & Sudan, "Highly resilient correctors for polynomials",
    IPL 43(4), 1992). When all shares agree (the usual case) it costs one
    interpolation plus one evaluation per extra share.
    """
    _check_enough(shares, t)
    points = _points(sorted(shares.items()))
    n, e = len(points), (len(points) - t) // 2
    poly: list[int] | None = _interpolate(points[:t])
    if any(_evaluate(poly, x) != y for x, y in points[t:]):
        poly = _berlekamp_welch(points, t, e)
    if poly is None:
        raise ValueError(
            f"cannot reconstruct from {n} shares with threshold t={t}: "
            f"more than {e} (floor((n - t) / 2)) of them are wrong"
        )
    bad = [x for x, y in points if _evaluate(poly, x) != y]
    return Reconstruction(secret=_secret(poly[0]), bad=bad)


def _check_enough(shares: dict[int, bytes], t: int) -> None:
    if t < 1:
        raise ValueError(f"threshold t={t} must be at least 1")
    if len(shares) < t:
        raise ValueError(f"need at least t={t} shares to reconstruct, got {len(shares)}")


def _points(items: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    for x, share in items:
        if len(share) != SHARE_BYTES:
            raise ValueError(f"share for x={x} must be {SHARE_BYTES} bytes, got {len(share)}")
        if not 0 < x < PRIME:
            raise ValueError(f"share x coordinate {x} is not in [1, 2^521 - 1)")
    return [(x, int.from_bytes(share, "big")) for x, share in items]


def _secret(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    if raw[0] != 1 or not 2 <= len(raw) <= MAX_SECRET_BYTES + 1:
        raise ValueError("shares are inconsistent: reconstruction is not a valid secret")
    return raw[1:]


def _evaluate(coeffs: list[int], x: int) -> int:
    y = 0
    for c in reversed(coeffs):  # Horner; coefficients lowest degree first
        y = (y * x + c) % PRIME
    return y


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the degree < k polynomial through k points.

    Lagrange form sum_j y_j l(X) / ((X - x_j) l'(x_j)), l = prod (X - x_j), in exact
    integers: x coordinates are small participant indices, so l stays small and
    this costs about what Lagrange interpolation at 0 alone does.
    """
    k = len(points)
    ell = [1]
    for x_j, _ in points:  # ell *= (X - x_j)
        ell = [a - x_j * b for a, b in zip([0, *ell], [*ell, 0])]
    acc = [0] * k
    for x_j, y_j in points:
        basis, carry = [0] * k, 1
        for d in range(k - 1, -1, -1):  # synthetic division ell / (X - x_j)
            basis[d] = carry
            carry = ell[d] + x_j * carry
        den = math.prod(x_j - x_m for x_m, _ in points if x_m != x_j)
        scale = y_j * pow(den, -1, PRIME) % PRIME
        acc = [a + scale * b for a, b in zip(acc, basis)]
    return [a % PRIME for a in acc]


def _berlekamp_welch(points: list[tuple[int, int]], t: int, e: int) -> list[int] | None:
    """P = Q / E of degree < t off at most e points, or None if there is none.

    Q (degree < t + e) and monic E (degree e, zero at the wrong shares) solve
    Q(x_i) = y_i E(x_i); with at most e wrong shares every solution gives that P.
    """
    rows = []
    for x, y in points:  # unknowns q_0..q_{t+e-1}, then e_0..e_{e-1}; rhs y x^e
        powers = [1]
        for _ in range(t + e - 1):
            powers.append(powers[-1] * x % PRIME)
        error_part = [-y * p % PRIME for p in powers[:e]]
        rows.append([*powers, *error_part, y * powers[e] % PRIME])
    solution = _solve(rows)
    if solution is None:
        return None
    poly, remainder = _divide_monic(solution[: t + e], [*solution[t + e :], 1])
    if any(remainder):  # deg poly < t holds by construction (deg Q < t + e, deg E = e)
        return None
    return poly if sum(_evaluate(poly, x) != y for x, y in points) <= e else None


def _divide_monic(num: list[int], den: list[int]) -> tuple[list[int], list[int]]:
    """Quotient and remainder of num / den, den monic (coefficients lowest first)."""
    rem, d = num[:], len(den) - 1
    quotient = [0] * max(len(num) - d, 0)
    for k in range(len(quotient) - 1, -1, -1):
        c = quotient[k] = rem[k + d]
        if c:
            for i in range(d + 1):
                rem[k + i] = (rem[k + i] - c * den[i]) % PRIME
    return quotient, rem[:d]


def _solve(rows: list[list[int]]) -> list[int] | None:
    """Any solution mod p of the augmented system `rows` (last column: rhs, rows are
    overwritten), free variables set to 0; None if the system is inconsistent."""
    width = len(rows[0]) - 1
    pivots: list[int] = []
    for col in range(width):
        r = len(pivots)
        found = next((i for i in range(r, len(rows)) if rows[i][col]), None)
        if found is None:
            continue
        rows[r], rows[found] = rows[found], rows[r]
        inv = pow(rows[r][col], -1, PRIME)
        pivot = rows[r] = [v * inv % PRIME for v in rows[r]]
        for i in range(r + 1, len(rows)):
            f = rows[i][col]
            if f:
                rows[i] = [(a - f * b) % PRIME for a, b in zip(rows[i], pivot)]
        pivots.append(col)
    if any(row[width] for row in rows[len(pivots) :]):
        return None
    solution = [0] * width
    for r in range(len(pivots) - 1, -1, -1):  # back substitution
        row, col = rows[r], pivots[r]
        known = sum(row[c] * solution[c] for c in range(col + 1, width))
        solution[col] = (row[width] - known) % PRIME
    return solution
