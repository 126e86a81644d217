"""Local training in lora.mode='sb': each lora_B is parametrised as B0 R so that only R (r x r) trains.

Kept apart from `fedlora.aggregate.sb` (numpy only) because it needs torch. When training ends the
parametrisation is removed and lora_B holds B0 R again, so the adapter the site reads out, saves
or evaluates is a standard PEFT LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.utils import parametrize


class BTimesR(torch.nn.Module):
    """lora_B's weight as B0 R: R (float32, started at B0^T lora_B) is the only trained parameter."""

    def __init__(self, b0: torch.Tensor, start: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("b0", b0.float())
        self.r = torch.nn.Parameter(b0.float().T @ start.float())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return (self.b0 @ self.r).to(original.dtype)


@contextmanager
def train_r_only(model: torch.nn.Module, basis: Callable[[str, int, int], np.ndarray]) -> Iterator[None]:
    """Within the block, every `*.lora_B.default` Linear of `model` is B0 R with B0 = basis(name, out, rank) fixed."""
    wrapped = []
    for name, module in model.named_modules():
        if not name.endswith(".lora_B.default") or not isinstance(module, torch.nn.Linear):
            continue
        out, rank = module.weight.shape
        b0 = torch.tensor(basis(name, out, rank)).to(module.weight.device)
        parametrize.register_parametrization(module, "weight", BTimesR(b0, module.weight.detach()), unsafe=True)
        module.parametrizations.weight.original.requires_grad_(False)
        wrapped.append(module)
    try:
        yield
    finally:
        for module in wrapped:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(False)
