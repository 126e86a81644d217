"""Adapter state <-> one flat float32 vector, and PEFT-compatible save/load.

Every aggregation, robust rule, mask and noise step works on flat vectors; the layout
(names, shapes, offsets, in PEFT's state-dict order) is what makes a vector mean something
again. A saved adapter is a plain PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`) that stock `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from fedlora.lora_names import is_lora_a, is_lora_b


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class AdapterLayout:
    """Where each adapter tensor lives inside the flat vector."""

    specs: tuple[TensorSpec, ...]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> AdapterLayout:
        specs, offset = [], 0
        for name, shape in shapes.items():
            specs.append(TensorSpec(name, tuple(int(d) for d in shape), offset))
            offset += specs[-1].size
        return cls(tuple(specs))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AdapterLayout:
        return cls.from_shapes({name: tuple(tensor.shape) for name, tensor in state.items()})

    @property
    def size(self) -> int:
        return self.specs[-1].offset + self.specs[-1].size if self.specs else 0

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def flatten(self, state: Mapping[str, Any]) -> np.ndarray:
        """Concatenate tensors in layout order; names and shapes must match exactly."""
        if set(state) != set(self.names):
            missing, extra = set(self.names) - set(state), set(state) - set(self.names)
            raise ValueError(f"adapter state does not match the layout: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        vector = np.empty(self.size, dtype=np.float32)
        for spec in self.specs:
            array = _to_numpy(state[spec.name])
            if array.shape != spec.shape:
                raise ValueError(f"{spec.name}: shape {array.shape} does not match the layout's {spec.shape}")
            vector[spec.offset : spec.offset + spec.size] = array.reshape(-1)
        return vector

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Views into `vector`, one per tensor, in layout order."""
        check_vector(vector, self.size)
        return {spec.name: vector[spec.offset : spec.offset + spec.size].reshape(spec.shape) for spec in self.specs}

    def to_json(self) -> str:
        return json.dumps([[spec.name, list(spec.shape)] for spec in self.specs])

    @classmethod
    def from_json(cls, text: str) -> AdapterLayout:
        return cls.from_shapes({name: tuple(shape) for name, shape in json.loads(text)})

    # --- sub-layouts: what trains and travels ------------------------------------------

    def select(self, keep: Callable[[str], bool]) -> AdapterLayout:
        """The tensors whose name passes `keep`, packed into a shorter vector (same order)."""
        return AdapterLayout.from_shapes({spec.name: spec.shape for spec in self.specs if keep(spec.name)})

    def uploaded(self, mode: str) -> AdapterLayout:
        """The tensors a participant trains and sends in aggregation mode `mode` (`lora.mode`).

        In 'frozen-a' every lora_A is fixed from the run seed, so only lora_B and the fully
        trained tensors (e.g. a classifier head) travel; in the other modes everything does.
        Secure aggregation, clipping and noise act on this sub-vector.
        """
        return self.select(lambda name: not is_lora_a(name)) if mode == "frozen-a" else self

    def positions(self, sub: AdapterLayout) -> np.ndarray:
        """Indices into this layout's vector of every entry of `sub` (a `select` of it)."""
        by_name = {spec.name: spec for spec in self.specs}
        parts = []
        for spec in sub.specs:
            if spec.name not in by_name or by_name[spec.name].shape != spec.shape:
                raise ValueError(f"{spec.name} {spec.shape} is not a tensor of this layout")
            start = by_name[spec.name].offset
            parts.append(np.arange(start, start + spec.size))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def take(self, vector: np.ndarray, sub: AdapterLayout) -> np.ndarray:
        """The entries of `vector` that belong to `sub`, as `sub`'s vector."""
        check_vector(vector, self.size)
        return vector[self.positions(sub)]

    def put(self, vector: np.ndarray, sub: AdapterLayout, values: np.ndarray) -> np.ndarray:
        """A copy of `vector` with `sub`'s entries replaced by `values`."""
        check_vector(values, sub.size, "sub-vector")
        out = np.array(vector, dtype=np.float32, copy=True)
        out[self.positions(sub)] = values
        return out

    def trainable_mask(self, mode: str) -> np.ndarray:
        """Boolean mask over this layout's vector: True where `uploaded(mode)` has an entry."""
        mask = np.zeros(self.size, dtype=bool)
        mask[self.positions(self.uploaded(mode))] = True
        return mask

    def with_rank(self, rank: int) -> AdapterLayout:
        """The same adapter at LoRA rank `rank`: lora_A (r, in) and lora_B (out, r) resized."""
        shapes: dict[str, tuple[int, ...]] = {}
        for spec in self.specs:
            if is_lora_a(spec.name):
                shapes[spec.name] = (rank, *spec.shape[1:])
            elif is_lora_b(spec.name):
                shapes[spec.name] = (spec.shape[0], rank, *spec.shape[2:])
            else:
                shapes[spec.name] = spec.shape
        return AdapterLayout.from_shapes(shapes)

    @property
    def lora_rank(self) -> int:
        """The rank shared by every lora_A of this layout (0 when there is none)."""
        ranks = {spec.shape[0] for spec in self.specs if is_lora_a(spec.name)}
        if len(ranks) > 1:
            raise ValueError(f"layout mixes LoRA ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0


def check_vector(vector: np.ndarray, size: int, what: str = "adapter vector") -> None:
    """Reject vectors that would corrupt the global adapter: wrong shape, dtype or non-finite."""
    if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.shape[0] != size:
        shape = getattr(vector, "shape", type(vector).__name__)
        raise ValueError(f"{what} has shape {shape}, expected ({size},)")
    if not np.issubdtype(vector.dtype, np.floating):
        raise ValueError(f"{what} has dtype {vector.dtype}, expected float32")
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{what} holds {int(np.sum(~np.isfinite(vector)))} NaN or infinite values")


def _to_numpy(tensor: Any) -> np.ndarray:
    # bf16 tensors have no numpy dtype: go through float32 on the CPU.
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(tensor, dtype=np.float32)


def adapter_state(model: PeftModel) -> dict[str, np.ndarray]:
    """The adapter's own tensors (LoRA factors and any fully trained heads) as float32 arrays."""
    return {name: _to_numpy(tensor) for name, tensor in get_peft_model_state_dict(model).items()}


def adapter_vector(model: PeftModel) -> tuple[np.ndarray, AdapterLayout]:
    state = adapter_state(model)
    layout = AdapterLayout.from_state(state)
    return layout.flatten(state), layout


def load_adapter_vector(model: PeftModel, vector: np.ndarray, layout: AdapterLayout) -> None:
    """Overwrite the model's adapter weights in place with `vector`."""
    device = next(model.parameters()).device
    state = {name: torch.from_numpy(array.copy()).to(device) for name, array in layout.unflatten(vector).items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not found in the model: {unexpected[:3]}")


def save_peft_dir(path: Path, vector: np.ndarray, layout: AdapterLayout, peft_config: PeftConfig) -> Path:
    """Write a stock PEFT adapter directory from a flat vector.

    Its `base_model_name_or_path` is whatever `peft_config` says: `load_model` sets it to the
    configured `model.name` (`builtin:tiny-llama` or the operator's directory), never a cache path.
    """
    path.mkdir(parents=True, exist_ok=True)
    peft_config.save_pretrained(str(path))
    tensors = {name: np.ascontiguousarray(array) for name, array in layout.unflatten(vector).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def load_peft_dir(path: Path, layout: AdapterLayout) -> np.ndarray:
    """Read back an adapter directory written by `save_peft_dir` (or by PEFT) as a flat vector."""
    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; is {path} a PEFT adapter directory?")
    return layout.flatten(load_file(str(weights)))
