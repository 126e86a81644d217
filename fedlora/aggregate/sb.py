"""`sb`: Fed-SB (Singhal et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", arXiv 2502.15436; after LoRA-SB, Ponkshe et al. 2024).

Each adapted layer's update is (alpha/r) B0 R A0: A0 (r x in) and B0 (out x r) are fixed and
shared, and a site trains only the r x r matrix R between them. The update is linear in R, so
the mean of the R_i gives exactly the mean of the products B0 R_i A0, under secure aggregation
and noise alike, and a site sends r^2 values per layer instead of r (in + out).

The global adapter stays a standard PEFT LoRA (lora_A = A0, lora_B = B0 R), so stock PEFT, vLLM
and every export load it as it is. Both factors are drawn from the run seed in numpy, with
orthonormal rows (A0, rescaled by lora.frozen_a_gain as frozen-a rescales its A) and orthonormal
columns (B0): every party derives them from the configuration it approved, R = B0^T lora_B reads R
back from a global adapter, and a site refuses a global adapter whose A is not its A0 or whose B
leaves the span of its B0 (a coordinator's other basis). LoRA-SB's initialisation from an
approximated first update is not implemented: the basis is random, as in frozen-a.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.lora_names import is_lora_a, is_lora_b

if TYPE_CHECKING:  # the coordinator's light commands import the mode registry without torch
    from fedlora.adapter import AdapterLayout

# Largest |lora_B - B0 B0^T lora_B| a global adapter may show, relative to its largest entry: float32 rounding.
SPAN_TOLERANCE = 1e-4


def module_path(name: str) -> str:
    """The adapted layer a LoRA tensor belongs to, the same in PEFT's state dict and in named_parameters."""
    return name.split(".lora_A")[0].split(".lora_B")[0]


@functools.lru_cache(maxsize=4096)
def _orthonormal(seed: int, path: str, role: int, rows: int, cols: int) -> np.ndarray:
    """A (rows x cols) matrix with orthonormal columns (rows >= cols), drawn from the run seed and the layer's name.

    Memoised (a QR per layer would otherwise run at every start, server step and global check: about
    224 per call on an 8B base) and returned read-only, so no caller can change the shared basis."""
    draw = np.random.default_rng([seed, zlib.crc32(path.encode()), role]).standard_normal((rows, cols))
    q, r = np.linalg.qr(draw)
    basis = (q * np.sign(np.diag(r))).astype(np.float32)  # the sign fix makes the factorisation unique
    basis.flags.writeable = False
    return basis


def fixed_a(path: str, rank: int, fan_in: int, seed: int, gain: float) -> np.ndarray:
    """A0 (rank x fan_in): orthonormal rows scaled so |A0 x| is about `gain` |x| (1/sqrt(fan_in/rank) for gain 0)."""
    if fan_in < rank:
        raise ValueError(f"lora.mode='sb' needs lora.r <= the input width of every adapted layer; {path} has {fan_in} < {rank}")
    scale = gain * math.sqrt(fan_in / rank) if gain else 1.0
    return (_orthonormal(seed, path, 0, fan_in, rank).T * scale).astype(np.float32)


def fixed_b(path: str, rank: int, fan_out: int, seed: int) -> np.ndarray:
    """B0 (fan_out x rank) with orthonormal columns, so B0^T B0 = I and R = B0^T (B0 R)."""
    if fan_out < rank:
        raise ValueError(f"lora.mode='sb' needs lora.r <= the output width of every adapted layer; {path} has {fan_out} < {rank}")
    return _orthonormal(seed, path, 1, fan_out, rank)


def r_name(lora_b_name: str) -> str:
    return lora_b_name.replace(".lora_B.", ".lora_R.")


