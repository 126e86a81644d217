"""Held-out evaluation: mean answer loss and answer accuracy.

For generation tasks with a few possible answers, the prediction is the answer the model
finds most likely (sum of token log-probabilities), which measures the task without
sampling. Free-form answers get a loss only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from peft import PeftModel

from fedlora.data import Example, causal_batch, classification_batch
from fedlora.prompts import PromptFormat


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float  # NaN when answers are free-form
    examples: int
    label_counts: list[int]  # held-out examples per class, in label order (empty when free-form): the majority reference


def _answer_logprobs(
    model: PeftModel, tokenizer, examples: list[Example], max_length: int, prompt_format: PromptFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed log-probability of the answer tokens, and the token count."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in causal_batch(examples, tokenizer, max_length, prompt_format).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logprobs * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def evaluate(
    model: PeftModel,
    tokenizer,
    examples: list[Example],
    task: str,
    label_names: list[str],
    max_length: int,
    batch_size: int = 32,
    *,
    prompt_format: PromptFormat,
) -> EvalResult:
    if not examples:
        raise ValueError("no evaluation examples")
    model.eval()
    total_loss, total_tokens, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if task == "classification":
            batch = classification_batch(chunk, tokenizer, label_names, max_length)
            device = next(model.parameters()).device
            out = model(**{k: v.to(device) for k, v in batch.items()})
            total_loss += out.loss.item() * len(chunk)
            total_tokens += len(chunk)
            correct += int((out.logits.argmax(-1).cpu() == batch["labels"]).sum())
            continue
        logprob, tokens = _answer_logprobs(model, tokenizer, chunk, max_length, prompt_format)
        total_loss -= logprob.sum().item()
        total_tokens += int(tokens.sum())
        if label_names:
            candidates = torch.stack(
                [
                    _answer_logprobs(model, tokenizer, [replace(e, response=name) for e in chunk], max_length, prompt_format)[0]
                    for name in label_names
                ],
                dim=1,
            )
            truth = torch.tensor([label_names.index(e.response) for e in chunk], device=candidates.device)
            correct += int((candidates.argmax(1) == truth).sum())
    accuracy = correct / len(examples) if (label_names or task == "classification") else float("nan")
    answers = [example.response for example in examples]
    counts = [answers.count(name) for name in label_names]
    return EvalResult(total_loss / max(total_tokens, 1), accuracy, len(examples), counts)
