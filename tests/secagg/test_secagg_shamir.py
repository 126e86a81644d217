import contextlib
import itertools
import os
import random

import pytest

from fedlora.secagg import shamir


def test_any_t_of_n_recover_and_fewer_do_not():
    secret, t, xs = os.urandom(32), 4, [1, 2, 3, 7, 11, 1000]
    shares = shamir.split(secret, t, xs)
    for subset in itertools.combinations(xs, t):
        assert shamir.combine({x: shares[x] for x in subset}, t) == secret
    for subset in itertools.combinations(xs, t - 1):
        part = {x: shares[x] for x in subset}
        with pytest.raises(ValueError, match="at least"):
            shamir.combine(part, t)
        with contextlib.suppress(ValueError):  # claiming t-1 suffices must not give it
            assert shamir.combine(part, t - 1) != secret


def test_leading_zero_bytes_and_deterministic_rng():
    secret = bytes(31) + b"\x05"
    a = shamir.split(secret, 2, [1, 2, 3], rng=random.Random(1))
    b = shamir.split(secret, 2, [1, 2, 3], rng=random.Random(1))
    assert a == b
    assert shamir.combine({1: a[1], 3: a[3]}, 2) == secret


def test_tampered_share_gives_wrong_secret_or_error():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3])
    shares[2] = bytes(len(shares[2]) - 1) + b"\x01"
    with contextlib.suppress(ValueError):
        assert shamir.combine(shares, 3) != secret


def test_bad_parameters():
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"x" * 32, 2, [1, 1, 2])
    with pytest.raises(ValueError, match="x coordinates"):
        shamir.split(b"x" * 32, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"x" * 32, 4, [1, 2, 3])