class SBAggregator:
    """Server space and uploads: each layer's R (r x r) and any fully trained tensor (a class head)."""

    mode = "sb"

    def __init__(self, seed: int, a_gain: float) -> None:
        self.seed = seed
        self.a_gain = a_gain

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout:
        from fedlora.adapter import AdapterLayout

        if rank != layout.lora_rank:
            raise ValueError(
                f"lora.mode='sb' needs every participant at the global rank {layout.lora_rank}, got rank {rank}: "
                "R is r x r between shared factors, so ranks cannot differ"
            )
        shapes = {}
        for spec in layout.specs:
            if is_lora_b(spec.name):
                shapes[r_name(spec.name)] = (rank, rank)
            elif not is_lora_a(spec.name):
                shapes[spec.name] = spec.shape
        return AdapterLayout.from_shapes(shapes)

    def basis(self, layout: AdapterLayout) -> dict[str, np.ndarray]:
        """B0 for every lora_B tensor of `layout`, by name."""
        return {spec.name: fixed_b(module_path(spec.name), spec.shape[1], spec.shape[0], self.seed) for spec in layout.specs if is_lora_b(spec.name)}

    def check_global(self, global_vector: np.ndarray, layout: AdapterLayout) -> None:
        """Refuse a global adapter built on another basis: its A must be A0, its B in the span of B0."""
        tensors = layout.unflatten(global_vector)
        for name, b0 in self.basis(layout).items():
            b = tensors[name]
            scale = max(float(np.abs(b).max()), 1e-12)
            if float(np.abs(b - b0 @ (b0.T @ b)).max()) > SPAN_TOLERANCE * scale:
                raise ValueError(f"the global adapter's {name} is not in the span of this run's fixed B (lora.mode='sb'): refusing it")
        for spec in layout.specs:
            if is_lora_a(spec.name):
                expected = fixed_a(module_path(spec.name), spec.shape[0], spec.shape[1], self.seed, self.a_gain)
                if not np.array_equal(tensors[spec.name], expected):
                    raise ValueError(f"the global adapter's {spec.name} is not this run's fixed A (lora.mode='sb'): refusing it")

    def start(self, global_vector: np.ndarray, layout: AdapterLayout, rank: int) -> np.ndarray:
        self.upload_layout(layout, rank)
        self.check_global(global_vector, layout)
        return np.array(global_vector, dtype=np.float32, copy=True)

    def encode_upload(self, delta: np.ndarray, own_layout: AdapterLayout, global_layout: AdapterLayout, rank: int) -> np.ndarray:
        """A trained delta in server coordinates: B0^T dB per layer (exactly dR), and heads as they are."""
        return self.server_point(delta, own_layout)

    def server_point(self, global_vector: np.ndarray, layout: AdapterLayout) -> np.ndarray:
        tensors, basis = layout.unflatten(np.asarray(global_vector, dtype=np.float32)), self.basis(layout)
        parts = []
        for spec in layout.specs:
            if is_lora_b(spec.name):
                parts.append((basis[spec.name].T @ tensors[spec.name]).reshape(-1))
            elif not is_lora_a(spec.name):
                parts.append(tensors[spec.name].reshape(-1))
        return np.concatenate(parts).astype(np.float32)

    def server_deltas(
        self, global_vector: np.ndarray, layout: AdapterLayout, uploads: Sequence[np.ndarray], ranks: Sequence[int]
    ) -> list[np.ndarray]:
        """The uploads themselves: R enters the update linearly."""
        return [np.asarray(upload, dtype=np.float32) for upload in uploads]

    def global_from(self, point: np.ndarray, global_vector: np.ndarray, layout: AdapterLayout) -> tuple[np.ndarray, dict[str, Any]]:
        """lora_B = B0 R for each layer's R in `point`; heads from `point`; lora_A stays A0."""
        uploaded = self.upload_layout(layout, layout.lora_rank).unflatten(np.asarray(point, dtype=np.float32))
        basis = self.basis(layout)
        out = np.array(global_vector, dtype=np.float32, copy=True)
        tensors = layout.unflatten(out)
        for spec in layout.specs:
            if is_lora_b(spec.name):
                tensors[spec.name][...] = basis[spec.name] @ uploaded[r_name(spec.name)]
            elif not is_lora_a(spec.name):
                tensors[spec.name][...] = uploaded[spec.name]
        return out, {}

    def training(self, model: Any) -> AbstractContextManager[None]:
        """While a site trains: each lora_B is B0 R with only R trainable, then B0 R again (`fedlora.sb_training`)."""
        from fedlora.sb_training import train_r_only

        return train_r_only(model, lambda name, out, rank: fixed_b(module_path(name), rank, out, self.seed))
