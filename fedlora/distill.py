"""Federated distillation on public prompts (`[distillation]`), as pure functions over vectors and tensors.

A participant's upload becomes `[adapter update (possibly empty) | prediction block]`: the block is its
predicted distributions on the first P public prompts (P x C, softmax at temperature T of `public_scores`:
a class head's logits, or for generation each of the C answer choices' log-likelihood), scaled
by prediction_clip / sqrt(P). A row of probabilities has L2 norm at most 1, so the block's norm is at
most prediction_clip whatever the predictions, and the scale is a fixed linear map: the mean of the
blocks, divided by it, is exactly the mean of the predictions (before any noise). The coordinator
splits the combined vector at the adapter's length (`split_upload`); `soft_targets` turns the mean
block back into P rows of probabilities (noise post-processed: negatives cut, rows renormalised).
Local training then adds weight * T^2 * KL(soft targets || softmax(student scores / T)) on batches of
the public prompts (`distillation_loss`; Hinton, Vinyals & Dean 2015).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedlora.config import Config, DataSection, DistillationSection
from fedlora.data import BUILTIN_TASKS, Example, builtin_text, chat_turns, conversation_example, instruction_example, jsonl_objects
from fedlora.prompts import PromptFormat

if TYPE_CHECKING:
    import torch

PREDICTION_BLOCK = "distillation.predictions"  # its name in metrics and in the decision record


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def public_data_problem(section: DistillationSection) -> str:
    """Why this party cannot use the public prompts the run names ('' when its own copy is the one named)."""
    path = Path(section.public_data)
    if not path.is_file():
        return f"distillation.public_data: {path} does not exist here; every party needs its own copy of the public prompts"
    actual = file_sha256(path)
    if actual != section.public_sha256:
        return (
            f"distillation.public_sha256: the public prompts at {path} have sha256 {actual}, but the run names "
            f"{section.public_sha256}; refusing to distil on another prompt set (fetch the consortium's file)"
        )
    return ""


def _csv_prompts(path: Path, data: DataSection) -> list[Example]:
    """Table records verbalised as data.dataset's are (its question), with the label column left out if present."""
    import pandas as pd

    from fedlora.data import format_prompt, record_text

    frame = pd.read_csv(path)
    task = BUILTIN_TASKS.get(data.dataset)
    label = data.label_column or (task.label_column if task else "")
    question = task.question if task and (not data.label_column or data.label_column == task.label_column) else f"What is the {label}?"
    dropped = {label, *data.drop_columns, *(task.drop_columns if task else ())}
    columns = [name for name in frame.columns if name not in dropped]
    prompts = []
    for row in frame.to_dict(orient="records"):
        text = record_text(row, columns)
        prompts.append(Example(format_prompt(text, question), "", row, request=(("user", f"{text}\n\n{question}"),)))
    return prompts


def _jsonl_prompts(path: Path) -> list[Example]:
    """instruction/input objects or chat messages ending in a user turn; any output or assistant answer is ignored."""
    prompts = []
    for line_number, item in jsonl_objects(path):
        where = f"{path}:{line_number}"
        if "messages" in item:
            turns = chat_turns(item["messages"], where)
            if turns[-1][0] == "assistant":  # a labelled conversation: its answer is ignored
                turns = turns[:-1]
            prompts.append(conversation_example(turns, ""))
        elif "instruction" in item:
            prompts.append(instruction_example(str(item["instruction"]), str(item.get("input", ""))))
        else:
            raise ValueError(f"distillation.public_data: {where}: expected keys instruction[/input] or messages, got {sorted(item)}")
    return prompts


def load_public_prompts(cfg: Config) -> list[Example]:
    """The first distillation.max_prompts public prompts (ValueError when the file has none or is not .jsonl/.csv)."""
    path = Path(cfg.distillation.public_data)
    if path.suffix == ".jsonl":
        prompts = _jsonl_prompts(path)
    elif path.suffix == ".csv":
        prompts = _csv_prompts(path, cfg.data)
    else:
        raise ValueError(f"distillation.public_data: {path} is neither a .jsonl nor a .csv file")
    if not prompts:
        raise ValueError(f"distillation.public_data: {path} holds no prompts")
    return prompts[: cfg.distillation.max_prompts]


def prediction_scale(prompts: int, prediction_clip: float) -> float:
    """The fixed factor that bounds any P x C block of probability rows by prediction_clip."""
    return prediction_clip / math.sqrt(prompts)


