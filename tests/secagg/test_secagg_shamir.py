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


def test_default_coefficients_are_fresh_for_every_split():
    # Coefficients from a seeded or secret-derived generator would repeat: a party that saw
    # one sharing could then predict the shares of the next.
    secret, xs = os.urandom(32), [1, 2, 3, 4]
    first, second = shamir.split(secret, 3, xs), shamir.split(secret, 3, xs)
    assert all(first[x] != second[x] for x in xs)
    assert len({first[x] for x in xs}) == len(xs)


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


# --- reconstruct: Berlekamp-Welch decoding that names wrong shares ---


def _shares(n, t, seed):
    rng = random.Random(seed)
    secret = rng.randbytes(32)
    return secret, shamir.split(secret, t, list(range(1, n + 1)), rng=rng)


def _corrupt(shares, t, xs, kind, rng):
    """Replace the shares at `xs` with random bytes or with t-of-n shares of another secret."""
    other = shamir.split(rng.randbytes(32), t, sorted(shares), rng=rng)
    for x in xs:
        shares[x] = rng.randbytes(shamir.SHARE_BYTES) if kind == "random" else other[x]


@pytest.mark.parametrize(("n", "t"), [(1, 1), (5, 3), (10, 4), (45, 23)])
def test_consistent_shares_reconstruct_with_no_bad_shares(n, t):
    secret, shares = _shares(n, t, seed=n)
    assert shamir.reconstruct(shares, t) == shamir.Reconstruction(secret=secret, bad=[])


def test_exactly_t_shares_reconstruct_without_redundancy():
    secret, shares = _shares(9, 5, seed=1)
    part = {x: shares[x] for x in (2, 3, 5, 7, 9)}
    assert shamir.reconstruct(part, 5) == shamir.Reconstruction(secret=secret, bad=[])


@pytest.mark.parametrize("kind", ["random", "other secret"])
def test_one_wrong_share_is_identified_and_the_secret_still_recovered(kind):
    rng = random.Random(7)
    for t in (1, 2, 5, 23):
        secret, shares = _shares(t + 2, t, seed=t)
        wrong = rng.choice(sorted(shares))
        _corrupt(shares, t, [wrong], kind, rng)
        result = shamir.reconstruct(shares, t)
        assert result.secret == secret
        assert result.bad == [wrong]


@pytest.mark.parametrize("kind", ["random", "other secret"])
@pytest.mark.parametrize(("n", "t"), [(4, 2), (7, 3), (10, 4), (11, 4), (41, 21), (45, 23)])
def test_floor_half_the_redundancy_in_wrong_shares_is_identified(n, t, kind):
    rng = random.Random(n * 100 + t)
    secret, shares = _shares(n, t, seed=n)
    wrong = sorted(rng.sample(sorted(shares), (n - t) // 2))
    _corrupt(shares, t, wrong, kind, rng)
    assert shamir.reconstruct(shares, t) == shamir.Reconstruction(secret=secret, bad=wrong)


def test_wrong_shares_among_the_lowest_x_are_identified_too():
    secret, shares = _shares(41, 21, seed=3)
    _corrupt(shares, 21, list(range(1, 11)), "random", random.Random(3))
    assert shamir.reconstruct(shares, 21).bad == list(range(1, 11))


@pytest.mark.parametrize("kind", ["random", "other secret"])
@pytest.mark.parametrize(("n", "t"), [(4, 3), (7, 3), (10, 4), (41, 21), (45, 23)])
def test_one_wrong_share_too_many_raises(n, t, kind):
    rng = random.Random(n * 100 + t + 1)
    e = (n - t) // 2
    _, shares = _shares(n, t, seed=n)
    _corrupt(shares, t, rng.sample(sorted(shares), e + 1), kind, rng)
    with pytest.raises(ValueError, match=rf"{n} shares with threshold t={t}: more than {e} "):
        shamir.reconstruct(shares, t)


def test_result_depends_on_which_shares_are_given_not_their_order():
    secret, shares = _shares(6, 3, seed=5)
    wrong = 4
    _corrupt(shares, 3, [wrong], "random", random.Random(5))
    for k in range(3, 7):
        for subset in itertools.combinations(sorted(shares), k):
            for order in itertools.permutations(subset):
                given = {x: shares[x] for x in order}
                if wrong not in subset:
                    assert shamir.reconstruct(given, 3) == shamir.Reconstruction(secret, [])
                elif k >= 5:  # floor((k - 3) / 2) >= 1 error corrected
                    assert shamir.reconstruct(given, 3) == shamir.Reconstruction(secret, [wrong])
                elif k == 4:  # detectable, not correctable
                    with pytest.raises(ValueError, match="more than 0"):
                        shamir.reconstruct(given, 3)
                else:  # no redundancy: undetectable, but never the secret
                    with contextlib.suppress(ValueError):
                        assert shamir.reconstruct(given, 3).secret != secret


def test_reconstruct_rejects_bad_input_naming_the_share():
    _, shares = _shares(5, 3, seed=2)
    with pytest.raises(ValueError, match="at least t=3 shares"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)
    with pytest.raises(ValueError, match="x=4 "):
        shamir.reconstruct({**shares, 4: shares[4][1:]}, 3)
    with pytest.raises(ValueError, match="at least 1"):
        shamir.reconstruct(shares, 0)


def test_consistent_shares_of_a_malformed_secret_are_rejected():
    coeffs = [5, 11, 13]  # constant term lacks the 0x01 prefix byte
    shares = {
        x: (sum(c * x**k for k, c in enumerate(coeffs)) % shamir.PRIME).to_bytes(
            shamir.SHARE_BYTES, "big"
        )
        for x in range(1, 8)
    }
    with pytest.raises(ValueError, match="not a valid secret"):
        shamir.reconstruct(shares, 3)
