"""Split adapters (`federation.personalization = 'local-head' | 'local-b'`): part of the adapter stays at each site.

A split adapter shares some tensors and keeps the rest at the site that trained them, so each
site serves the shared part combined with its own. Two splits:

- `local-head`: every fully trained tensor (a classification head) is the site's own; the LoRA
  factors are shared. Per-site label skew lands in the head, which a shared head would average
  away (the personalised-head family, e.g. FedRep, Collins et al., ICML 2021).
- `local-b`: FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
  Learning", ICLR 2025): lora_A, which they find learns what is general, is shared; lora_B,
  which learns what is specific to a client, is not. Only `fedavg` trains both factors, so only
  it can split them (in `frozen-a` and `sb` nothing of the LoRA factors would be left to share).

The split wraps the run's mode: uploads, server coordinates and the server step cover the shared
part only, so secure aggregation, clipping and noise never see the local part, and the published
global adapter keeps the local tensors at their round-0 values (a new site starts its own from
them). Sites keep their local part between rounds (participant/personal.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.config import PERSONAL_SPLITS
from fedlora.lora_names import is_lora_b, is_lora_factor

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout
    from fedlora.aggregate.registry import Aggregator

SPLITS: dict[str, Callable[[str], bool]] = {  # which tensors (by name) stay at the site
    "local-head": lambda name: not is_lora_factor(name),
    "local-b": is_lora_b,
}


def local_layout(layout: AdapterLayout, split: str) -> AdapterLayout:
    """The tensors of `layout` that split `split` keeps at the site; refuses a split that keeps nothing."""
    local = layout.select(SPLITS[split])
    if local.size == 0:
        raise ValueError(
            f"federation.personalization={split!r} keeps no tensor of this adapter at the site "
            f"({'the model has no fully trained head' if split == 'local-head' else 'it has no lora_B'})"
        )
    return local


class SplitAggregator:
    """The run's mode restricted to the shared tensors: the local ones never travel and never move on the server."""

    def __init__(self, inner: Aggregator, split: str) -> None:
        if inner.mode not in PERSONAL_SPLITS[split]:
            raise ValueError(
                f"federation.personalization={split!r} needs lora.mode in {PERSONAL_SPLITS[split]}, got {inner.mode!r}"
            )
        self.inner, self.split, self.mode = inner, split, inner.mode

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout:
        local_layout(layout, self.split)
        return self.inner.upload_layout(layout, rank).select(lambda name: not SPLITS[self.split](name))

    def start(self, global_vector: np.ndarray, layout: AdapterLayout, rank: int) -> np.ndarray:
        return self.inner.start(global_vector, layout, rank)

    def encode_upload(self, delta: np.ndarray, own_layout: AdapterLayout, global_layout: AdapterLayout, rank: int) -> np.ndarray:
        upload = self.inner.encode_upload(delta, own_layout, global_layout, rank)
        return self.inner.upload_layout(global_layout, rank).take(upload, self.upload_layout(global_layout, rank))

    def training(self, model: Any) -> AbstractContextManager[None]:
        return self.inner.training(model)

    def server_point(self, global_vector: np.ndarray, layout: AdapterLayout) -> np.ndarray:
        full = self.inner.upload_layout(layout, layout.lora_rank)
        return full.take(self.inner.server_point(global_vector, layout), self.upload_layout(layout, layout.lora_rank))

    def server_deltas(
        self, global_vector: np.ndarray, layout: AdapterLayout, uploads: Sequence[np.ndarray], ranks: Sequence[int]
    ) -> list[np.ndarray]:
        """The uploads themselves: every mode a split wraps is linear in what it uploads."""
        return [np.asarray(upload, dtype=np.float32) for upload in uploads]

    def global_from(self, point: np.ndarray, global_vector: np.ndarray, layout: AdapterLayout) -> tuple[np.ndarray, dict[str, Any]]:
        """The shared coordinates from `point`; the local ones as `global_vector` has them (their round-0 values)."""
        full = self.inner.upload_layout(layout, layout.lora_rank)
        inner_point = full.put(self.inner.server_point(global_vector, layout), self.upload_layout(layout, layout.lora_rank), point)
        return self.inner.global_from(inner_point, global_vector, layout)
