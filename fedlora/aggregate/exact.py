"""`exact`: the weighted mean of the products B_i A_i per layer, re-factorised by truncated SVD.

Server space is the product space (`lora.product_layout`): one dense (out, in) update per
adapted layer, (alpha / r_i) B_i A_i, plus the fully trained tensors. That space does not
depend on the participant's rank, so participants may train different ranks (a small site
r=4, a large one r=16): each starts the round from the global adapter re-expressed at its own
rank (`lora.fit_rank`) and sends its own-rank factor delta; its update in server space is the
change of its products over the round. The new global adapter is the
truncated SVD of the server point at the global rank; the relative Frobenius error that the
truncation drops is reported as `svd_truncation_error`.

The coordinator needs each participant's factors in the clear, so this mode cannot run under
secure aggregation (the configuration refuses it and points to `frozen-a`). It keeps a dense
(out, in) matrix per layer and participant: fine for the built-in models, costly for 7B ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.aggregate.lora import fit_rank, lora_layers, non_lora_specs, product_layout, refactor, to_products
from fedlora.aggregate.uploads import SubVectorUploads

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout


class ExactAggregator(SubVectorUploads):
    mode = "exact"

    def __init__(self, alpha: float, seed: int) -> None:
        if alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {alpha}")
        self.alpha = alpha
        self.seed = seed

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout:
        """A participant of rank `rank` sends the delta of all its own-rank factors."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        return layout.with_rank(rank)

    def start(self, global_vector: np.ndarray, layout: AdapterLayout, rank: int) -> np.ndarray:
        """The global adapter at rank `rank`: unchanged at the global rank, else SVD-resized."""
        return fit_rank(global_vector, layout, rank, self.alpha, self.seed)

    def server_point(self, global_vector: np.ndarray, layout: AdapterLayout) -> np.ndarray:
        return to_products(global_vector, layout, self.alpha)

    def server_deltas(
        self, global_vector: np.ndarray, layout: AdapterLayout, uploads: Sequence[np.ndarray], ranks: Sequence[int]
    ) -> list[np.ndarray]:
        """Per participant: the products of what it trained minus the products of where it started.

        At the global rank the start is the global adapter, so the mean of these plus the global
        products is exactly the weighted mean of the B_i A_i. A participant of lower rank starts
        from a truncation of the global adapter; measuring its update from that start (not from
        the global) keeps the truncation it could not represent out of the mean.
        """
        deltas = []
        for upload, rank in zip(uploads, ranks):
            own = layout.with_rank(rank)
            start = self.start(global_vector, layout, rank)
            trained = start + np.asarray(upload, dtype=np.float32)
            change = to_products(trained, own, self.alpha).astype(np.float64) - to_products(start, own, self.alpha)
            deltas.append(change.astype(np.float32))
        return deltas

    def global_from(self, point: np.ndarray, global_vector: np.ndarray, layout: AdapterLayout) -> tuple[np.ndarray, dict[str, Any]]:
        """Truncated SVD of each layer's product at the global rank; other tensors copied."""
        products = product_layout(layout).unflatten(np.asarray(point, dtype=np.float32))
        out = np.array(global_vector, dtype=np.float32, copy=True)
        dropped_total, norm_total, worst = 0.0, 0.0, 0.0
        for layer in lora_layers(layout):
            b, a, dropped, total = refactor(products[f"{layer.module}.delta_weight"], layer.rank, self.alpha, layer.module, self.seed)
            out[layer.a.offset : layer.a.offset + layer.a.size] = a.reshape(-1)
            out[layer.b.offset : layer.b.offset + layer.b.size] = b.reshape(-1)
            dropped_total, norm_total = dropped_total + dropped, norm_total + total
            worst = max(worst, float(np.sqrt(dropped / total)) if total > 0 else 0.0)
        for spec in non_lora_specs(layout):
            out[spec.offset : spec.offset + spec.size] = products[spec.name].reshape(-1)
        error = float(np.sqrt(dropped_total / norm_total)) if norm_total > 0 else 0.0
        return out, {"svd_truncation_error": error, "svd_truncation_error_max": worst}
