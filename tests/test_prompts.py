"""Prompt formats (fedlora/prompts.py): a base's chat template where it has one, the built-in format otherwise.

The chat base is `builtin:tiny-llama-chat`: the tiny Llama whose tokenizer_config.json carries a chat
template, so every check runs on a real Hugging Face directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.config import DataSection, ModelSection, load_config
from fedlora.data import conversation_example, instruction_example, load_examples
from fedlora.export import export_version
from fedlora.generate import answer, open_version, question_example
from fedlora.model import base_model_dir, load_tokenizer
from fedlora.prompts import BUILTIN, CHAT_TEMPLATE, PromptFormat, encode_example, encode_request, resolve_prompt_format
from fedlora.registry import MANIFEST
from tests.conftest import SMALL, TINY_BASE, chat_base, signed_version, trusted

TEMPLATE = PromptFormat(CHAT_TEMPLATE)
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Age: 50; BMI: 31. Diabetic?"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "And hypertensive?"},
    {"role": "assistant", "content": "no"},
]


@pytest.fixture(scope="module")
def chat_dir() -> str:
    """A real Hugging Face directory whose tokenizer carries a chat template."""
    return str(base_model_dir("builtin:tiny-llama-chat"))


@pytest.fixture(scope="module")
def tokenizer(chat_dir: str):
    return load_tokenizer(ModelSection(name=chat_dir))


def chat_example(tmp_path: Path, conversation: list[dict]) -> object:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    return load_examples(DataSection(dataset=str(path)))[0]


def labelled_spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans += [current] if current else []
    return [tokenizer.decode(span) for span in spans]


def test_the_template_tokens_are_the_templates_own_and_only_assistant_turns_are_trained(tokenizer, tmp_path: Path) -> None:
    example = chat_example(tmp_path, CONVERSATION)
    ids, labels = encode_example(example, tokenizer, TEMPLATE, max_length=512)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    # Both answers, each with its end-of-turn token; never the system prompt, the questions or the role headers.
    assert labelled_spans(ids, labels, tokenizer) == ["yes</s>\n", "no</s>\n"]


def test_the_built_in_format_trains_every_assistant_turn_and_keeps_single_turns_unchanged(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(ModelSection())
    example = chat_example(tmp_path, CONVERSATION)
    ids, labels = encode_example(example, tokenizer, PromptFormat(BUILTIN), max_length=512)
    assert labelled_spans(ids, labels, tokenizer) == ["yes", "no</s>"]
    assert tokenizer.decode(ids).startswith("<s>### system\nAnswer in one word.\n### user\nAge: 50")
    single = instruction_example("Diabetic?", "Age: 50", "yes")
    ids, labels = encode_example(single, tokenizer, PromptFormat(BUILTIN), max_length=512)
    expected = [tokenizer.bos_token_id, *tokenizer("### Record\nAge: 50\n### Question\nDiabetic?\n### Answer\n", add_special_tokens=False)["input_ids"]]
    assert ids[: len(expected)] == expected and labelled_spans(ids, labels, tokenizer) == ["yes</s>"]


def test_a_long_conversation_is_cut_from_the_left_keeping_bos_and_the_last_answer(tokenizer, tmp_path: Path) -> None:
    example = chat_example(tmp_path, CONVERSATION)
    ids, labels = encode_example(example, tokenizer, TEMPLATE, max_length=12)
    assert len(ids) == len(labels) == 12 and ids[0] == tokenizer.bos_token_id
    assert labelled_spans(ids, labels, tokenizer)[-1] == "no</s>\n"


def test_a_system_prompt_is_added_unless_the_conversation_has_its_own(tokenizer, tmp_path: Path) -> None:
    told = PromptFormat(CHAT_TEMPLATE, "You are a clinical assistant.")
    table = load_examples(DataSection(dataset="diabetes", max_examples=1))[0]
    text = tokenizer.decode(encode_request(table, tokenizer, told, 512))
    assert text.startswith("<s><|system|>\nYou are a clinical assistant.</s>\n<|user|>\n") and text.endswith("<|assistant|>\n")
    assert "Does the patient have diabetes?" in text and "###" not in text
    own = tokenizer.decode(encode_request(chat_example(tmp_path, CONVERSATION), tokenizer, told, 512))
    assert "clinical assistant" not in own and "Answer in one word." in own
    builtin = load_tokenizer(ModelSection())
    assert builtin.decode(encode_request(table, builtin, PromptFormat(BUILTIN, "Be brief."), 512)).startswith("<s>### system\nBe brief.\n### Record\n")


def test_auto_picks_the_template_only_where_the_base_has_one_and_chat_template_without_one_is_refused(tokenizer) -> None:
    assert resolve_prompt_format("auto", "", tokenizer, "chat").name == CHAT_TEMPLATE
    assert resolve_prompt_format("builtin", "", tokenizer, "chat").name == BUILTIN
    plain = load_tokenizer(ModelSection())
    assert resolve_prompt_format("auto", "", plain, TINY_BASE).name == BUILTIN
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_prompt_format("chat-template", "", plain, TINY_BASE)
    with pytest.raises(ValueError, match="model.prompt_format"):
        load_config(None, ["model.prompt_format=jinja"])


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    rewriting = "{% for m in messages %}[{{ messages|length }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    tokenizer = load_tokenizer(ModelSection(name=chat_base(tmp_path / "rewriting", rewriting)))
    with pytest.raises(ValueError, match="renders a conversation differently"):
        encode_example(chat_example(tmp_path, CONVERSATION), tokenizer, TEMPLATE, 512)


def stock_template_answer(chat_dir: str, version: Path, messages: list[dict], max_new_tokens: int) -> str:
    """What stock transformers + PEFT answer, greedily, to the tokenizer's own chat template of `messages`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)])
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_dir, dtype=torch.float32), str(version)).eval()
    with torch.no_grad():
        out = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_generation_asks_in_the_template_the_manifest_records(chat_dir: str, tmp_path: Path) -> None:
    recorded = {"prompt_format": {"name": CHAT_TEMPLATE, "system_prompt": "Be brief."}}
    version = signed_version(tmp_path, [], scale=0.2, base=chat_dir, facts=recorded)
    answerer = open_version(version, trusted(version), None, "none", False, tmp_path)
    assert answerer.prompt_format == PromptFormat(CHAT_TEMPLATE, "Be brief.")
    question = question_example({"messages": CONVERSATION[:4]}, "question")
    got = answer(answerer, question, 6)
    assert got == stock_template_answer(chat_dir, version, CONVERSATION[:4], 6)
    exported = export_version(version, tmp_path / "served", trusted(version))  # what vLLM or TGI would load
    assert stock_template_answer(chat_dir, exported, CONVERSATION[:4], 6) == got
    with pytest.raises(ValueError, match="must end with a user message"):
        question_example({"messages": CONVERSATION}, "question")


