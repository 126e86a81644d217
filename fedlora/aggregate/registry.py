"""Aggregation modes (`lora.mode`): the protocol every mode implements, and the registry.

A mode says what a participant sends (`upload_layout`), where it starts the round (`start`),
in which coordinates the server combines updates (`server_point`, `server_deltas`) and how
a server point becomes the next global adapter (`global_from`). Everything in between (the
weighted mean, the server optimiser) is shared: see `fedlora.aggregate.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedlora.config import FROZEN_A_GAIN

from fedlora.aggregate.exact import ExactAggregator
from fedlora.aggregate.fedavg import FedAvgAggregator
from fedlora.aggregate.frozen_a import FrozenAAggregator
from fedlora.aggregate.sb import SBAggregator
from fedlora.aggregate.split import SPLITS, SplitAggregator

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout
    from fedlora.config import Config

MODES = ("fedavg", "frozen-a", "exact", "sb")


class Aggregator(Protocol):
    mode: str

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout: ...

    def start(self, global_vector: np.ndarray, layout: AdapterLayout, rank: int) -> np.ndarray: ...

    def encode_upload(self, delta: np.ndarray, own_layout: AdapterLayout, global_layout: AdapterLayout, rank: int) -> np.ndarray: ...

    def training(self, model: Any) -> AbstractContextManager[None]: ...

    def server_point(self, global_vector: np.ndarray, layout: AdapterLayout) -> np.ndarray: ...

    def server_deltas(
        self, global_vector: np.ndarray, layout: AdapterLayout, uploads: Sequence[np.ndarray], ranks: Sequence[int]
    ) -> list[np.ndarray]: ...

    def global_from(self, point: np.ndarray, global_vector: np.ndarray, layout: AdapterLayout) -> tuple[np.ndarray, dict[str, Any]]: ...


def make_aggregator(mode: str, alpha: float = 16.0, seed: int = 0, a_gain: float = FROZEN_A_GAIN) -> Aggregator:
    """Turn `lora.mode` into an aggregator; `alpha` (lora.alpha) matters to 'exact', `seed` to 'exact' and 'sb',
    `a_gain` (lora.frozen_a_gain) to 'sb'."""
    if mode == "fedavg":
        return FedAvgAggregator()
    if mode == "frozen-a":
        return FrozenAAggregator()
    if mode == "exact":
        return ExactAggregator(alpha, seed)
    if mode == "sb":
        return SBAggregator(seed, a_gain)
    raise ValueError(f"aggregation mode {mode!r} is not one of {', '.join(MODES)}")


def aggregator_for(cfg: Config) -> Aggregator:
    """The run's aggregator: its `lora.mode`, restricted to the shared tensors when
    `federation.personalization` splits the adapter (fedlora.aggregate.split)."""
    mode = make_aggregator(cfg.lora.mode, cfg.lora.alpha, cfg.federation.seed, cfg.lora.frozen_a_gain)
    split = cfg.federation.personalization
    return SplitAggregator(mode, split) if split in SPLITS else mode
