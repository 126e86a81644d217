"""`fedavg`: average lora_A and lora_B separately, like every other federated-LoRA stack.

The baseline: cheap and linear, but mean(B) mean(A) is not mean(B A), so the global
adapter is not the average of what the participants learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.aggregate.uploads import SubVectorUploads

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout


class FedAvgAggregator(SubVectorUploads):
    """Server space = the uploaded sub-vector of the global adapter (here: all of it)."""

    mode = "fedavg"

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout:
        """What a participant training at LoRA rank `rank` sends, given the global layout."""
        if rank != layout.lora_rank:
            raise ValueError(
                f"lora.mode={self.mode!r} needs every participant at the global rank {layout.lora_rank}, "
                f"got rank {rank}; use lora.mode='exact' for participants with different ranks"
            )
        return layout.uploaded(self.mode)

    def start(self, global_vector: np.ndarray, layout: AdapterLayout, rank: int) -> np.ndarray:
        """The adapter a participant of rank `rank` starts the round from: the global one."""
        self.upload_layout(layout, rank)
        return np.array(global_vector, dtype=np.float32, copy=True)

    def server_point(self, global_vector: np.ndarray, layout: AdapterLayout) -> np.ndarray:
        """The coordinates the server optimiser moves: the trained part of the global adapter."""
        return layout.take(global_vector, layout.uploaded(self.mode))

    def server_deltas(
        self, global_vector: np.ndarray, layout: AdapterLayout, uploads: Sequence[np.ndarray], ranks: Sequence[int]
    ) -> list[np.ndarray]:
        """Each participant's update in server coordinates: the upload itself (it is linear)."""
        return [np.asarray(upload, dtype=np.float32) for upload in uploads]

    def global_from(self, point: np.ndarray, global_vector: np.ndarray, layout: AdapterLayout) -> tuple[np.ndarray, dict[str, Any]]:
        """The new global adapter for a server point; the rest of the vector is left as it was."""
        return layout.put(global_vector, layout.uploaded(self.mode), point), {}