def encode_block(probabilities: np.ndarray, prediction_clip: float) -> np.ndarray:
    """P x C probabilities -> the flat block a participant appends to its upload (norm <= prediction_clip)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or not np.all(np.isfinite(probabilities)) or probabilities.min() < 0:
        raise ValueError("predictions must be a finite P x C array of probabilities")
    return (probabilities * prediction_scale(len(probabilities), prediction_clip)).reshape(-1).astype(np.float32)


def soft_targets(mean_block: np.ndarray, prompts: int, classes: int, prediction_clip: float) -> np.ndarray:
    """The round's mean block -> P x C soft targets: unscaled, noise's negatives cut, each row summing to 1
    (a row left with no mass, which only noise can make, becomes uniform)."""
    rows = np.asarray(mean_block, dtype=np.float64).reshape(prompts, classes) / prediction_scale(prompts, prediction_clip)
    rows = np.clip(rows, 0.0, None)
    sums = rows.sum(axis=1, keepdims=True)
    uniform = np.full_like(rows, 1.0 / classes)
    return np.where(sums > 0, rows / np.where(sums > 0, sums, 1.0), uniform).astype(np.float32)


def split_upload(vector: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(adapter part, prediction block) of an upload or of a combined update: the block is the last block_size values."""
    if block_size > vector.size:
        raise ValueError(f"a vector of {vector.size} values holds no prediction block of {block_size}")
    cut = vector.size - block_size
    return vector[:cut], vector[cut:]


def adapter_clip(clip_norm: float, prediction_clip: float) -> float:
    """What is left of robust.clip_norm for the adapter part: the two parts together stay within clip_norm."""
    return math.sqrt(max(clip_norm**2 - prediction_clip**2, 0.0))


def distillation_loss(student_scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(targets || softmax(student / T)), averaged over the batch (Hinton et al. 2015)."""
    import torch

    log_student = torch.log_softmax(student_scores.float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(log_student, targets.to(log_student.device, torch.float32), reduction="batchmean")
    return kl * temperature**2


@dataclass(frozen=True)
class PublicTargets:
    """What local training distils towards: the public prompts and the round's soft targets for them."""

    prompts: list[Example]
    targets: np.ndarray  # P x C, rows summing to 1
    weight: float
    temperature: float


def public_scores(
    model, tokenizer, prompts: list[Example], task: str, candidates: list[str], max_length: int, prompt_format: PromptFormat
) -> torch.Tensor:
    """P x C scores whose softmax at T is a site's prediction (with gradients when the model trains).

    Classification: the class head's logits. Generation: each answer choice's summed log-likelihood given the
    prompt, as evaluation scores it, so softmax at T = 1 is the model's own distribution over the choices and its
    argmax the answer accuracy counts (length-normalising would give neither).
    """
    if task == "generation":
        from fedlora.evaluate import candidate_scores

        return candidate_scores(model, tokenizer, prompts, candidates, max_length, prompt_format)
    device = next(model.parameters()).device
    batch = tokenizer([builtin_text(p) for p in prompts], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return model(**{k: v.to(device) for k, v in batch.items()}).logits


def predict(
    model, tokenizer, prompts: list[Example], task: str, candidates: list[str], max_length: int, temperature: float,
    *, prompt_format: PromptFormat, batch_size: int = 32,
) -> np.ndarray:
    """P x C: softmax(public_scores / T) of the model on each public prompt."""
    import torch

    was_training = model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            scores = public_scores(model, tokenizer, prompts[start : start + batch_size], task, candidates, max_length, prompt_format)
            rows.append(torch.softmax(scores.float() / temperature, dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(rows).astype(np.float64)


@dataclass(frozen=True)
class PredictionBlock:
    """The coordinator's view of the block: its shape, its scale, and whether it is all a site sends."""

    prompts: int
    classes: int
    prediction_clip: float
    prediction_only: bool

    @property
    def size(self) -> int:
        return self.prompts * self.classes

    @classmethod
    def of(cls, cfg: Config, classes: int) -> PredictionBlock:
        """The run's block, from the coordinator's own copy of the public prompts (ValueError when it is not the named one)."""
        problem = public_data_problem(cfg.distillation)
        if problem:
            raise ValueError(problem)
        if classes < 1:  # a generation task whose answers turned out free-form (more than a few distinct ones)
            raise ValueError(
                f"distillation: data.dataset={cfg.data.dataset!r} has free-form answers, so there is no bounded candidate set "
                "to predict over; list the answer choices in data.label_names, or turn distillation off"
            )
        prompts = len(load_public_prompts(cfg))
        return cls(prompts, classes, cfg.distillation.prediction_clip, cfg.distillation.prediction_only)

    def targets_from(self, mean_block: np.ndarray) -> np.ndarray:
        return soft_targets(mean_block, self.prompts, self.classes, self.prediction_clip)
