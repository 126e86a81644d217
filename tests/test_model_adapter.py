import json
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.adapter import AdapterLayout, adapter_state, adapter_vector, load_adapter_vector, load_peft_dir, save_peft_dir
from fedlora.cli import main
from fedlora.config import LoraSection, ModelSection, TrainSection
from fedlora.data import answer_choices, load_examples
from fedlora.config import DataSection
from fedlora.model import load_base_model, load_model
from fedlora.prompts import PromptFormat
from fedlora.train import train_local


@pytest.fixture(scope="module")
def nf4_model():
    return load_model(ModelSection(task="generation"), LoraSection(), [], seed=0)


def test_nf4_base_is_really_4bit_and_only_lora_trains(nf4_model) -> None:
    model = nf4_model.model
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised, "no bitsandbytes Linear4bit layers in the base"
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantised)
    assert all(m.weight.dtype == torch.uint8 for m in quantised)  # packed 4-bit pairs
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    base_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_before, layout = adapter_vector(model)
    examples = load_examples(DataSection(max_examples=32))
    train_local(model, nf4_model.tokenizer, examples, TrainSection(local_steps=2, batch_size=4), "generation", [], 128, seed=0, prompt_format=PromptFormat())
    lora_after, _ = adapter_vector(model)
    b_offsets = [s for s in layout.specs if "lora_B" in s.name]
    assert all(np.abs(lora_after[s.offset : s.offset + s.size]).sum() > 0 for s in b_offsets)  # B left zero-init
    assert all(torch.equal(base_before[name], p) for name, p in model.named_parameters() if not p.requires_grad)
    load_adapter_vector(model, lora_before, layout)


def test_adapter_vector_round_trip_is_lossless(nf4_model, tmp_path: Path) -> None:
    model = nf4_model.model
    vector, layout = adapter_vector(model)
    state = adapter_state(model)
    restored = layout.unflatten(vector)
    assert list(restored) == list(state)
    assert all(np.array_equal(restored[k], state[k]) for k in state)
    perturbed = vector + np.random.default_rng(0).normal(size=vector.shape).astype(np.float32)
    load_adapter_vector(model, perturbed, layout)
    assert np.array_equal(adapter_vector(model)[0], perturbed)
    save_peft_dir(tmp_path / "a", perturbed, layout, model.peft_config["default"])
    assert np.array_equal(load_peft_dir(tmp_path / "a", layout), perturbed)
    assert AdapterLayout.from_json(layout.to_json()) == layout
    load_adapter_vector(model, vector, layout)


def test_layout_rejects_wrong_shapes_and_nan(nf4_model) -> None:
    vector, layout = adapter_vector(nf4_model.model)
    with pytest.raises(ValueError, match="shape"):
        layout.unflatten(vector[:-1])
    bad = vector.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        layout.unflatten(bad)


def test_a_saved_adapter_names_its_builtin_base_and_loads_on_the_saved_base_in_stock_peft(tmp_path: Path) -> None:
    loaded = load_model(ModelSection(task="generation", quantization="none"), LoraSection(), [], seed=1)
    vector, layout = adapter_vector(loaded.model)
    trained = vector + np.random.default_rng(1).normal(scale=0.05, size=vector.shape).astype(np.float32)
    load_adapter_vector(loaded.model, trained, layout)
    save_peft_dir(tmp_path / "adapter", trained, layout, loaded.model.peft_config["default"])
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny-llama"  # not this machine's cache

    assert main(["model", "save", "builtin:tiny-llama", str(tmp_path / "base")]) == 0  # what a consumer runs
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    stock = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    ids = AutoTokenizer.from_pretrained(str(tmp_path / "base"))("### Record\nAge: 50\n### Answer\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


def test_classification_on_the_real_pretrained_encoder() -> None:
    labels = answer_choices(load_examples(DataSection()))
    loaded = load_model(ModelSection(name="builtin:minilm", task="classification"), LoraSection(), labels, seed=0)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    vector, layout = adapter_vector(loaded.model)
    assert any("classifier" in name for name in layout.names)  # the fresh head travels with the adapter
    again = load_model(ModelSection(name="builtin:minilm", task="classification"), LoraSection(), labels, seed=0)
    assert np.array_equal(adapter_vector(again.model)[0], vector)  # same seed, same initial adapter


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_base_model(ModelSection(name=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(("name", "task"), [("builtin:tiny-llama", "generation"), ("builtin:minilm", "classification")])
def test_bfloat16_compute_keeps_no_float32_base_copies_but_trains_adapters_in_float32(name: str, task: str) -> None:
    examples = load_examples(DataSection(max_examples=16))
    labels = answer_choices(examples)
    loaded = load_model(ModelSection(name=name, task=task, compute_dtype="bfloat16", device="cpu"), LoraSection(), labels, seed=0)
    frozen = {p.dtype for n, p in loaded.model.named_parameters() if not p.requires_grad and p.is_floating_point() and "classifier" not in n}
    assert frozen == {torch.bfloat16}  # embeddings, norms and lm_head: no float32 copies (PEFT keeps the head's original)
    trainable = {name: p.dtype for name, p in loaded.model.named_parameters() if p.requires_grad}
    assert set(trainable.values()) == {torch.float32}
    if task == "classification":
        assert any("classifier" in name for name in trainable)  # the fresh head trains in float32
    before, _ = adapter_vector(loaded.model)
    result = train_local(loaded.model, loaded.tokenizer, examples, TrainSection(local_steps=2, batch_size=4), task, labels, 128, seed=0, prompt_format=loaded.prompt_format)
    after, _ = adapter_vector(loaded.model)
    assert np.isfinite(result.mean_loss) and not np.array_equal(before, after)


def test_gradient_checkpointing_recomputes_but_trains_the_same_adapter() -> None:
    examples = load_examples(DataSection(max_examples=32))
    trained = {}
    for checkpointing in (False, True, False):
        loaded = load_model(ModelSection(task="generation", quantization="none", device="cpu"), LoraSection(), [], seed=0)
        if checkpointing is False and trained:  # the same model, after a checkpointed call, turns it off again
            loaded = trained["model"]
        train_cfg = TrainSection(local_steps=3, batch_size=4, gradient_checkpointing=checkpointing)
        layers = loaded.model.base_model.model.model.layers
        start, layout = adapter_vector(loaded.model)
        train_local(loaded.model, loaded.tokenizer, examples, train_cfg, "generation", [], 128, seed=0, prompt_format=PromptFormat())
        assert all(layer.gradient_checkpointing is checkpointing for layer in layers)
        trained[checkpointing] = adapter_vector(loaded.model)[0]
        load_adapter_vector(loaded.model, start, layout)
        trained["model"] = loaded
    np.testing.assert_allclose(trained[True], trained[False], rtol=1e-5, atol=1e-7)


def test_target_modules_that_the_checkpoint_lacks_are_named_with_the_ones_it_has() -> None:
    with pytest.raises(ValueError, match=r"\['query'\] are not linear layers of 'builtin:tiny-llama'.*'q_proj'"):
        load_model(ModelSection(task="generation", quantization="nf4"), LoraSection(target_modules=["q_proj", "query"]), [], seed=0)
    chosen = load_model(ModelSection(task="generation", quantization="nf4"), LoraSection(target_modules=["q_proj", "down_proj"]), [], seed=0)
    adapted = {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in chosen.model.named_parameters() if ".lora_A." in name}
    assert adapted == {"q_proj", "down_proj"}
