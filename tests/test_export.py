"""Exports for serving stacks (fedlora/export.py): a signed version as PEFT, merged model and GGUF LoRA.

The version is made cheaply: the tiny Llama's PEFT adapter with random (nonzero) factors, saved
and signed as a run would, so merging changes the model and every value can be compared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.cli import main
from fedlora.export import GGUF_FILE, RECORD, export_version, gguf_tensor_name, llama_heads, rope_rows_for_gguf
from fedlora.model import base_model_dir, model_fingerprint
from fedlora.registry import load_or_create_key, withdraw_version
from tests.conftest import TINY_BASE, signed_version, trusted
from tests.test_light_commands import run_light

BASE = TINY_BASE
ALL_MODULES = "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return signed_version(tmp_path_factory.mktemp("export"), [ALL_MODULES], scale=0.05)


def record(target: Path) -> dict:
    return json.loads((target / RECORD).read_text())


def test_the_peft_export_is_the_default_states_its_source_and_loads_in_stock_peft(version: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # still a light command: it imports no model stack (tests/test_light_commands.py)
    assert run_light("adapter", "export", "final", str(tmp_path / "peft"), "--run", str(version.parents[1]))[:2] == (0, [])
    manifest = json.loads((version / "manifest.json").read_text())
    stated = record(tmp_path / "peft")
    assert stated["format"] == "peft" and stated["source_version"] == "final" and not stated["withdrawn"]
    assert stated["manifest_signature"] == manifest["signature"]
    assert stated["base_model_sha256"] == manifest["facts"]["base_model_sha256"]
    assert not (tmp_path / "peft" / "manifest.json").exists()
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir(BASE)), str(tmp_path / "peft"))
    assert any("lora_B" in name for name, _ in stock.named_parameters())


def test_a_merged_export_computes_what_base_plus_adapter_computes(version: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "merged"
    assert main(["adapter", "export", str(version), str(target), "--format", "merged"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = tokenizer("### user\nIs the patient diabetic?\n### assistant\n", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(BASE), dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(version)).eval()(**prompt).logits
        merged = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()(**prompt).logits
        plain = AutoModelForCausalLM.from_pretrained(base_model_dir(BASE), dtype=torch.float32).eval()(**prompt).logits
    assert torch.allclose(merged, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(plain, expected, atol=1e-2)  # the adapter does change the model
    assert record(target)["format"] == "merged" and record(target)["base_model_sha256"] == model_fingerprint(BASE)


def test_an_export_on_another_base_than_the_signed_one_is_refused(version: Path, tmp_path: Path) -> None:
    for fmt in ("merged", "gguf"):
        with pytest.raises(ValueError, match="fingerprint"):
            export_version(version, tmp_path / fmt, trusted(version), fmt, base="builtin:minilm")
        assert not (tmp_path / fmt).exists()


def test_the_gguf_export_has_llama_cpp_names_shapes_and_values(version: Path, tmp_path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    export_version(version, tmp_path / "gguf", trusted(version), "gguf")
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / GGUF_FILE))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(16.0)
    config = json.loads((base_model_dir(BASE) / "config.json").read_text())
    heads, kv_heads = llama_heads(config)
    state = load_file(str(version / "adapter_model.safetensors"))
    read = {tensor.name: tensor for tensor in reader.tensors}
    assert set(read) == {gguf_tensor_name(name) for name in state} and len(read) == 2 * 7 * config["num_hidden_layers"]
    for name, array in state.items():
        tensor = read[gguf_tensor_name(name)]
        assert tuple(tensor.data.shape) == array.shape and list(tensor.shape) == list(reversed(array.shape))
        if ".lora_B." in name and (".q_proj." in name or ".k_proj." in name):
            array = rope_rows_for_gguf(array, heads if ".q_proj." in name else kv_heads)
        np.testing.assert_array_equal(tensor.data, array)
    # llama.cpp's loader: a.ne[0] == the base's input width, b.ne[1] == its output width, a.ne[1] == b.ne[0]
    q_a, q_b = read["blk.0.attn_q.weight.lora_a"], read["blk.0.attn_q.weight.lora_b"]
    assert q_a.shape[0] == config["hidden_size"] and q_b.shape[1] == heads * config["head_dim"] and q_a.shape[1] == q_b.shape[0] == 8
    assert record(tmp_path / "gguf")["format"] == "gguf"


def test_the_gguf_rows_of_q_and_k_follow_llama_cpp_interleaved_rotary_order() -> None:
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: halves [0 1 | 2 3]
    assert rope_rows_for_gguf(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_gguf_refuses_a_base_that_is_not_llama_and_modules_it_has_no_slot_for() -> None:
    with pytest.raises(ValueError, match="Llama-architecture"):
        llama_heads({"model_type": "bert", "num_attention_heads": 12})
    with pytest.raises(ValueError, match="no LoRA slot"):
        gguf_tensor_name("base_model.model.lm_head.lora_A.weight")
    assert gguf_tensor_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == "blk.3.ffn_down.weight.lora_b"


def test_a_version_that_does_not_verify_is_exported_in_no_format(version: Path, tmp_path: Path) -> None:
    copy = tmp_path / "final"
    shutil.copytree(version, copy)
    (copy / "notes.txt").write_text("added later")
    for fmt in ("peft", "merged", "gguf"):
        with pytest.raises(ValueError, match="does not verify"):
            export_version(copy, tmp_path / f"out-{fmt}", trusted(version), fmt)
        assert not (tmp_path / f"out-{fmt}").exists()


def test_a_withdrawn_version_is_exported_only_when_forced_and_its_record_says_so(version: Path, tmp_path: Path) -> None:
    copy = tmp_path / "round-0003"
    shutil.copytree(version, copy)
    facts = {"participants": ["participant-1"], "withdrawn_at": "2026-12-07T00:00:00Z", "reason": "the hospital left"}
    withdraw_version(copy, load_or_create_key(version.parents[1] / "coordinator.key"), facts)
    with pytest.raises(ValueError, match="WITHDRAWN"):
        export_version(copy, tmp_path / "refused", trusted(version), "gguf")
    export_version(copy, tmp_path / "forced", trusted(version), "gguf", force=True)
    assert record(tmp_path / "forced")["withdrawn"] and record(tmp_path / "forced")["source_version"] == "round-0003"
