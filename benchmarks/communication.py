"""Bytes a participant exchanges per round: the LoRA adapter against the full base model.

Each round a participant downloads the global adapter and uploads its delta, both as float32
vectors laid out by `fedlora.adapter`. In frozen-A mode only B (and any fully trained head)
is uploaded; the download is still the whole global adapter. The comparison is the full base model in bf16 (full fine-tuning would send this
both ways every round) and in NF4 (the one-off download of a QLoRA base).

The built-in models are loaded for real and their adapter vector counted; the published 7-8B
shapes are built on the meta device, so PEFT attaches the same adapter without allocating a
byte. NF4 size follows bitsandbytes' layout (checked against a quantised tiny Llama): packed
4-bit weights, one uint8 absmax per 64-value block, one fp32 absmax per 256 blocks, a 16-entry
and a 256-entry fp32 code table and an fp32 offset per layer; everything else stays bf16.

    python benchmarks/communication.py [--out benchmarks/results/communication.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from fedlora.adapter import AdapterLayout, adapter_vector
from fedlora.config import LoraSection, ModelSection
from fedlora.model import CLASSIFIER_HEADS, attach_lora, load_base_model

RESULTS = Path(__file__).parent / "results"
RANKS = (8, 16)
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LINEAR = ["query", "key", "value", "dense"]  # "dense": attention output, intermediate, output, pooler
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_LAYER_CONSTANTS = 4 * (16 + 256 + 1)  # NF4 code, nested absmax code, offset (fp32)


def llama3_8b() -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
    )


def mistral_7b() -> PretrainedConfig:
    return MistralConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False,
    )


def nf4_linear_bytes(numel: int) -> int:
    blocks = math.ceil(numel / NF4_BLOCK)
    return numel // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_LAYER_CONSTANTS


def full_model_bytes(base: torch.nn.Module, skip: list[str]) -> tuple[int, int, int]:
    """(parameters, bf16 bytes, NF4 bytes) of a base model before LoRA wraps its linears."""
    params = sum(p.numel() for p in base.parameters())
    quantised = [
        module.weight.numel()
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skip
    ]
    return params, 2 * params, 2 * (params - sum(quantised)) + sum(nf4_linear_bytes(n) for n in quantised)


def adapter_payload(model: PeftModel) -> tuple[AdapterLayout, int]:
    """The adapter's layout and float32 bytes; on real weights, of the flat vector that travels."""
    state = get_peft_model_state_dict(model)
    if next(iter(state.values())).is_meta:
        layout = AdapterLayout.from_state(state)
        return layout, 4 * layout.size
    vector, layout = adapter_vector(model)
    return layout, vector.nbytes


def row(model: str, source: str, base: torch.nn.Module, task: str, skip: list[str], r: int, targets: list[str]) -> dict:
    params, bf16_bytes, nf4_bytes = full_model_bytes(base, skip)
    peft_model = attach_lora(base, LoraSection(r=r, target_modules=targets), task, seed=0)
    layout, payload = adapter_payload(peft_model)
    frozen_a = 4 * layout.uploaded("frozen-a").size
    return {
        "model": model,
        "source": source,
        "base_params": params,
        "r": r,
        "targets": "all linear" if targets else "q,v (PEFT default)",
        "target_modules": sorted(peft_model.peft_config["default"].target_modules),
        "adapter_params": layout.size,
        "upload_bytes": payload,
        "download_bytes": payload,
        "frozen_a_upload_bytes": frozen_a,
        "frozen_a_download_bytes": payload,  # the coordinator sends the whole global vector in every mode
        "full_bf16_bytes": bf16_bytes,
        "full_nf4_bytes": nf4_bytes,
        "full_bf16_over_upload": bf16_bytes / payload,
    }


def builtin_base(name: str, task: str) -> torch.nn.Module:
    return load_base_model(ModelSection(name=name, task=task, quantization="none", device="cpu"), num_labels=2)


def meta_base(make_config: Callable[[], PretrainedConfig]) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(make_config())


def measure() -> list[dict]:
    """Every model x rank x target set; bases are rebuilt per row because LoRA wraps them in place."""
    models: list[tuple[str, str, Callable[[], torch.nn.Module], str, list[str], list[str]]] = [
        ("builtin:tiny-llama", "measured", lambda: builtin_base("builtin:tiny-llama", "generation"), "generation", ["lm_head"], LLAMA_LINEAR),
        ("builtin:minilm", "measured", lambda: builtin_base("builtin:minilm", "classification"), "classification", CLASSIFIER_HEADS, BERT_LINEAR),
        ("Llama-3-8B", "meta", lambda: meta_base(llama3_8b), "generation", ["lm_head"], LLAMA_LINEAR),
        ("Mistral-7B-v0.1", "meta", lambda: meta_base(mistral_7b), "generation", ["lm_head"], LLAMA_LINEAR),
    ]
    return [
        row(name, source, build(), task, skip, r, targets)
        for name, source, build, task, skip, all_linear in models
        for r in RANKS
        for targets in ([], all_linear)
    ]


def human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    exponent = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**exponent:.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | source | base params | r | targets | adapter params | upload = download (fp32) "
        "| frozen-A upload | full model bf16 | full model NF4 | bf16 model / upload |\n"
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {x['model']} | {x['source']} | {x['base_params'] / 1e6:,.1f} M | {x['r']} | "
        f"{x['targets']} | {x['adapter_params']:,} | {human(x['upload_bytes'])} | "
        f"{human(x['frozen_a_upload_bytes'])} | {human(x['full_bf16_bytes'])} | {human(x['full_nf4_bytes'])} | "
        f"{x['full_bf16_over_upload']:,.0f}x |"
        for x in rows
    ]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "communication.json")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()  # the fresh classifier head's load report is expected
    hf_logging.disable_progress_bar()
    rows = measure()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
