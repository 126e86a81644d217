"""LoRA factor algebra over flat adapter vectors: layers, products, re-factorisation, rank changes.

An adapted linear layer contributes `lora_A` (r, in) and `lora_B` (out, r); PEFT adds
(alpha / r) * B @ A to the frozen weight. That scaled product is what a participant's
training means, so every comparison across ranks is made on it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout, TensorSpec

# Singular values below this share of a layer's largest count as zero: their direction is
# re-seeded instead of kept as an (almost) all-zero A row that could never train again.
RANK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: its name and where its two factors sit in the layout."""

    module: str
    a: TensorSpec
    b: TensorSpec

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def product_shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])


def lora_layers(layout: AdapterLayout) -> list[LoraLayer]:
    """The adapted modules of a layout, from PEFT's `<module>.lora_A.weight` / `.lora_B.weight` names."""
    from fedlora.adapter import is_lora_a, is_lora_b

    a_specs = {spec.name.split(".lora_A.")[0]: spec for spec in layout.specs if is_lora_a(spec.name)}
    b_specs = {spec.name.split(".lora_B.")[0]: spec for spec in layout.specs if is_lora_b(spec.name)}
    if set(a_specs) != set(b_specs):
        unpaired = sorted(set(a_specs) ^ set(b_specs))
        raise ValueError(f"LoRA factors without their partner: {unpaired[:3]}")
    layers = []
    for module, a in a_specs.items():
        b = b_specs[module]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{module}: lora_A {a.shape} and lora_B {b.shape} do not multiply")
        layers.append(LoraLayer(module, a, b))
    return layers


def non_lora_specs(layout: AdapterLayout) -> list[TensorSpec]:
    """Tensors trained in full (e.g. a classifier head in `modules_to_save`): averaged plainly."""
    from fedlora.adapter import is_lora_a, is_lora_b

    return [spec for spec in layout.specs if not (is_lora_a(spec.name) or is_lora_b(spec.name))]


def factors(vector: np.ndarray, layer: LoraLayer) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) of one layer as float64 matrices."""
    a = vector[layer.a.offset : layer.a.offset + layer.a.size].reshape(layer.a.shape)
    b = vector[layer.b.offset : layer.b.offset + layer.b.size].reshape(layer.b.shape)
    return b.astype(np.float64), a.astype(np.float64)


def product_layout(layout: AdapterLayout) -> AdapterLayout:
    """Layout of the 'product space': one dense (out, in) update per adapted layer, then the rest."""
    from fedlora.adapter import AdapterLayout

    shapes: dict[str, tuple[int, ...]] = {f"{layer.module}.delta_weight": layer.product_shape for layer in lora_layers(layout)}
    shapes.update({spec.name: spec.shape for spec in non_lora_specs(layout)})
    return AdapterLayout.from_shapes(shapes)


def to_products(vector: np.ndarray, layout: AdapterLayout, alpha: float) -> np.ndarray:
    """The adapter as the weight updates it applies: (alpha / r) B A per layer, other tensors as they are."""
    parts = []
    for layer in lora_layers(layout):
        b, a = factors(vector, layer)
        parts.append(((alpha / layer.rank) * (b @ a)).reshape(-1))
    parts += [vector[spec.offset : spec.offset + spec.size].astype(np.float64) for spec in non_lora_specs(layout)]
    return np.concatenate(parts).astype(np.float32)


def init_rows(module: str, first: int, last: int, columns: int, seed: int) -> np.ndarray:
    """Rows first..last-1 of a fresh lora_A, as PEFT draws it (Kaiming-uniform, bound 1/sqrt(in)).

    Row j depends only on (seed, module, j), so every party derives the same rows for any rank.
    """
    bound = 1.0 / np.sqrt(columns)
    rows = [
        np.random.default_rng([seed, zlib.crc32(module.encode()), j]).uniform(-bound, bound, size=columns)
        for j in range(first, last)
    ]
    return np.array(rows, dtype=np.float64).reshape(last - first, columns)


def split_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int, alpha: float, module: str, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Factors (B, A) of rank `rank` whose scaled product is the best rank-`rank` fit of U S V^T.

    The kept singular values are split symmetrically: B = U sqrt(S r/alpha), A = sqrt(S r/alpha) V^T,
    so (alpha/r) B A = U S V^T. Directions with (numerically) zero singular value get a fresh A row
    and a zero B column: same product, but the direction can still learn. Returns the squared
    Frobenius norm dropped by the truncation as well.
    """
    out_features, in_features = u.shape[0], vt.shape[1]
    keep = min(rank, int(np.sum(s > RANK_TOLERANCE * s[0]))) if s.size and s[0] > 0 else 0
    root = np.sqrt(s[:keep] * rank / alpha)
    b = np.zeros((out_features, rank))
    a = np.empty((rank, in_features))
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vt[:keep]
    a[keep:] = init_rows(module, keep, rank, in_features, seed)
    dropped = float(np.sum(s[rank:] ** 2))
    return b, a, dropped


def refactor(product: np.ndarray, rank: int, alpha: float, module: str, seed: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Truncated SVD of a dense (out, in) update into rank-`rank` LoRA factors.

    Returns (B, A, dropped, total): squared Frobenius norms of what the truncation dropped and of
    the whole update, so dropped/total is the relative error squared.
    """
    u, s, vt = np.linalg.svd(product.astype(np.float64), full_matrices=False)
    b, a, dropped = split_factors(u, s, vt, rank, alpha, module, seed)
    return b, a, dropped, float(np.sum(s**2))


def low_rank_svd(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SVD of B @ A without forming it: QR of both factors and an r x r core."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return qb @ u, s, vt @ qa.T


def fit_rank(vector: np.ndarray, layout: AdapterLayout, rank: int, alpha: float, seed: int) -> np.ndarray:
    """The adapter `vector` (laid out by `layout`) re-expressed at LoRA rank `rank`.

    Same rank: returned unchanged. Lower rank: each layer's product truncated to its top
    singular directions. Higher rank: the product kept exactly and the extra directions
    seeded fresh (A rows from `init_rows`, B columns zero). Non-LoRA tensors are copied.
    """
    if rank == layout.lora_rank:
        return np.array(vector, dtype=np.float32, copy=True)
    target = layout.with_rank(rank)
    out = np.empty(target.size, dtype=np.float32)
    by_name = {spec.name: spec for spec in target.specs}
    for layer in lora_layers(layout):
        b, a = factors(vector, layer)
        u, s, vt = low_rank_svd((alpha / layer.rank) * b, a)
        new_b, new_a, _ = split_factors(u, s, vt, rank, alpha, layer.module, seed)
        for spec, values in ((by_name[layer.a.name], new_a), (by_name[layer.b.name], new_b)):
            out[spec.offset : spec.offset + spec.size] = values.reshape(-1)
    for spec in non_lora_specs(layout):
        out[by_name[spec.name].offset : by_name[spec.name].offset + spec.size] = vector[spec.offset : spec.offset + spec.size]
    return out
