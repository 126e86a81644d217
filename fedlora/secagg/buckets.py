"""Random buckets of participants, each aggregated by its own SecAgg instance.

Robust rules need several inputs, secure aggregation hides individual ones:
bucketing (Velicheti et al., "Secure Byzantine-Robust Distributed Learning via
Clustering", 2021; Karimireddy et al., ICLR 2022) sums each bucket securely and
runs the robust rule over bucket means. Buckets are reshuffled every round.
"""

from __future__ import annotations

from .graph import check_ids, seeded_rng


def assign_buckets(ids: list[int], bucket_size: int, seed: bytes | int) -> list[list[int]]:
    """Shuffle `ids` and split into floor(n/s) buckets of >= s members each.

    The remainder is spread one per bucket, so sizes differ by at most one.
    The result depends only on the set of ids and the seed, not their order.
    """
    ordered = check_ids(list(ids))
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    if len(ordered) < bucket_size:
        raise ValueError(
            f"only {len(ordered)} participants, fewer than bucket_size={bucket_size}: "
            "sample more participants or lower the bucket size"
        )
    perm = seeded_rng(seed, b"secagg-buckets").permutation(len(ordered))
    shuffled = [ordered[p] for p in perm]
    m = len(ordered) // bucket_size
    return [sorted(shuffled[b::m]) for b in range(m)]
