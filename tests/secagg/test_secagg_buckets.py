"""Bucket assignment: an unbiased partition drawn from a secret the coordinator draws after the
replies are in, so no participant can predict who shares its bucket, and recorded so anyone can
recompute it afterwards.

The coordinator-side tests run `secure_sum` on a grid where nobody answers: every bucket aborts
at setup, but its members (the assignment) are already fixed and reported, at no protocol cost.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter

import pytest
from flwr.clientapp import ClientApp

from coordinator.gather import Member
from coordinator.local_grid import LocalGrid
from coordinator.secure import gather_secure
from fedlora.config import SecaggSection
from fedlora.secagg import assign_buckets, assign_named_buckets
from fedlora.secagg import buckets as bucket_module


def _members(n: int) -> list[Member]:
    return [Member(1000 + i, f"participant-{i:02d}", 50) for i in range(n)]


def _assignment(members: list[Member], bucket_size: int = 2) -> tuple[list[list[str]], str]:
    """The buckets `secure_sum` formed for round 3, and the secret it reported."""
    grid = LocalGrid(ClientApp(), {m.node: {} for m in members})
    grid.silent = {m.node for m in members}  # nobody answers: each bucket aborts at setup
    sec = SecaggSection(enabled=True, bucket_size=bucket_size, timeout_s=0.01)
    gathered = gather_secure(grid, members, sec, server_round=3, length=8, run_tag="t", clip_norm=1.0)
    return [bucket["members"] for bucket in gathered.row["secagg"]["buckets"]], gathered.row["secagg"].get("bucket_secret", "")


def _secret(i: int) -> bytes:
    return hashlib.sha256(f"test-secret-{i}".encode()).digest()


@pytest.mark.parametrize("n, s", [(10, 3), (10, 1), (10, 10), (17, 4), (100, 7)])
def test_buckets_partition_the_ids_into_n_over_s_buckets_of_s_or_s_plus_one_whatever_their_order(n, s):
    ids = list(range(100, 100 + n))
    drawn = assign_buckets(ids, s, _secret(5))
    assert sorted(itertools.chain(*drawn)) == ids
    assert len(drawn) == n // s and {len(b) for b in drawn} <= {s, s + 1}
    assert assign_buckets(ids[::-1], s, _secret(5)) == drawn


def test_named_buckets_are_the_id_buckets_of_the_names_in_sorted_order():
    names = [f"site-{c}" for c in "qwertyuiopas"]
    ordered = sorted(names)
    by_id = assign_buckets(list(range(len(names))), 3, _secret(1))
    assert assign_named_buckets(names, 3, _secret(1)) == [[ordered[i] for i in group] for group in by_id]


@pytest.mark.parametrize("secret", [5, b"0/3", "00" * 32, bytes(31)])
def test_a_bucket_secret_is_32_bytes_never_a_seed(secret):
    with pytest.raises(ValueError, match="32 bytes"):
        assign_buckets(list(range(40)), 4, secret)


def test_too_few_participants_for_one_bucket_are_refused():
    with pytest.raises(ValueError, match="fewer than bucket_size"):
        assign_buckets(list(range(3)), 4, _secret(1))


def test_the_same_members_in_the_same_round_get_a_different_assignment_every_time():
    # Identical inputs (members, round, configuration, and the run seed, which secure_sum no longer
    # takes): one fixed assignment would repeat; 20 members in buckets of 2 have 19!! ~ 6.5e8 ones.
    members = _members(20)
    drawn = [_assignment(members) for _ in range(5)]
    assert len({secret for _, secret in drawn}) == 5
    assert len({tuple(map(tuple, groups)) for groups, _ in drawn}) == 5
    assert all(sorted(itertools.chain(*groups)) == [m.name for m in members] for groups, _ in drawn)


def test_the_secret_comes_from_the_os_csprng_once_the_members_are_known(monkeypatch):
    # Spy on the CSPRNG: the assignment is the one its bytes give, and it is drawn inside secure_sum,
    # which only runs once the train replies (and so the members) are in.
    draws: list[bytes] = []

    def token_bytes(n: int) -> bytes:
        draws.append(_secret(len(draws)))
        assert n == 32
        return draws[-1]

    monkeypatch.setattr(bucket_module.secrets, "token_bytes", token_bytes)
    members = _members(9)
    groups, secret = _assignment(members, 3)
    assert draws == [bytes.fromhex(secret)]
    assert groups == assign_named_buckets([m.name for m in members], 3, draws[0])
    # One bucket (bucket_size 0) has nothing to draw, and records no secret.
    assert _assignment(members, 0) == ([[m.name for m in members]], "") and len(draws) == 1


def test_the_reported_secret_reproduces_the_assignment_with_assign_buckets():
    members = _members(11)
    groups, secret = _assignment(members, 3)
    ordered = sorted(m.name for m in members)  # ids index the members in name order
    assert groups == [[ordered[i] for i in group] for group in assign_buckets(list(range(11)), 3, bytes.fromhex(secret))]


def test_every_pair_shares_a_bucket_at_the_uniform_rate():
    # 20 ids in buckets of 2: a uniform partition puts a given pair together with probability 1/19.
    # Secrets hashed from a counter (as good as uniform, and the test cannot flake); each pair's count
    # over 2000 draws must lie within 5 sigma of 2000/19 ~ 105 (sigma ~ 10), and so must the positions.
    n, draws = 20, 2000
    together: Counter[tuple[int, int]] = Counter()
    first: Counter[int] = Counter()
    for i in range(draws):
        drawn = assign_buckets(list(range(n)), 2, _secret(i))
        together.update(pair for bucket in drawn for pair in itertools.combinations(bucket, 2))
        first.update(drawn[0])
    p = 1 / (n - 1)
    bound = 5 * math.sqrt(draws * p * (1 - p))
    assert len(together) == n * (n - 1) // 2  # every pair met
    assert all(abs(together[pair] - draws * p) < bound for pair in itertools.combinations(range(n), 2))
    q = 2 / n  # and every id lands in the first bucket at the rate 2/20
    assert all(abs(first[i] - draws * q) < 5 * math.sqrt(draws * q * (1 - q)) for i in range(n))
