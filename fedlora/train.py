"""Local training: a plain loop over the participant's shard, whole step on one screen.

Only adapter parameters train (the base is frozen, NF4 or not; in frozen-a mode lora_A too).
The loss is the model's own: for a causal LM the prompt tokens carry label -100, so only the
answer is learned. With train.fedprox_mu > 0 the objective adds FedProx's proximal term.
With privacy.local_noise_multiplier > 0 the step is DP-SGD (fedlora/privacy/local_dp.py):
Poisson batches, one loss per record, and Opacus's per-example clip-and-noise optimizer step.
With train.gradient_checkpointing the decoder layers recompute their activations in backward
(non-reentrant checkpointing: it needs no gradient on the frozen embedding's output).
With `distill` (federated distillation, fedlora/distill.py) each step also takes a batch of the public
prompts and adds weight * T^2 * KL(soft targets || student) to the objective; the student's scores are its
class logits, or (generation) its answer choices' log-likelihoods, one forward pass per choice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedlora.config import PrivacySection, TrainSection
from fedlora.data import Example, make_batch
from fedlora.distill import PublicTargets, distillation_loss, public_scores
from fedlora.prompts import PromptFormat


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples_seen: int
    local_epsilon: float | None = None  # sample-level epsilon spent so far (DP-SGD only)
    distill_loss: float | None = None  # mean distillation term (before its weight), when distilling


if TYPE_CHECKING:  # opacus (3 s to import) is loaded only when DP-SGD is on
    from opacus.accountants import RDPAccountant


def round_lr(train: TrainSection, server_round: int, rounds: int) -> float:
    """The learning rate of `server_round` (1-based) of `rounds` under train.lr_schedule."""
    if train.lr_schedule == "constant" or rounds <= 1:
        return train.lr
    progress = min(max(server_round - 1, 0) / (rounds - 1), 1.0)
    return train.lr * (train.lr_floor + (1 - train.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Share of the round's rate at local step `step` (0-based): rising linearly over the first warmup_steps."""
    return 1.0 if step >= warmup_steps else (step + 1) / (warmup_steps + 1)


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
    privacy: PrivacySection | None = None,
    accountant: RDPAccountant | None = None,
    *,
    prompt_format: PromptFormat,
    distill: PublicTargets | None = None,
) -> TrainResult:
    """Train the adapter in place; with local DP, `accountant` is stepped once per step."""
    if not examples:
        raise ValueError("this participant has no training examples")
    dp = privacy is not None and privacy.local_noise_multiplier > 0  # the config refuses DP-SGD with FedProx
    torch.manual_seed(seed)
    device = next(loaded_model.parameters()).device
    trainable = [p for p in loaded_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # FedProx (Li et al. 2020): the round's starting point, which the proximal term pulls towards.
    anchor = [p.detach().clone() for p in trainable] if cfg.fedprox_mu > 0 else []
    if dp:  # the noise and the draws come from os.urandom, never from `seed`
        from opacus.accountants import RDPAccountant

        from fedlora.privacy import local_dp

        rate = local_dp.sample_rate(cfg.batch_size, len(examples))
        optimizer = local_dp.private_optimizer(optimizer, privacy, min(cfg.batch_size, len(examples)), device)
        stream = local_dp.poisson_batches(examples, rate, cfg.local_steps, local_dp.unseeded_generator())
        accountant = accountant if accountant is not None else RDPAccountant()
    else:
        stream = batches(examples, cfg.batch_size, np.random.default_rng(seed))
    # The public prompts' batches, index by index so each comes with its soft-target row (the config refuses DP-SGD here).
    public = batches(list(range(len(distill.prompts))), cfg.batch_size, np.random.default_rng([seed, 1])) if distill else None
    distill_losses = []
    if cfg.gradient_checkpointing:
        loaded_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif loaded_model.is_activation_checkpointing:  # a process reuses its model across configurations
        loaded_model.activation_checkpointing_disable()
    loaded_model.train()
    losses, seen = [], 0
    with local_dp.per_example_gradients(loaded_model) if dp else nullcontext():
        for step in range(cfg.local_steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * warmup_factor(step, cfg.warmup_steps)
            picked = next(stream)
            if picked:
                batch = {k: v.to(device) for k, v in make_batch(picked, tokenizer, task, label_names, max_length, prompt_format).items()}
                if dp:  # each record's own loss: the model's token mean would mix records
                    labels = batch.pop("labels")
                    loss = local_dp.example_losses(loaded_model(**batch).logits, labels, task).mean()
                else:
                    loss = loaded_model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"local training loss became {loss.item()}; lower train.lr")
                objective = loss
                if cfg.fedprox_mu > 0:
                    objective = loss + cfg.fedprox_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(trainable, anchor))
                if distill is not None:  # learn from the federation's predictions on the public prompts
                    rows = next(public)
                    prompts = [distill.prompts[i] for i in rows]
                    scores = public_scores(loaded_model, tokenizer, prompts, task, label_names, max_length, prompt_format)
                    term = distillation_loss(scores, torch.from_numpy(distill.targets[rows]), distill.temperature)
                    objective = objective + distill.weight * term
                    distill_losses.append(term.item())
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                losses.append(loss.item())  # the task loss, comparable with and without the proximal term
                seen += len(picked)
            else:  # an empty Poisson draw (DP only) is still a step: noise alone
                optimizer.zero_grad(set_to_none=True)
                local_dp.mark_empty_batch(optimizer)
            optimizer.step()
            if dp:
                accountant.step(noise_multiplier=privacy.local_noise_multiplier, sample_rate=rate)
    loaded_model.eval()
    epsilon = accountant.get_epsilon(delta=privacy.local_delta) if dp else None
    distilled = float(np.mean(distill_losses)) if distill_losses else None
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), cfg.local_steps, seen, epsilon, distilled)
