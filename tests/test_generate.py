"""`fedlora generate` (fedlora/generate.py): answers from a verified version only, on its own base, as training formats prompts.

The version is made cheaply as in tests/test_export.py: the tiny Llama's adapter with random
(nonzero) factors, saved and signed as a run would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapter import adapter_vector, save_peft_dir
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.data import instruction_example
from fedlora.generate import answer, class_names, open_version, read_questions
from fedlora.model import base_model_dir, load_model, model_fingerprint
from fedlora.registry import load_or_create_key, sign_adapter
from tests.conftest import SMALL, TINY_BASE, signed_version, trusted

BASE = TINY_BASE
QUESTION = "Is the patient diabetic?"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return signed_version(tmp_path_factory.mktemp("generate"), [], scale=0.2)


def stock_greedy(version: Path, prompt: str, max_new_tokens: int) -> str:
    """What stock transformers + PEFT answer, greedily, to BOS + the prompt as training tokenises it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(BASE))
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(BASE), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(version)).eval()
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_an_answer_is_the_greedy_answer_of_stock_peft_on_the_training_prompt(version: Path) -> None:
    answerer = open_version(version, trusted(version), None, "none", False, version.parents[1])
    question = instruction_example(QUESTION)
    assert question.prompt == f"### Question\n{QUESTION}\n### Answer\n"
    got = answer(answerer, question, 8)
    assert got == stock_greedy(version, question.prompt, 8)
    assert got == answer(answerer, question, 8)  # greedy: the same every time


def test_the_cli_answers_a_prompt_on_the_default_nf4_base_without_a_coordinator(version: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "final", "--run", str(version.parents[1]), "--prompt", QUESTION, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_a_tampered_version_is_refused_with_its_problem(version: Path, tmp_path: Path) -> None:
    copy = tmp_path / "final"
    shutil.copytree(version, copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"does not verify.*adapter_model\.safetensors: its SHA-256 differs"):
        open_version(copy, trusted(version), None, "none", False, tmp_path)


def test_a_base_with_another_fingerprint_is_refused(version: Path) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        open_version(version, trusted(version), "builtin:minilm", "none", False, version.parents[1])


def test_jsonl_questions_come_back_with_their_answers(version: Path, tmp_path: Path) -> None:
    questions = [{"question": QUESTION, "id": 7}, {"instruction": "Summarise the record", "input": "Age: 50; BMI: 31"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(item) + "\n" for item in questions))
    argv = ["generate", str(version), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main([*argv, "--quantization", "none", "--max-new-tokens", "4"]) == 0
    answered = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in item.items() if k != "answer"} for item in answered] == questions
    answerer = open_version(version, trusted(version), None, "none", False, version.parents[1])
    assert answered[1]["answer"] == answer(answerer, instruction_example("Summarise the record", "Age: 50; BMI: 31"), 4)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "ok"}', "{not json"], r"in\.jsonl:2: not valid JSON"),
        (['{"question": "ok"}', "", '{"prompt": "  "}'], r"in\.jsonl:3: the 'prompt' field is empty"),
        (['{"output": "yes"}'], r"in\.jsonl:1: expected a 'prompt', 'question', 'instruction' or 'messages' field"),
        (['["a list"]'], r"in\.jsonl:1: expected a JSON object"),
    ],
)
def test_a_bad_question_line_is_named_by_its_number(tmp_path: Path, lines: list[str], message: str) -> None:
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_questions(tmp_path / "in.jsonl")


def test_a_missing_file_or_an_empty_prompt_fails_before_any_model_loads(version: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(version), "--input", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err
    assert main(["generate", str(version), "--prompt", " "]) == 2
    assert "--prompt: the 'prompt' field is empty" in capsys.readouterr().err


def test_a_classification_version_answers_with_the_class_stock_peft_predicts(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = load_config(None, [*SMALL, "model.quantization=none", "model.task=classification"])
    model = load_model(cfg.model, cfg.lora, ["no", "yes"], seed=0).model
    _, layout = adapter_vector(model)
    vector = np.random.default_rng(1).normal(0.0, 0.2, layout.size).astype(np.float32)
    directory = save_peft_dir(tmp_path / "adapters" / "final", vector, layout, model.peft_config["default"])
    facts = {"base_model": BASE, "base_model_sha256": model_fingerprint(BASE), "label_names": ["no", "yes"]}
    sign_adapter(directory, load_or_create_key(tmp_path / "coordinator.key"), facts)
    answerer = open_version(directory, (tmp_path / "coordinator.pub").read_bytes(), None, "none", False, tmp_path)
    question = instruction_example(QUESTION)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(BASE))
    base = AutoModelForSequenceClassification.from_pretrained(base_model_dir(BASE), num_labels=2, pad_token_id=tokenizer.eos_token_id)
    stock = PeftModel.from_pretrained(base, str(directory)).eval()
    with torch.no_grad():
        predicted = int(stock(**tokenizer([question.prompt], return_tensors="pt")).logits[0].argmax())
    assert answer(answerer, question, 4) == ["no", "yes"][predicted]


def test_class_names_come_from_the_manifest_else_the_run_config_else_an_error_says_where(tmp_path: Path) -> None:
    version = tmp_path / "run" / "adapters" / "final"
    version.mkdir(parents=True)
    assert class_names(version, {"label_names": ["low", "high"]}, tmp_path) == ["low", "high"]
    with pytest.raises(ValueError, match="pass --run"):
        class_names(version, {}, tmp_path)
    (tmp_path / "run" / "config.toml").write_text('[data]\nlabel_names = ["no", "yes"]\n')
    assert class_names(version, {}, tmp_path) == ["no", "yes"]
