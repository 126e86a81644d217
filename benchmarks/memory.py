"""Peak memory of a participant training LoRA on an NF4 base against an unquantised one.

Each (model, quantisation) pair runs in its own process: load the base through
`fedlora.model.load_model`, take a few `fedlora.train.train_local` steps on the built-in
diabetes task, report the weights' footprint and the peaks. NF4 saves memory only where
weights dominate activations, so besides the built-in tiny Llama the benchmark builds a
~370M-parameter Llama from a config (random init, written once to a temporary directory
in bf16, as published checkpoints are) and loads it like any local model directory.

Peak RSS is the kernel's high-water mark (VmHWM), read once after loading and once after
training, with the mark reset in between through /proc/self/clear_refs; ru_maxrss is not
used because Linux carries the parent's peak into an exec'd child. Both peaks are also given
above the RSS measured after the imports. On CUDA, torch.cuda.max_memory_allocated over the
training phase is reported as well. Every configuration runs `--repeats` times (how much the
allocator retains after loading varies from run to run): tables give medians, and each
ratio's range over the repeats.

    python benchmarks/memory.py [--device auto|cpu|cuda] [--steps 3] [--repeats 3] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).parent / "results"
QUANTIZATIONS = ("none", "nf4")
FIGURES = [
    "base_params", "weight_bytes", "rss_baseline_bytes", "load_peak_rss_bytes", "rss_after_load_bytes",
    "train_peak_rss_bytes", "peak_rss_bytes", "cuda_peak_allocated_bytes", "seconds_per_step",
]
RATIO_KEYS = ["weight_bytes", "peak_rss_bytes", "train_peak_rss_bytes", "cuda_peak_allocated_bytes"]


def write_llama(directory: Path, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int) -> Path:
    """Write a seeded Llama of this shape (vocab 32,000, bf16, as published checkpoints are) and the
    built-in tokenizer to `directory`, to load like any local model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.tokenizer import builtin_tokenizer

    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    builtin_tokenizer().save_pretrained(directory)
    return directory


def medium_llama(directory: Path) -> Path:
    """The ~370M-parameter Llama of this benchmark."""
    return write_llama(directory, hidden=1024, layers=24, intermediate=2816, heads=16, kv_heads=16)


def rss_peak() -> int:
    """VmHWM in bytes: the peak RSS since the process started or the last `reset_rss_peak`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def run_worker(model: str, quantization: str, device: str, steps: int, max_length: int) -> dict:
    """Load, train `steps` local steps with batch 2, and return this process's memory figures."""
    from fedlora.config import DataSection, LoraSection, ModelSection, TrainSection
    from fedlora.data import load_examples
    from fedlora.model import load_model
    from fedlora.train import train_local

    process = psutil.Process()
    examples = load_examples(DataSection(dataset="diabetes", max_examples=64))
    baseline = process.memory_info().rss
    loaded = load_model(ModelSection(name=model, quantization=quantization, device=device), LoraSection(), [], seed=0)
    on_cuda = next(loaded.model.parameters()).device.type == "cuda"
    after_load, load_peak = process.memory_info().rss, rss_peak()
    reset_rss_peak()
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_local(
        loaded.model, loaded.tokenizer, examples, TrainSection(local_steps=steps, batch_size=2),
        "generation", [], max_length, seed=0, prompt_format=loaded.prompt_format,
    )
    seconds, train_peak = time.perf_counter() - start, rss_peak()
    adapter_params, all_params = loaded.model.get_nb_trainable_parameters()
    return {
        "model": model,
        "quantization": quantization,
        "device": "cuda" if on_cuda else "cpu",
        "base_params": all_params - adapter_params,
        "weight_bytes": loaded.model.get_memory_footprint(),
        "rss_baseline_bytes": baseline,
        "load_peak_rss_bytes": load_peak,
        "rss_after_load_bytes": after_load,
        "train_peak_rss_bytes": train_peak,
        "peak_rss_bytes": max(load_peak, train_peak),
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if on_cuda else None,
        "seconds_per_step": seconds / steps,
        "mean_loss": result.mean_loss,
    }


