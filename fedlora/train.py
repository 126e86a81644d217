"""Local training: a plain loop over the participant's shard, whole step on one screen.

Only adapter parameters train (the base is frozen, NF4 or not; in frozen-a mode lora_A too).
The loss is the model's own: for a causal LM the prompt tokens carry label -100, so only the
answer is learned. With train.fedprox_mu > 0 the objective adds FedProx's proximal term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedlora.config import TrainSection
from fedlora.data import Example, make_batch


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int


def batches(examples: list[Example], batch_size: int, rng: np.random.Generator):
    """Endless shuffled mini-batches: epochs wrap so local_steps need not divide the shard."""
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def train_local(
    loaded_model: PeftModel,
    tokenizer,
    examples: list[Example],
    cfg: TrainSection,
    task: str,
    label_names: list[str],
    max_length: int,
    seed: int,
) -> TrainResult:
    if not examples:
        raise ValueError("this participant has no training examples")
    torch.manual_seed(seed)
    device = next(loaded_model.parameters()).device
    trainable = [p for p in loaded_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # FedProx (Li et al. 2020): the round's starting point, which the proximal term pulls towards.
    anchor = [p.detach().clone() for p in trainable] if cfg.fedprox_mu > 0 else []
    loaded_model.train()
    losses = []
    stream = batches(examples, cfg.batch_size, np.random.default_rng(seed))
    for _ in range(cfg.local_steps):
        batch = {k: v.to(device) for k, v in make_batch(next(stream), tokenizer, task, label_names, max_length).items()}
        loss = loaded_model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"local training loss became {loss.item()}; lower train.lr")
        objective = loss
        if cfg.fedprox_mu > 0:
            objective = loss + cfg.fedprox_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, anchor))
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        losses.append(loss.item())  # the task loss, comparable with and without the proximal term
    loaded_model.eval()
    return TrainResult(float(np.mean(losses)), cfg.local_steps, cfg.local_steps * cfg.batch_size)