def test_a_federation_on_a_chat_base_records_its_format_and_its_version_answers(chat_dir: str, tmp_path: Path) -> None:
    from fedlora.simulation import simulate

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Age {k}. Diabetic?"}, {"role": "assistant", "content": "yes" if k % 2 else "no"}]}) + "\n" for k in range(40)))
    overrides = ["model.name=builtin:tiny-llama-chat", f"data.dataset={data}", "model.system_prompt=Answer yes or no.", "federation.rounds=1", "federation.participants=2", "train.local_steps=2"]
    cfg = load_config(None, [*SMALL, *overrides])
    simulate(cfg, tmp_path / "run")
    facts = json.loads((tmp_path / "run" / "adapters" / "final" / MANIFEST).read_text())["facts"]
    assert facts["prompt_format"] == {"name": CHAT_TEMPLATE, "system_prompt": "Answer yes or no."}
    assert facts["label_names"] == ["no", "yes"]
    version = tmp_path / "run" / "adapters" / "final"
    answerer = open_version(version, (tmp_path / "run" / "coordinator.pub").read_bytes(), None, "none", False, tmp_path / "run")
    told = [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Age 3. Diabetic?"}]
    assert answer(answerer, conversation_example([("user", "Age 3. Diabetic?")], ""), 3) == stock_template_answer(chat_dir, version, told, 3)


def test_a_version_trained_in_a_chat_template_is_refused_on_a_base_without_one(tmp_path: Path) -> None:
    version = signed_version(tmp_path, [], scale=0.2, facts={"prompt_format": {"name": CHAT_TEMPLATE, "system_prompt": ""}})
    with pytest.raises(ValueError, match="trained in its base's chat template, but the tokenizer of 'builtin:tiny-llama' has none"):
        open_version(version, trusted(version), None, "none", False, tmp_path)
