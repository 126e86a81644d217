"""Adapter state <-> one flat float32 vector, and PEFT-compatible save/load.

Every aggregation, robust rule, mask and noise step works on flat vectors; the layout
(names, shapes, offsets, in PEFT's state-dict order) is what makes a vector mean something
again. A saved adapter is a plain PEFT directory (`adapter_config.json` +
`adapter_model.safetensors`) that stock `PeftModel.from_pretrained` loads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file


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
    """Write a stock PEFT adapter directory from a flat vector."""
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
