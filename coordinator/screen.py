"""Screening of participant replies: every rejected update gets a reason for the log.

A reply is rejected when it is missing (timeout), carries an error, lacks the update or
its example count, or its update has the wrong shape or non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedlora.adapter import check_vector


@dataclass(frozen=True)
class Update:
    participant: str
    vector: np.ndarray
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    participant: str
    reason: str


def screen(updates: list[Update], size: int | Callable[[Update], int]) -> tuple[list[Update], list[Rejection]]:
    """Split updates into usable ones and rejections (wrong shape, non-finite, no examples).

    `size` is the expected vector length, or a function giving it per update (participants of
    different LoRA ranks send different lengths); a ValueError it raises rejects the update.
    """
    accepted, rejected = [], []
    for update in updates:
        try:
            check_vector(update.vector, size(update) if callable(size) else size, "update")
            if update.num_examples <= 0:
                raise ValueError(f"example count {update.num_examples} is not positive")
        except ValueError as err:
            rejected.append(Rejection(update.participant, str(err)))
            continue
        accepted.append(update)
    return accepted, rejected
