"""Sparse communication graphs for SecAgg+ (Bell et al., CCS 2020, §3).

SecAgg+ replaces Bonawitz et al.'s complete graph with a random k-regular graph
of degree k = O(log n): each participant shares keys and masks only with its k
neighbours, so client cost is O(log n + d) instead of O(n + d). We build a
Harary graph H_{k,n} (k-connected, minimal) and relabel it by a random
permutation, the construction Bell et al. analyse.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def seeded_rng(seed: bytes | int, domain: bytes) -> np.random.Generator:
    """Deterministic numpy Generator from a seed, domain-separated by purpose."""
    raw = seed if isinstance(seed, bytes) else str(int(seed)).encode()
    digest = hashlib.sha256(domain + b"|" + raw).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


def check_ids(ids: list[int]) -> list[int]:
    """Validate participant ids (distinct, non-negative ints) and return them sorted."""
    if len(set(ids)) != len(ids):
        raise ValueError("participant ids must be distinct")
    if any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError("participant ids must be non-negative ints")
    return sorted(ids)


def communication_graph(ids: list[int], k: int, seed: bytes | int) -> dict[int, list[int]]:
    """Random k-regular undirected graph over `ids` as {id: sorted neighbour ids}.

    k >= n-1 gives the complete graph (plain SecAgg). For odd k, n must be even
    (a k-regular graph on an odd number of nodes does not exist).
    """
    ordered = check_ids(ids)
    n = len(ordered)
    if k < 1:
        raise ValueError(f"graph degree k must be >= 1, got {k}")
    if k >= n - 1:
        return {i: [j for j in ordered if j != i] for i in ordered}
    if k % 2 == 1 and n % 2 == 1:
        raise ValueError(f"no {k}-regular graph on {n} nodes (k and n both odd); use even k")
    perm = seeded_rng(seed, b"secagg-graph").permutation(n)
    label = [ordered[p] for p in perm]
    adj: dict[int, set[int]] = {i: set() for i in ordered}
    for pos in range(n):
        offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for off in offsets:
            a, b = label[pos], label[(pos + off) % n]
            adj[a].add(b)
            adj[b].add(a)
    return {i: sorted(adj[i]) for i in ordered}


def default_degree(n: int) -> int:
    """Degree ~ 3 log2 n (even), as Bell et al. take k = O(log n); complete graph for small n."""
    if n <= 1:
        return 0
    k = math.ceil(3 * math.log2(n))
    k += k % 2
    return min(n - 1, k)


def default_threshold(k: int) -> int:
    """Smallest t with 2t > k+1: two disjoint sets of neighbours can never both reach t.

    With neighbourhood size k+1 (neighbours plus self), this is what makes the
    participants' "never reveal both shares" rule protect against a server that
    claims a participant dropped to some neighbours and survived to others.
    """
    return (k + 1) // 2 + 1
