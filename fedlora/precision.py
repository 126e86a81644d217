"""How a site holds the frozen base in memory: its weight format, a hardware choice of its own.

NF4 on a small CPU machine, bfloat16 on a GPU: the base is the same model rounded differently,
and the LoRA weights it carries are float32 with the same names and shapes in every format
(fedlora/adapter.py lays them out from the PEFT modules, not from the base's dtype). So sites in
different formats train one adapter; their updates differ only by the base's rounding. A deployed
site picks its format in its own participant.toml (`[model]` quantization, compute_dtype); a
simulation names formats per partition with `simulation.site_precision`.
"""

from __future__ import annotations

import dataclasses

from fedlora.config import ModelSection

# format -> (model.quantization, model.compute_dtype); None keeps the run's compute dtype.
WEIGHT_FORMATS: dict[str, tuple[str, str | None]] = {
    "nf4": ("nf4", None),
    "bf16": ("none", "bfloat16"),
    "float32": ("none", "float32"),
}


def partition_map(entries: list[str], key: str, noun: str, allowed: tuple[str, ...] | None = None) -> dict[int, str]:
    """'<partition id>=<noun>' entries of simulation.`key` as partition id -> value (one of `allowed`, if given)."""
    out: dict[int, str] = {}
    for entry in entries:
        where, equals, name = (part.strip() for part in entry.partition("="))
        problem = (
            f"is not '<partition id>=<{noun}>'" if not (equals and where.isdigit() and name)
            else f"names partition {where} twice" if int(where) in out
            else f"has an unknown {noun} {name!r}" if allowed is not None and name not in allowed
            else None
        )
        if problem:
            raise ValueError(f"simulation.{key}: {entry!r} {problem}" + (f"; {noun}s are {', '.join(allowed)}" if allowed else ""))
        out[int(where)] = name
    return out


def parse_site_precision(entries: list[str]) -> dict[int, str]:
    """`simulation.site_precision` ('<partition id>=<format>' entries) as partition id -> format."""
    return partition_map(entries, "site_precision", "format", WEIGHT_FORMATS)


def parse_site_models(entries: list[str]) -> dict[int, str]:
    """`simulation.site_models` ('<partition id>=<model name>' entries) as partition id -> model.name."""
    return partition_map(entries, "site_models", "model")


def in_format(model: ModelSection, name: str | None) -> ModelSection:
    """The run's model section with the base held in weight format `name` (None: as the run says)."""
    if name is None:
        return model
    quantization, compute_dtype = WEIGHT_FORMATS[name]
    return dataclasses.replace(model, quantization=quantization, compute_dtype=compute_dtype or model.compute_dtype)
