"""Random buckets of participants, each aggregated by its own SecAgg instance.

Robust rules need several inputs, secure aggregation hides individual ones:
bucketing (Velicheti et al., "Secure Byzantine-Robust Distributed Learning via
Clustering", 2021; Karimireddy et al., ICLR 2022) sums each bucket securely and
runs the robust rule over bucket means. Buckets are reshuffled every round.

Who shares a bucket must be unpredictable to the participants: colluders who could
compute it would choose which of them reply so as to spread over the most buckets or
to join a target's (docs/decisions.md, "Bucket assignment is secret"). The assignment
is therefore a pure function of a secret the coordinator draws from the OS CSPRNG once
the round's members are fixed (`draw_bucket_secret`), never of the run seed they all
receive; the secret goes into the audit log after the round, so anyone can recompute it.
"""

from __future__ import annotations

import secrets

from .graph import check_ids, seeded_rng

BUCKET_SECRET_BYTES = 32


def draw_bucket_secret() -> bytes:
    """A fresh bucket secret from the OS CSPRNG: one per round, drawn after the replies are in."""
    return secrets.token_bytes(BUCKET_SECRET_BYTES)


def assign_buckets(ids: list[int], bucket_size: int, secret: bytes) -> list[list[int]]:
    """Shuffle `ids` by `secret` and split into floor(n/s) buckets of >= s members each.

    The remainder is spread one per bucket, so sizes differ by at most one.
    The result depends only on the set of ids and the secret, not their order; with
    a uniform secret every partition of that shape is (up to numpy's PCG64) equally likely.
    """
    if not isinstance(secret, bytes) or len(secret) != BUCKET_SECRET_BYTES:
        raise ValueError(
            f"a bucket secret is {BUCKET_SECRET_BYTES} bytes from draw_bucket_secret(), got {secret!r:.40}: "
            "an assignment derived from anything the participants know lets them predict who shares a bucket"
        )
    ordered = check_ids(list(ids))
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    if len(ordered) < bucket_size:
        raise ValueError(
            f"only {len(ordered)} participants, fewer than bucket_size={bucket_size}: "
            "sample more participants or lower the bucket size"
        )
    perm = seeded_rng(secret, b"secagg-buckets").permutation(len(ordered))
    shuffled = [ordered[p] for p in perm]
    m = len(ordered) // bucket_size
    return [sorted(shuffled[b::m]) for b in range(m)]


def assign_named_buckets(names: list[str], bucket_size: int, secret: bytes) -> list[list[str]]:
    """`assign_buckets` over participant names: id i is the i-th name in sorted order.

    The coordinator buckets by this, so the audit log's buckets and secret alone (their
    union is the round's members) let an auditor recompute them (`fedlora.audit.verify`).
    """
    ordered = sorted(names)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"participant names must be distinct, got {ordered}")
    return [[ordered[i] for i in group] for group in assign_buckets(list(range(len(ordered))), bucket_size, secret)]
