"""Local training throughput and memory: a fedlora participant against a bare PEFT loop.

Three implementations train the same model:

- fedlora: `participant.runtime.train_round`, what a participant runs each round: load the
  global adapter into the model, `fedlora.train.train_local` (tokenising each batch as it goes),
  take the delta of the adapter and clip it;
- bare: what a user writes with transformers + peft alone: the same base loaded with the same
  `BitsAndBytesConfig` and dtype, `get_peft_model` with the same LoRA config, AdamW, and a loop
  over batches tokenised before the clock starts (the best case for the bare loop);
- peft-kbit: the bare loop after PEFT's `prepare_model_for_kbit_training`, the usual QLoRA
  recipe, which upcasts every unquantised weight (embeddings, norms, lm_head) to float32.

All three see the same model, records, batches (same order, same padding) and steps, so their
mean losses agree. Throughput: per model one process loads all three, warms each up with a
short round, then times `--repeats` rounds of each in rotating order, side by side, so other
load on the machine hits them alike; each ratio to the bare loop pairs rounds of the same
repeat. Tokens/s counts the tokens the model reads (attention mask), not padding. Memory: each
implementation alone in its own process, the kernel's peak RSS over one timed round (VmHWM,
reset after loading) and, on CUDA, `torch.cuda.max_memory_allocated` over it.

    python benchmarks/training.py [--models tiny-llama,llama-60m] [--device auto] [--steps 20] [--repeats 5]
    python benchmarks/training.py --models llama-1b --device cuda --gradient-checkpointing   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memory import machine, reset_rss_peak, rss_peak, write_llama

RESULTS = Path(__file__).parent / "results"
IMPLEMENTATIONS = ("fedlora", "bare", "peft-kbit")
# name -> Llama shape (hidden, layers, intermediate, heads, kv heads); None: the built-in model.
MODELS: dict[str, tuple[int, int, int, int, int] | None] = {
    "tiny-llama": None,
    "llama-60m": (512, 8, 1536, 8, 8),
    "llama-1b": (2048, 16, 5632, 32, 8),
}
WARMUP_STEPS = 2


def benchmark_config(model_dir: str, args: argparse.Namespace):
    from fedlora.config import load_config

    return load_config(None, [
        f"model.name={json.dumps(model_dir)}", f"model.device={json.dumps(args.device)}",
        f"model.quantization={json.dumps(args.quantization)}", "lora.mode='fedavg'",
        f"train.batch_size={args.batch_size}", f"train.local_steps={args.steps}",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"data.max_length={args.max_length}", "data.max_examples=2048",
    ])


def timed_batches(cfg, tokenizer, examples, seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """The batches `train_local` draws with this seed, tokenised as it tokenises them."""
    import numpy as np

    from fedlora.data import make_batch
    from fedlora.prompts import resolve_prompt_format
    from fedlora.train import batches

    stream = batches(examples, cfg.train.batch_size, np.random.default_rng(seed))
    prompt_format = resolve_prompt_format(cfg.model.prompt_format, cfg.model.system_prompt, tokenizer, cfg.model.name)
    return [make_batch(next(stream), tokenizer, cfg.model.task, [], cfg.data.max_length, prompt_format) for _ in range(steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fedlora_round(cfg, examples) -> tuple[Callable[[int, int], float], object]:
    """A participant's model and the function that runs one round of it (steps, round) -> mean loss."""
    import dataclasses

    from fedlora.adapter import adapter_vector
    from fedlora.model import load_model
    from fedlora.partition import Shard
    from participant.runtime import ParticipantRuntime, train_round

    loaded = load_model(cfg.model, cfg.lora, [], cfg.federation.seed)
    start, layout = adapter_vector(loaded.model)
    runtime = ParticipantRuntime(loaded, layout, Shard(examples, []), 0, cfg.lora.r)

    def run(steps: int, server_round: int) -> float:
        round_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=steps))
        return train_round(runtime, round_cfg, start, server_round)[1]["train_loss"]

    return run, loaded


