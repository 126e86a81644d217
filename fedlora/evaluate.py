"""Held-out evaluation: mean answer loss, and answer accuracy or generation quality.

For generation tasks with a few possible answers, the prediction is the answer the model
finds most likely (sum of token log-probabilities), which measures the task without
sampling. Free-form answers are decoded greedily on a bounded number of held-out records
(`[evaluation]`) and scored against the reference (`fedlora.text_metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from peft import PeftModel

from fedlora.config import EvaluationSection
from fedlora.data import Example, causal_batch, classification_batch
from fedlora.prompts import PromptFormat, encode_request
from fedlora.text_metrics import mean_scores

NAN = float("nan")


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float  # NaN when answers are free-form
    examples: int
    label_counts: list[int]  # held-out examples per class, in label order (empty when free-form): the majority reference
    # Generation quality on free-form answers, over the `generated` records decoded; NaN when none were.
    exact_match: float = NAN
    token_f1: float = NAN
    rouge_l: float = NAN
    generated: int = 0


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


def candidate_scores(
    model: PeftModel, tokenizer, examples: list[Example], candidates: list[str], max_length: int, prompt_format: PromptFormat
) -> torch.Tensor:
    """len(examples) x len(candidates): each candidate's summed answer log-probability given the example's prompt,
    encoded as training encodes it (end-of-answer token included). Differentiable: distillation trains through it."""
    return torch.stack(
        [_answer_logprobs(model, tokenizer, [replace(e, response=c) for e in examples], max_length, prompt_format)[0] for c in candidates],
        dim=1,
    )


def stop_tokens(model: PeftModel, tokenizer) -> list[int]:
    """Where an answer ends: the tokenizer's EOS and any end-of-turn token the model's generation config names."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({token for token in [tokenizer.eos_token_id, *configured] if token is not None})


@torch.no_grad()
def greedy_answers(
    model: PeftModel, tokenizer, questions: list[Example], prompt_format: PromptFormat, room: int, max_new_tokens: int,
    time_s: float = 0.0, batch_size: int = 8,
) -> list[str]:
    """Greedy answers to questions, each encoded as training encodes it up to its answer, in `room` tokens.

    Batches are left-padded so every answer starts right after its prompt. With `time_s` > 0, decoding
    stops after the batch that passes it: the answers to a prefix of `questions` come back.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    started, answers = time.monotonic(), []
    for start in range(0, len(questions), batch_size):
        encoded = [encode_request(question, tokenizer, prompt_format, room) for question in questions[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            eos_token_id=stop_tokens(model, tokenizer),
        )
        answers += [text.strip() for text in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        if time_s and time.monotonic() - started > time_s:
            break
    return answers


@torch.no_grad()
def evaluate(
    model: PeftModel,
    tokenizer,
    examples: list[Example],
    task: str,
    label_names: list[str],
    max_length: int,
    batch_size: int = 32,
    generation: EvaluationSection | None = None,
    *,
    prompt_format: PromptFormat,
) -> EvalResult:
    """Loss on `examples`; accuracy over few answers, or with `generation`, greedy-decoding scores on free-form ones."""
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
            candidates = candidate_scores(model, tokenizer, chunk, label_names, max_length, prompt_format)
            truth = torch.tensor([label_names.index(e.response) for e in chunk], device=candidates.device)
            correct += int((candidates.argmax(1) == truth).sum())
    accuracy = correct / len(examples) if (label_names or task == "classification") else NAN
    answers = [example.response for example in examples]
    counts = [answers.count(name) for name in label_names]
    scores = {}
    if task == "generation" and not label_names and generation and generation.generate_examples:
        decoded = examples[: generation.generate_examples]
        room = max_length - generation.max_new_tokens  # the answer's budget, as training keeps the answer whole
        predictions = greedy_answers(model, tokenizer, decoded, prompt_format, room, generation.max_new_tokens, generation.generate_time_s)
        scores = mean_scores(predictions, [e.response for e in decoded[: len(predictions)]]) | {"generated": len(predictions)}
    return EvalResult(total_loss / max(total_tokens, 1), accuracy, len(examples), counts, **scores)
