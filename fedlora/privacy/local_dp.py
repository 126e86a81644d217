"""Sample-level DP-SGD on one participant (Abadi et al. 2016), built from Opacus's own parts.

What `fedlora/train.py` needs around its plain loop when privacy.local_noise_multiplier > 0:
- Per-example gradients: Opacus's `GradSampleHooks` attached to the PEFT model itself (no
  wrapper module). Hooks go only on modules with trainable parameters, i.e. the LoRA
  `nn.Linear`s (and a trained classification head), which Opacus's registered `nn.Linear`
  sampler handles; the frozen NF4 `bnb.nn.Linear4bit` bases and embeddings get none and need
  none. Opacus's validator (strict=True) accepts the model as it is.
- Per-example losses: the model's own causal-LM loss averages tokens over the whole batch,
  so one record's gradient would depend on the others' lengths; DP needs each record's own
  loss, averaged over the batch (the "mean" reduction Opacus expects).
- Clipping, noise and averaging: Opacus's `DPOptimizer` around the loop's AdamW: clip each
  example to privacy.local_max_grad_norm, add N(0, (z * C)^2) to the sum, divide by the
  expected batch size. Noise in `secure_mode` (robust to floating-point attacks).
- Sampling: Poisson, each record in each step with rate q = batch_size / records, via
  Opacus's `UniformWithReplacementSampler`, which the RDP accounting assumes. An empty draw
  is still a step: the update is noise only.
- Accounting: Opacus's `RDPAccountant`; its state is the plain list of (z, q, steps).

Randomness: sampling and noise come from generators seeded from `os.urandom`, never from the
run's seed, so fixing federation.seed (for a reproducible simulation) does not fix the noise
a participant's privacy rests on. These are torch's generators, not a CSPRNG (Opacus's full
secure mode needs torchcsprng); a deployment that needs that should swap them here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedlora.config import PrivacySection
from fedlora.data import Example


def sample_rate(batch_size: int, records: int) -> float:
    """Poisson rate q giving train.batch_size records per step on average."""
    return min(1.0, batch_size / records)


def noise_for_target(epsilon: float, delta: float, rate: float, steps: int) -> float:
    """The DP-SGD noise multiplier at which `steps` Poisson steps at `rate` spend at most `epsilon` at `delta`
    (Opacus's search over its RDP accountant, the one every step is charged to)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant="rdp"))


def unseeded_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS entropy pool: no run seed reproduces its draws."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def load_accountant(state: dict | None) -> RDPAccountant:
    """An RDP accountant resumed from its `state_dict()` (plain data), or a fresh one."""
    accountant = RDPAccountant()
    if state:
        accountant.load_state_dict(state)
    return accountant


def epsilon_after(accountant: RDPAccountant, privacy: PrivacySection, rate: float, steps: int) -> float:
    """Sample-level epsilon at privacy.local_delta once `steps` more DP-SGD steps are taken (a dry run)."""
    trial = load_accountant(accountant.state_dict())
    for _ in range(steps):
        trial.step(noise_multiplier=privacy.local_noise_multiplier, sample_rate=rate)
    return trial.get_epsilon(delta=privacy.local_delta)


def poisson_batches(examples: list[Example], rate: float, steps: int, generator: torch.Generator) -> Iterator[list[Example]]:
    """`steps` Poisson draws of the shard (each record independently with probability `rate`)."""
    sampler = UniformWithReplacementSampler(num_samples=len(examples), sample_rate=rate, steps=steps, generator=generator)
    for indices in sampler:
        yield [examples[i] for i in indices]


def private_optimizer(optimizer: torch.optim.Optimizer, privacy: PrivacySection, expected_batch_size: int, device: torch.device) -> DPOptimizer:
    """`optimizer` behind Opacus's clip-noise-average step."""
    return DPOptimizer(
        optimizer,
        noise_multiplier=privacy.local_noise_multiplier,
        max_grad_norm=privacy.local_max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=unseeded_generator(device),
        secure_mode=True,
    )


@contextmanager
def per_example_gradients(model: torch.nn.Module):
    """Opacus hooks that fill `p.grad_sample` for each trainable parameter during backward."""
    hooks = GradSampleHooks(model, loss_reduction="mean", strict=True)
    try:
        with warnings.catch_warnings():
            # The first LoRA layer's input comes from a frozen embedding, so its full backward
            # hook fires with respect to outputs only, which is all Opacus's Linear sampler reads.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
            yield hooks
    finally:
        hooks.cleanup()  # hooks off, grad_sample & co. removed from the parameters
        for module in model.modules():
            module.__dict__.pop("activations", None)
            module.__dict__.pop("max_batch_len", None)


def mark_empty_batch(optimizer: DPOptimizer) -> None:
    """An empty Poisson draw: zero per-example gradients, so the step adds noise only."""
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))


def example_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """One loss per record: mean over its answer tokens (causal LM) or its class cross-entropy."""
    logits = logits.float()
    if task == "classification":
        return F.cross_entropy(logits, labels, reduction="none")
    targets = labels[:, 1:]  # token t predicts token t + 1, as in the model's own loss
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    return token_losses.sum(dim=1) / (targets != -100).sum(dim=1).clamp(min=1)