def bare_loop(cfg, kbit: bool) -> tuple[Callable[[list[dict[str, torch.Tensor]]], float], object, object]:
    """transformers + peft alone: the same base and adapter, a plain loop over ready batches.

    Like a participant's round, each call starts from the same adapter with a fresh optimiser, so
    the timed round's losses can be compared with fedlora's.
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedlora.model import base_model_dir

    device = torch.device("cuda" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    quantization = None if cfg.model.quantization == "none" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"],
    )
    path = base_model_dir(cfg.model.name)  # the built-in model's directory; any other is a directory already
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype, device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if kbit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.federation.seed)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, task_type=TaskType.CAUSAL_LM))
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in trainable]
    model.train()

    def run(ready: list[dict[str, torch.Tensor]]) -> float:
        with torch.no_grad():
            for p, p0 in zip(trainable, initial):
                p.copy_(p0)
        optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr)
        losses = []
        for batch in ready:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    return run, model, tokenizer


def prepare(implementation: str, cfg, examples) -> tuple[torch.nn.Module, Callable[[], float], Callable[[], float], int]:
    """(model, warm-up round, timed round, tokens the timed round reads) of one implementation."""
    from participant.runtime import local_seed

    seed = local_seed(cfg, 2, 0)  # the timed round's batches: round 2 of participant 0
    if implementation == "fedlora":
        run, loaded = fedlora_round(cfg, examples)
        model, tokenizer = loaded.model, loaded.tokenizer
        warm, timed = (lambda: run(WARMUP_STEPS, 1)), (lambda: run(cfg.train.local_steps, 2))
    else:
        run, model, tokenizer = bare_loop(cfg, kbit=implementation == "peft-kbit")
        warmup = timed_batches(cfg, tokenizer, examples, local_seed(cfg, 1, 0), WARMUP_STEPS)
        ready = timed_batches(cfg, tokenizer, examples, seed, cfg.train.local_steps)
        warm, timed = (lambda: run(warmup)), (lambda: run(ready))
    tokens = sum(int(b["attention_mask"].sum()) for b in timed_batches(cfg, tokenizer, examples, seed, cfg.train.local_steps))
    return model, warm, timed, tokens


def load_inputs(model_dir: str, args: argparse.Namespace):
    from fedlora.config import DataSection
    from fedlora.data import load_examples

    cfg = benchmark_config(model_dir, args)
    return cfg, load_examples(DataSection(dataset=args.dataset, max_examples=2048, max_length=args.max_length))


def measure_throughput(model_dir: str, args: argparse.Namespace) -> list[dict]:
    """All implementations in one process, timed round by round in rotating order.

    Side by side in time, so load from other jobs hits all of them alike; each repeat's ratio
    to the bare loop pairs rounds run seconds apart.
    """
    cfg, examples = load_inputs(model_dir, args)
    prepared = {name: prepare(name, cfg, examples) for name in IMPLEMENTATIONS}
    device = next(prepared["fedlora"][0].parameters()).device
    for _, warm, _, _ in prepared.values():
        warm()
    runs = []
    for repeat in range(args.repeats):
        order = IMPLEMENTATIONS[repeat % 3 :] + IMPLEMENTATIONS[: repeat % 3]
        for name in order:
            _, _, timed, tokens = prepared[name]
            sync(device)
            started = time.perf_counter()
            loss = timed()
            sync(device)
            seconds = time.perf_counter() - started
            runs.append({"implementation": name, "repeat": repeat, "device": device.type, "seconds": seconds,
                         "tokens": tokens, "tokens_per_s": tokens / seconds, "mean_loss": loss})
    return runs


def measure_memory(implementation: str, model_dir: str, args: argparse.Namespace) -> dict:
    """One implementation alone in this process: its peaks over one timed round."""
    cfg, examples = load_inputs(model_dir, args)
    model, warm, timed, _ = prepare(implementation, cfg, examples)
    device = next(model.parameters()).device
    warm()
    sync(device)
    reset_rss_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed()
    sync(device)
    return {
        "implementation": implementation,
        "train_peak_rss_bytes": rss_peak(),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "weight_bytes": model.get_memory_footprint(),
        "frozen_float32_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32),
        "base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }


def spawn(task: list[str], args: argparse.Namespace) -> dict | list:
    """One measurement in a fresh interpreter, so no peak carries over."""
    command = [sys.executable, __file__, "--worker", *task, *args.passthrough]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(task)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], memory: list[dict]) -> list[dict]:
    """Per model and implementation: median tokens/s, paired ratios to the bare loop, memory."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        bare = {r["repeat"]: r for r in runs if r["model"] == model and r["implementation"] == "bare"}
        for implementation in IMPLEMENTATIONS:
            group = [r for r in runs if r["model"] == model and r["implementation"] == implementation]
            paired = [r["tokens_per_s"] / bare[r["repeat"]]["tokens_per_s"] for r in group]
            peaks = next(m for m in memory if m["model"] == model and m["implementation"] == implementation)
            rows.append({
                "model": model,
                "implementation": implementation,
                "repeats": len(group),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
                "throughput_vs_bare": statistics.median(paired),
                "throughput_vs_bare_range": [min(paired), max(paired)],
                "overhead_pct": 100 * (1 / statistics.median(paired) - 1),
                "mean_loss": statistics.median(r["mean_loss"] for r in group),
                **{key: peaks[key] for key in ("train_peak_rss_bytes", "cuda_peak_allocated_bytes", "frozen_float32_bytes", "base_params", "weight_bytes")},
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | base params | loop | tokens/s | / bare (range) | overhead | mean loss | frozen fp32 MiB | peak RSS MiB | CUDA peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["throughput_vs_bare_range"]
        cuda = "-" if r["cuda_peak_allocated_bytes"] is None else f"{r['cuda_peak_allocated_bytes'] / 2**20:,.0f}"
        lines.append(
            f"| {r['model']} | {r['base_params'] / 1e6:,.1f} M | {r['implementation']} | {r['tokens_per_s']:,.0f} "
            f"| {r['throughput_vs_bare']:.3f} ({low:.3f}-{high:.3f}) | {r['overhead_pct']:+.1f}% | {r['mean_loss']:.4f} "
            f"| {r['frozen_float32_bytes'] / 2**20:,.1f} | {r['train_peak_rss_bytes'] / 2**20:,.0f} | {cuda} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(2.5 + 2 * len(models), 4))
    width = 0.8 / len(IMPLEMENTATIONS)
    for k, implementation in enumerate(IMPLEMENTATIONS):
        values = [next(r["throughput_vs_bare"] for r in rows if r["model"] == m and r["implementation"] == implementation) for m in models]
        ax.bar([i + (k - 1) * width for i in range(len(models))], values, width, label=implementation)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=1, label="target (5% overhead)")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("tokens/s relative to the bare loop")
    ax.set_ylim(0, 1.2)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llama,llama-60m", help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    parser.add_argument("--dataset", default="hypertension", help="records to train on (its text fields make longer prompts)")
    parser.add_argument("--steps", type=int, default=20, help="timed local steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation; medians are reported")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/training-<device>.json")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task, *rest = args.worker
        print(json.dumps(measure_throughput(*rest, args) if task == "throughput" else measure_memory(task, *rest, args)))
        return
    args.passthrough = [
        "--device", args.device, "--quantization", args.quantization, "--dataset", args.dataset, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--repeats", str(args.repeats),
    ] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    on_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    out = args.out or RESULTS / f"training-{'cuda' if on_cuda else 'cpu'}.json"
    runs, memory = [], []
    with tempfile.TemporaryDirectory(prefix="fedlora-training-") as tmp:
        for model in args.models.split(","):
            shape = MODELS[model]
            model_dir = "builtin:tiny-llama" if shape is None else str(write_llama(Path(tmp) / model, *shape))
            for run in spawn(["throughput", model_dir], args):
                runs.append(run | {"model": model})
                print(f"{model} #{run['repeat']} {run['implementation']}: {run['tokens_per_s']:,.0f} tokens/s, loss {run['mean_loss']:.4f}", flush=True)
            for implementation in IMPLEMENTATIONS:
                memory.append(spawn([implementation, model_dir], args) | {"model": model})
    rows = summarise(runs, memory)
    settings = {key: getattr(args, key) for key in ("device", "quantization", "dataset", "steps", "batch_size", "max_length", "gradient_checkpointing")}
    report = {"machine": machine() | {"cuda": torch.version.cuda}, "settings": settings, "summary": rows, "runs": runs, "memory": memory}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
