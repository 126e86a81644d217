"""What a site needs in memory to train LoRA on common instruct bases, by size, in NF4 and bf16.

The bases are built from their published configs on the meta device (no weights, nothing
downloaded), so the counts are exact: frozen base weights in bf16 and in NF4 (bitsandbytes'
layout, `communication.nf4_linear_bytes`; embeddings, norms and lm_head stay bf16 as
`fedlora.model` keeps them), plus the trained LoRA weights, their gradients and AdamW's two
moments in float32 (16 bytes per trained parameter) for all seven linear projections at r=16.
Activations come on top and scale with batch x sequence length (train.gradient_checkpointing
keeps them to one layer's worth). The same bytes apply on CPU and GPU: bitsandbytes stores NF4
the same way on both.

    python benchmarks/base_memory.py [--out benchmarks/results/base_memory.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import LlamaConfig, MistralConfig, Phi3Config, PretrainedConfig, Qwen2Config

from communication import LLAMA_LINEAR, RESULTS, adapter_payload, full_model_bytes, human, meta_base
from fedlora.config import LoraSection
from fedlora.model import attach_lora

RANK = 16
PHI3_LINEAR = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Published config.json shapes of each checkpoint (Hugging Face model cards).
BASES: dict[str, tuple[type[PretrainedConfig], dict, list[str]]] = {
    "Llama-3.2-1B-Instruct": (LlamaConfig, dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True), LLAMA_LINEAR),
    "Llama-3.2-3B-Instruct": (LlamaConfig, dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True), LLAMA_LINEAR),
    "Phi-3-mini-4k-instruct": (Phi3Config, dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192, vocab_size=32064, tie_word_embeddings=False), PHI3_LINEAR),
    "Mistral-7B-Instruct-v0.3": (MistralConfig, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=32768, tie_word_embeddings=False), LLAMA_LINEAR),
    "Qwen2.5-7B-Instruct": (Qwen2Config, dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False), LLAMA_LINEAR),
    "Llama-3.1-8B-Instruct": (LlamaConfig, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False), LLAMA_LINEAR),
}


def measure(name: str) -> dict:
    config_class, shape, targets = BASES[name]
    base = meta_base(lambda: config_class(**shape))
    params, bf16_bytes, nf4_bytes = full_model_bytes(base, ["lm_head"])
    layout, adapter_bytes = adapter_payload(attach_lora(base, LoraSection(r=RANK, target_modules=targets), "generation", seed=0))
    training_state = 4 * adapter_bytes  # weights, gradients and two AdamW moments, float32
    return {
        "model": name,
        "base_params": params,
        "target_modules": targets,
        "r": RANK,
        "adapter_params": layout.size,
        "base_bf16_bytes": bf16_bytes,
        "base_nf4_bytes": nf4_bytes,
        "lora_training_state_bytes": training_state,
        "nf4_total_bytes": nf4_bytes + training_state,
        "bf16_total_bytes": bf16_bytes + training_state,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| base | params | targets | base bf16 | base NF4 | LoRA r=16 + AdamW | total NF4 | total bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base_params'] / 1e9:.2f} B | {','.join(t.removesuffix('_proj') for t in r['target_modules'])} | "
            f"{human(r['base_bf16_bytes'])} | {human(r['base_nf4_bytes'])} | {human(r['lora_training_state_bytes'])} | "
            f"{human(r['nf4_total_bytes'])} | {human(r['bf16_total_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "base_memory.json")
    args = parser.parse_args(argv)
    rows = [measure(name) for name in BASES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
