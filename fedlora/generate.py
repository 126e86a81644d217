"""`fedlora generate`: answers from a signed adapter version, on any machine holding it and the coordinator's key.

The version is verified first (`registry.require_verified`: a changed or added file, or another
signer, is refused; a withdrawn version unless forced) and the base must have the fingerprint the
version was signed for (`export.checked_base`), so an answer always comes from the adapter the
consortium published, on the base it was trained on. No coordinator is involved: a site needs only
the version directory and `coordinator.pub`.

Each question is formatted as training formatted a JSONL instruction or chat conversation, in the
prompt format and with the system prompt the version's signed manifest records (the base's chat
template, or the built-in format: `fedlora.prompts`), and answered greedily, not sampled, so a
question asked again on the same base and hardware gets the same answer; a classification adapter
answers with its predicted class name instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data import Example, builtin_text, chat_turns, conversation_example, instruction_example, jsonl_objects
from fedlora.export import checked_base
from fedlora.personal_adapter import check_personal
from fedlora.prompts import CHAT_TEMPLATE, PromptFormat, format_from_facts
from fedlora.registry import MANIFEST, require_verified

PROMPT_FIELDS = ("prompt", "question", "instruction")
# --quantization -> (model.quantization, model.compute_dtype) of the project's loader.
QUANTIZATIONS = {"nf4": ("nf4", "auto"), "bf16": ("none", "bfloat16"), "none": ("none", "float32")}


@dataclass
class Answerer:
    """A base with the version's adapter attached, its tokenizer, its class names (empty: it generates) and the
    prompt format it was trained in."""

    model: Any
    tokenizer: Any
    label_names: list[str]
    prompt_format: PromptFormat


def question_example(item: dict[str, Any], where: str) -> Example:
    """One question as training saw its kind: a prompt (or question, or instruction) with an optional input,
    or a chat conversation ('messages') that ends with a user turn."""
    if "messages" in item:
        turns = chat_turns(item["messages"], where)
        if turns[-1][0] != "user":
            raise ValueError(f"{where}: 'messages' must end with a user message, the question to answer")
        return conversation_example(turns, "")
    key = next((key for key in PROMPT_FIELDS if key in item), None)
    if key is None:
        raise ValueError(f"{where}: expected a 'prompt', 'question', 'instruction' or 'messages' field, got {sorted(item)}")
    text = item[key]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the {key!r} field is empty")
    return instruction_example(text, str(item.get("input") or ""))


def read_questions(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, each checked to hold a question before any model loads."""
    if not path.is_file():
        raise FileNotFoundError(f"--input: {path} does not exist")
    items = []
    for number, item in jsonl_objects(path):
        question_example(item, f"{path}:{number}")
        items.append(item)
    if not items:
        raise ValueError(f"--input: {path} holds no questions")
    return items


def write_answers(path: Path, items: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def class_names(directory: Path, facts: dict[str, Any], run: Path) -> list[str]:
    """A classification version's class names: its manifest's, else its run's `data.label_names`."""
    if facts.get("label_names"):
        return list(facts["label_names"])
    from fedlora.config import load_config

    for config in (directory.resolve().parents[1] / "config.toml", Path(run) / "config.toml"):
        names = load_config(config).data.label_names if config.is_file() else []
        if names:
            return list(names)
    raise ValueError(
        f"{directory} is a classification adapter, but neither its manifest (facts.label_names) nor its run's config.toml "
        "(data.label_names) names its classes; pass --run with the run directory"
    )


def open_version(
    directory: Path, public_key_pem: bytes, base: str | None, quantization: str, force: bool, run: Path, personal: Path | None = None
) -> Answerer:
    """Verify the version and its base, then load the base with the adapter attached by stock PEFT: the version's,
    or a site's `personal` adapter of the same shape (fedlora/personal_adapter.py), asked as the version is."""
    from peft import PeftConfig, PeftModel

    from fedlora.config import ModelSection
    from fedlora.model import load_base_model, load_tokenizer

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization: {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    require_verified(directory, public_key_pem, force, "answer with it")
    if personal is not None:
        check_personal(directory, personal)
    facts = json.loads((directory / MANIFEST).read_text()).get("facts") or {}
    name = base or facts.get("base_model") or ""
    checked_base(name, facts.get("base_model_sha256"))
    classifies = PeftConfig.from_pretrained(str(directory)).task_type == "SEQ_CLS"
    prompt_format = format_from_facts(facts)
    label_names = class_names(directory, facts, run) if classifies else []
    weights, dtype = QUANTIZATIONS[quantization]
    cfg = ModelSection(name=name, task="classification" if classifies else "generation", quantization=weights, compute_dtype=dtype)
    tokenizer = load_tokenizer(cfg)
    if prompt_format.name == CHAT_TEMPLATE and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{directory} was trained in its base's chat template, but the tokenizer of {name!r} has none")
    model = load_base_model(cfg, num_labels=len(label_names))
    if classifies and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # as training sets it (model.load_model)
    return Answerer(PeftModel.from_pretrained(model, str(personal or directory)).eval(), tokenizer, label_names, prompt_format)


def answer(answerer: Answerer, question: Example, max_new_tokens: int) -> str:
    """The greedy answer to a question, or the predicted class name of a classification adapter."""
    import torch

    from fedlora.evaluate import greedy_answers

    model, tokenizer = answerer.model, answerer.tokenizer
    context = int(getattr(model.config, "max_position_embeddings", 512))
    if not answerer.label_names:
        return greedy_answers(model, tokenizer, [question], answerer.prompt_format, context - max_new_tokens, max_new_tokens)[0]
    with torch.no_grad():
        batch = tokenizer([builtin_text(question)], truncation=True, max_length=context, return_tensors="pt").to(next(model.parameters()).device)
        return answerer.label_names[int(model(**batch).logits[0].argmax())]


def answer_all(answerer: Answerer, items: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Each question object with its `answer` added."""
    return [item | {"answer": answer(answerer, question_example(item, f"question {i}"), max_new_tokens)} for i, item in enumerate(items, 1)]
