"""Exports of a signed adapter version for serving stacks: PEFT, a merged full model, a GGUF LoRA.

`registry.export_adapter` verifies the version and copies it as a plain PEFT directory; the
other formats are built from that copy. vLLM and TGI load the PEFT directory as a LoRA; stacks
without LoRA support get the base with the adapter merged in (`merged`, a Hugging Face
directory that GPTQ/AWQ tooling can then quantise); llama.cpp gets a GGUF LoRA adapter
(`gguf`, Llama-architecture bases only). A merged model or a GGUF file only means something on
the base the adapter was trained on, so both refuse a base whose fingerprint is not the
manifest's `base_model_sha256`. Every export carries `EXPORT.json`: the format, the source
version, its manifest and the base fingerprint, so a served file can be traced to a signed version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.personal_adapter import check_personal, copy_personal, personal_record
from fedlora.registry import MANIFEST, export_adapter, require_verified, trusted_key, withdrawal_of

FORMATS = ("peft", "merged", "gguf")
RECORD = "EXPORT.json"
GGUF_FILE = "adapter.gguf"
# Hugging Face Llama module -> llama.cpp's tensor name in block i (llama-arch.cpp's LLM_TENSOR_*).
GGUF_MODULES = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
PEFT_LORA_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def export_version(
    source: Path, target: Path, public_key_pem: bytes, fmt: str = "peft", base: str | None = None, force: bool = False,
    personal: Path | None = None,
) -> Path:
    """Verify version `source`, write it to `target` in format `fmt`, check the result; returns `target`.

    `base` (merged, gguf) defaults to the manifest's `facts.base_model`. With `personal` (a site's
    personalised adapter of `source`'s run, fedlora/personal_adapter.py) that adapter is written instead,
    once `source` verifies and the two have the same shape.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    source, target = Path(source), Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    manifest = json.loads((source / MANIFEST).read_text()) if (source / MANIFEST).is_file() else {}
    facts = manifest.get("facts") or {}
    base = base or facts.get("base_model")
    existed = target.exists()

    def adapter_copy(destination: Path) -> Path:
        if personal is None:
            return export_adapter(source, destination, public_key_pem, force)
        require_verified(source, public_key_pem, force, "export a personalisation of it")
        check_personal(source, Path(personal))
        return copy_personal(Path(personal), destination)

    try:
        if fmt == "peft":
            adapter_copy(target)
            check_peft(target)
            return write_record(target, fmt, source, manifest, public_key_pem, base, personal)
        with tempfile.TemporaryDirectory(prefix="fedlora-export-") as staging:
            adapter = adapter_copy(Path(staging) / "peft")
            base_dir = checked_base(base or "", facts.get("base_model_sha256"))
            target.mkdir(parents=True, exist_ok=True)
            if fmt == "merged":
                write_merged(adapter, base_dir, target)
                check_merged(target)
            else:
                write_gguf(adapter, base_dir, target / GGUF_FILE)
                check_gguf(target / GGUF_FILE)
        return write_record(target, fmt, source, manifest, public_key_pem, base, personal)
    except BaseException:
        if not existed:  # a failed export leaves nothing a consumer could take for a good one
            shutil.rmtree(target, ignore_errors=True)
        raise


def checked_base(name: str, expected_sha256: str | None) -> Path:
    """The base's directory, refused unless its fingerprint is the one the version was signed for."""
    from fedlora.model import base_model_dir, model_fingerprint

    if not name:
        raise ValueError("the manifest names no base model (facts.base_model); pass --base")
    actual = model_fingerprint(name)
    if actual != expected_sha256:
        raise ValueError(
            f"base {name!r} has fingerprint {actual}, but the version was trained on {expected_sha256} "
            "(manifest facts.base_model_sha256); pass --base with that model (`fedlora model hash DIR` prints a fingerprint)"
        )
    return base_model_dir(name)


