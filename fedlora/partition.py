"""Partitioners that split one dataset into per-participant shards, plus the held-out split.

A partitioner is a pure function of (examples, number of participants, rng) returning index
lists; the registry turns a config string ("iid", "dirichlet:0.3", "natural:Age") into one.
Every participant recomputes the same split from the shared seed, so no index list travels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedlora.aggregate.robust import SpecForm, parse_spec
from fedlora.data import Example

Partitioner = Callable[[list[Example], int, np.random.Generator], list[list[int]]]


def iid(examples: list[Example], num_partitions: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(len(examples))
    return [sorted(part.tolist()) for part in np.array_split(order, num_partitions)]


def dirichlet(alpha: float, min_size: int = 4, max_tries: int = 100) -> Partitioner:
    """Label skew: each answer's records are spread by proportions drawn from Dir(alpha).

    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution" (2019).
    Small alpha gives each participant few labels; draws repeat until every shard has
    at least `min_size` records. With many participants a plain draw almost always leaves
    someone nearly empty; then every participant first gets `min_size` random records and only
    the rest is spread by Dir(alpha) (the skew is kept, the floor guaranteed).
    """

    def draw(labels: np.ndarray, pool: np.ndarray, parts: list[list[int]], rng: np.random.Generator) -> None:
        for label in sorted(set(labels[pool])):
            members = rng.permutation(pool[labels[pool] == label])
            shares = rng.dirichlet(np.full(len(parts), alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())

    def split(examples: list[Example], num_partitions: int, rng: np.random.Generator) -> list[list[int]]:
        labels = np.array([example.response for example in examples])
        if len(examples) < min_size * num_partitions:
            raise ValueError(
                f"data.partition: {len(examples)} records cannot give {num_partitions} participants "
                f"{min_size} records each; use fewer participants or more data"
            )
        everything = np.arange(len(examples))
        for _ in range(max_tries):
            parts: list[list[int]] = [[] for _ in range(num_partitions)]
            draw(labels, everything, parts, rng)
            if min(len(part) for part in parts) >= min_size:
                return [sorted(part) for part in parts]
        order = rng.permutation(len(examples))
        floor = order[: min_size * num_partitions]
        parts = [floor[i::num_partitions].tolist() for i in range(num_partitions)]
        draw(labels, np.sort(order[min_size * num_partitions :]), parts, rng)
        return [sorted(part) for part in parts]

    return split


def natural(column: str) -> Partitioner:
    """One group per participant by a column: quantile bands for numbers, categories otherwise."""

    def split(examples: list[Example], num_partitions: int, rng: np.random.Generator) -> list[list[int]]:
        if any(column not in example.fields for example in examples):
            available = sorted(examples[0].fields) if examples else []
            raise ValueError(f"data.partition: natural:{column} names no column of the records; columns are {available}")
        values = pd.Series([example.fields[column] for example in examples])
        numeric = pd.api.types.is_numeric_dtype(values) and values.nunique() > num_partitions
        if numeric:
            groups = pd.qcut(values.rank(method="first"), num_partitions, labels=False).to_numpy()
        else:
            categories = sorted(values.astype(str).unique())
            if len(categories) < num_partitions:
                raise ValueError(
                    f"data.partition: natural:{column} has {len(categories)} groups ({categories}) "
                    f"for {num_partitions} participants"
                )
            group_of = {category: i % num_partitions for i, category in enumerate(categories)}
            groups = np.array([group_of[value] for value in values.astype(str)])
        return [np.flatnonzero(groups == g).tolist() for g in range(num_partitions)]

    return split


PARTITION_FORMS = (
    SpecForm("iid"),
    SpecForm("dirichlet", "alpha", low=0.0, low_open=True),
    SpecForm("natural", "column"),  # text: resolved before parse_spec, listed in its errors
)


def make_partitioner(spec: str) -> Partitioner:
    """Turn `data.partition` ('iid', 'dirichlet:<alpha>' or 'natural:<column>') into a partitioner."""
    name, _, column = spec.strip().partition(":")
    if name == "natural" and column:  # a column name, not a number: parse_spec reads numbers only
        return natural(column)
    name, alpha = parse_spec(spec, PARTITION_FORMS, "data.partition")
    if name == "dirichlet" and alpha is not None:
        return dirichlet(alpha)
    return iid  # parse_spec returns "natural" only with an argument, handled above


@dataclass(frozen=True)
class Shard:
    """One participant's records: train and a held-out test split that is never trained on."""

    train: list[Example]
    test: list[Example]


def shard_for(examples: list[Example], spec: str, num_partitions: int, partition_id: int, test_fraction: float, seed: int) -> Shard:
    """The shard of participant `partition_id`, identical on every machine for the same seed."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    parts = make_partitioner(spec)(examples, num_partitions, np.random.default_rng(seed))
    return split_holdout([examples[i] for i in parts[partition_id]], test_fraction, seed + partition_id)


def split_holdout(examples: list[Example], test_fraction: float, seed: int) -> Shard:
    if len(examples) < 2:
        raise ValueError(f"a shard of {len(examples)} records cannot be split into train and test")
    order = np.random.default_rng(seed).permutation(len(examples))
    test_size = min(max(1, round(len(examples) * test_fraction)), len(examples) - 1)
    return Shard(
        train=[examples[i] for i in order[test_size:]],
        test=[examples[i] for i in order[:test_size]],
    )