def spawn(model: str, quantization: str, args: argparse.Namespace) -> dict:
    """One configuration in a fresh interpreter, so no peak carries over from another."""
    command = [
        sys.executable, __file__, "--worker", model, quantization, "--device", args.device,
        "--steps", str(args.steps), "--max-length", str(args.max_length),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{model} / {quantization} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> list[dict]:
    """One row per (model, quantisation): the median of each figure over the repeats."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["quantization"]), []).append(run)
    return [
        {"model": model, "quantization": quantization, "repeats": len(group)}
        | {key: None if group[0][key] is None else statistics.median(r[key] for r in group) for key in FIGURES}
        for (model, quantization), group in groups.items()
    ]


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """none / NF4 per model on weights and peaks; peaks also above the RSS after imports."""
    out = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        none, nf4 = (next(r for r in rows if r["model"] == model and r["quantization"] == q) for q in QUANTIZATIONS)
        out[model] = {key: none[key] / nf4[key] for key in RATIO_KEYS if none[key] is not None}
        for key in ("peak_rss_bytes", "train_peak_rss_bytes"):
            baseline_none, baseline_nf4 = none["rss_baseline_bytes"], nf4["rss_baseline_bytes"]
            out[model][f"{key}_above_imports"] = (none[key] - baseline_none) / (nf4[key] - baseline_nf4)
    return out


def ratio_ranges(runs: list[dict]) -> dict[str, dict[str, list[float]]]:
    """[min, max] of each ratio over the repeats, pairing the none and NF4 runs of a repeat."""
    per_repeat = [ratios([r for r in runs if r["repeat"] == i]) for i in sorted({r["repeat"] for r in runs})]
    return {
        model: {key: [min(rep[model][key] for rep in per_repeat), max(rep[model][key] for rep in per_repeat)] for key in keys}
        for model, keys in per_repeat[0].items()
    }


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": name, "cores": psutil.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def markdown(rows: list[dict], summary: dict[str, dict[str, float]], ranges: dict[str, dict[str, list[float]]]) -> str:
    lines = [
        "| model | params | quantisation | weights MiB | RSS after imports MiB | peak RSS loading MiB "
        "| peak RSS training MiB | CUDA peak training MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base_params'] / 1e6:,.1f} M | {r['quantization']} | {mib(r['weight_bytes'])} "
            f"| {mib(r['rss_baseline_bytes'])} | {mib(r['load_peak_rss_bytes'])} | {mib(r['train_peak_rss_bytes'])} "
            f"| {mib(r['cuda_peak_allocated_bytes'])} |"
        )
    columns = [
        ("weight_bytes", "weights"), ("peak_rss_bytes", "peak RSS (process)"),
        ("peak_rss_bytes_above_imports", "above imports"), ("train_peak_rss_bytes", "peak RSS (training)"),
        ("train_peak_rss_bytes_above_imports", "above imports"), ("cuda_peak_allocated_bytes", "CUDA peak (training)"),
    ]
    lines += ["", "| none / NF4 | " + " | ".join(label for _, label in columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, values in summary.items():
        cells = [
            f"{values[key]:.2f}x ({ranges[model][key][0]:.2f}-{ranges[model][key][1]:.2f})" if key in values else "-"
            for key, _ in columns
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("weight_bytes", "weights"), ("load_peak_rss_bytes", "peak RSS\nloading"), ("train_peak_rss_bytes", "peak RSS\ntraining")]
    if rows[0]["cuda_peak_allocated_bytes"] is not None:
        metrics.append(("cuda_peak_allocated_bytes", "CUDA peak\ntraining"))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    for ax, model in zip(axes, models):
        for offset, quantization in zip((-0.2, 0.2), QUANTIZATIONS):
            run = next(r for r in rows if r["model"] == model and r["quantization"] == quantization)
            ax.bar([i + offset for i in range(len(metrics))], [run[key] / 2**20 for key, _ in metrics], 0.4, label=quantization)
        ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
        ax.set_title(model)
        ax.set_ylabel("MiB")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=3, help="local training steps per configuration (batch 2)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration; medians are reported")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(*args.worker, args.device, args.steps, args.max_length)))
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-medium-llama-") as tmp:
        models = {"builtin:tiny-llama": "builtin:tiny-llama", str(medium_llama(Path(tmp))): "llama-370m (random init)"}
        runs = [
            {**spawn(path, q, args), "model": label, "repeat": i}
            for path, label in models.items()
            for i in range(args.repeats)
            for q in QUANTIZATIONS
        ]
    rows = medians(runs)
    summary, ranges = ratios(rows), ratio_ranges(runs)
    report = {
        "machine": machine(), "steps": args.steps, "batch_size": 2, "max_length": args.max_length,
        "medians": rows, "ratios": summary, "ratio_ranges": ranges, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows, summary, ranges))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")

if __name__ == "__main__":
    main()
