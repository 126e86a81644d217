"""Does llama.cpp itself load fedlora's GGUF LoRA export and compute what PEFT computes?

Not a test: llama.cpp (here through `llama-cpp-python`, built from source, about 20 minutes on 2
cores) and its converter are not project dependencies. The check builds a signed version of the
tiny Llama with a random adapter on all seven projections, exports it with
`fedlora adapter export --format gguf`, converts the base with llama.cpp's own
`convert_hf_to_gguf.py` (float32; the built-in tokenizer's pre-tokenizer is GPT-2's byte-level
one, which the converter cannot recognise by hash, so it is named), and compares llama.cpp's
logits on a token sequence, with and without `--lora`, with transformers + PEFT in float32.

    pip install llama-cpp-python sentencepiece   # builds llama.cpp
    python benchmarks/llama_cpp_check.py --llama-cpp-src DIR   # DIR: a llama.cpp checkout (or the sdist's vendor/llama.cpp)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
BASE = "builtin:tiny-llama"
ALL_LINEAR = '["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
TOKENS = [1, 40, 41, 42, 43, 44, 45, 300, 301, 302, 2]
# Runs llama.cpp's converter with the pre-tokenizer named instead of recognised by its hash.
CONVERT = """
import runpy, sys
source = sys.argv[1]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(source + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def signed_random_version(root: Path) -> Path:
    """A version of the tiny Llama with random LoRA factors on every projection, signed as a run signs one."""
    from fedlora.adapter import adapter_vector, save_peft_dir
    from fedlora.config import load_config
    from fedlora.model import load_model, model_fingerprint
    from fedlora.registry import load_or_create_key, sign_adapter

    cfg = load_config(None, ["model.task=generation", "model.quantization=none", f"lora.target_modules={ALL_LINEAR}"])
    model = load_model(cfg.model, cfg.lora, [], seed=0).model
    _, layout = adapter_vector(model)
    vector = np.random.default_rng(0).normal(0.0, 0.3, layout.size).astype(np.float32)
    directory = save_peft_dir(root / "adapters" / "final", vector, layout, model.peft_config["default"])
    sign_adapter(directory, load_or_create_key(root / "coordinator.key"), {"base_model": BASE, "base_model_sha256": model_fingerprint(BASE)})
    return directory


def peft_logits(version: Path) -> tuple[np.ndarray, np.ndarray]:
    """(base, base + adapter) logits of TOKENS with transformers and stock PEFT, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.model import base_model_dir

    base = AutoModelForCausalLM.from_pretrained(base_model_dir(BASE), dtype=torch.float32)
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        plain = base(input_ids=ids).logits[0].numpy()
        tuned = PeftModel.from_pretrained(base, str(version)).eval()(input_ids=ids).logits[0].numpy()
    return plain, tuned


def llama_cpp_logits(base_gguf: Path, lora: Path | None) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-src", type=Path, required=True, help="llama.cpp source directory (holds convert_hf_to_gguf.py)")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama-cpp.json")
    args = parser.parse_args(argv)
    import llama_cpp

    from fedlora.export import export_version
    from fedlora.model import base_model_dir

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        version = signed_random_version(root)
        adapter = export_version(version, root / "gguf", (root / "coordinator.pub").read_bytes(), "gguf") / "adapter.gguf"
        base_gguf = root / "base.gguf"
        subprocess.run([sys.executable, "-c", CONVERT, str(args.llama_cpp_src), str(base_model_dir(BASE)), "--outfile", str(base_gguf), "--outtype", "f32"], check=True, capture_output=True)
        plain, tuned = peft_logits(version)
        cpp_plain, cpp_tuned = llama_cpp_logits(base_gguf, None), llama_cpp_logits(base_gguf, adapter)
    result = {
        "llama_cpp_python": llama_cpp.__version__,
        "tokens": len(TOKENS),
        "base_max_abs_diff": float(np.abs(cpp_plain - plain).max()),
        "adapter_max_abs_diff": float(np.abs(cpp_tuned - tuned).max()),
        "adapter_effect_max_abs": float(np.abs(tuned - plain).max()),
        "same_argmax_with_adapter": float(np.mean(cpp_tuned.argmax(-1) == tuned.argmax(-1))),
    }
    result["adapter_diff_over_effect"] = result["adapter_max_abs_diff"] / result["adapter_effect_max_abs"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