def write_record(
    target: Path, fmt: str, source: Path, manifest: dict[str, Any], public_key_pem: bytes, base: str | None, personal: Path | None = None
) -> Path:
    """EXPORT.json: what a served file was made from, so it can be traced back to a signed version (and, for a
    personalised adapter, to the site's own weights)."""
    facts = manifest.get("facts") or {}
    withdrawal, _ = withdrawal_of(source, trusted_key(public_key_pem))
    record = {
        "format": fmt,
        "source_version": source.resolve().name,
        "manifest_signature": manifest["signature"],
        "manifest_sha256": hashlib.sha256((source / MANIFEST).read_bytes()).hexdigest(),
        "base_model": base or facts.get("base_model"),
        "base_model_sha256": facts.get("base_model_sha256"),
        "withdrawn": withdrawal is not None,  # only with --force
    }
    if personal is not None:  # the site's own weights, personalising the signed version named above
        record["personalised"] = personal_record(Path(personal))
    (target / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return target


def check_peft(directory: Path) -> None:
    """The written directory is what stock PEFT reads: a LoRA config, and weights that all read back.

    Read without PEFT itself, so that the default export stays a command that imports no model
    stack (tests/test_light_commands.py); tests/test_export.py loads the result in stock PEFT.
    """
    from safetensors import safe_open

    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: adapter_config.json names peft_type {config.get('peft_type')!r}, not LORA")
    with safe_open(str(directory / "adapter_model.safetensors"), framework="numpy") as weights:
        names = list(weights.keys())
        for name in names:
            weights.get_tensor(name)
    if not names:
        raise ValueError(f"{directory}: adapter_model.safetensors holds no tensors")


def write_merged(adapter: Path, base_dir: Path, target: Path) -> None:
    """Base + adapter merged in float32 (never on quantised weights: merging into NF4 rounds the
    update away), saved in the dtype the base declares, with the base's tokenizer if it has one."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = PeftConfig.from_pretrained(str(adapter)).task_type
    if task != "CAUSAL_LM":
        raise ValueError(f"--format merged writes causal language models; this adapter's task is {task}")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    declared = declared_dtype(json.loads((base_dir / "config.json").read_text()))
    merged.to(getattr(torch, declared)).save_pretrained(target)
    if (base_dir / "tokenizer.json").is_file() or (base_dir / "tokenizer.model").is_file():
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)


def declared_dtype(config: dict[str, Any]) -> str:
    """The dtype a base's config.json declares (transformers 5 `dtype`, older `torch_dtype`), else float32."""
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def check_merged(directory: Path) -> None:
    from transformers import AutoConfig

    AutoConfig.from_pretrained(directory)
    if not any(directory.glob("*.safetensors")):
        raise ValueError(f"{directory}: the merged model wrote no weights")


def gguf_tensor_name(peft_name: str) -> str:
    """llama.cpp's name of a PEFT LoRA tensor: blk.{i}.attn_q.weight.lora_a and so on."""
    match = PEFT_LORA_NAME.fullmatch(peft_name)
    if not match or match.group(2) not in GGUF_MODULES:
        raise ValueError(
            f"{peft_name}: llama.cpp has no LoRA slot for it; --format gguf takes LoRA on {', '.join(GGUF_MODULES)} only"
        )
    layer, module, factor = match.groups()
    return f"blk.{layer}.{GGUF_MODULES[module]}.weight.lora_{factor.lower()}"


def llama_heads(config: dict[str, Any]) -> tuple[int, int]:
    """(query heads, key/value heads) of a Llama config, refusing other architectures."""
    if config.get("model_type") != "llama":
        raise ValueError(
            f"--format gguf writes LoRA for Llama-architecture bases; this base is {config.get('model_type')!r}. "
            "Use --format merged and convert the merged model with llama.cpp's convert_hf_to_gguf.py"
        )
    heads = int(config["num_attention_heads"])
    return heads, int(config.get("num_key_value_heads") or heads)


def rope_rows_for_gguf(lora_b: np.ndarray, heads: int) -> np.ndarray:
    """lora_b of q_proj/k_proj with its rows in llama.cpp's order.

    llama.cpp's converter reorders each head's q and k rows from Hugging Face's rotary layout
    (two halves) to the interleaved one (pairs); lora_b's rows are those same output rows, so
    they move with them, while lora_a (input side) is unchanged.
    """
    rows, rank = lora_b.shape
    return lora_b.reshape(heads, 2, rows // heads // 2, rank).swapaxes(1, 2).reshape(rows, rank)


def gguf_tensors(state: dict[str, np.ndarray], heads: int, kv_heads: int) -> dict[str, np.ndarray]:
    """GGUF name -> array, float32, in PEFT's layout: lora_a (r, in), lora_b (out, r).

    The GGUF writer stores numpy shapes reversed, which gives the ne = [in, r] and [r, out]
    llama.cpp's loader checks against the base tensor.
    """
    tensors = {}
    for name, array in state.items():
        array = np.asarray(array, dtype=np.float32)
        if ".lora_B." in name and ".q_proj." in name:
            array = rope_rows_for_gguf(array, heads)
        elif ".lora_B." in name and ".k_proj." in name:
            array = rope_rows_for_gguf(array, kv_heads)
        tensors[gguf_tensor_name(name)] = np.ascontiguousarray(array)
    return tensors


def lora_alpha(adapter_config: dict[str, Any]) -> float:
    """The alpha llama.cpp scales by (alpha / r, as PEFT does); refuses what it cannot express."""
    unsupported = [key for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern") if adapter_config.get(key)]
    if unsupported:
        raise ValueError(f"--format gguf: llama.cpp's LoRA has one alpha / r scale; this adapter sets {', '.join(unsupported)}")
    return float(adapter_config["lora_alpha"])


def write_gguf(adapter: Path, base_dir: Path, path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    heads, kv_heads = llama_heads(json.loads((base_dir / "config.json").read_text()))
    tensors = gguf_tensors(load_file(str(adapter / "adapter_model.safetensors")), heads, kv_heads)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_alpha(json.loads((adapter / "adapter_config.json").read_text())))
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_gguf(path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    if gguf_string(reader, gguf.Keys.General.TYPE) != "adapter" or gguf_string(reader, gguf.Keys.Adapter.TYPE) != "lora":
        raise ValueError(f"{path}: not read back as a GGUF LoRA adapter")
    if not reader.tensors:
        raise ValueError(f"{path}: no tensors read back")


def gguf_string(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    return None if field is None else str(field.contents())
