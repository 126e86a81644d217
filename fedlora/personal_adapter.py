"""A site's personalised adapter, answered with or exported on the strength of the signed version it personalises.

`federation.personalization` leaves each site a personalised adapter (`personal/<run>/round-NNNN`
in its directory): its own, unsigned, never sent anywhere. It is used only beside the signed
global version of the same run: that version is verified as usual and gives the prompt format,
the class names and the base fingerprint, and the personalised adapter must have its exact
shape (the adapter_config fields that decide how PEFT attaches it, and every tensor's name and
shape), so it answers in the format and on the base the consortium's adapter was trained for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# How PEFT attaches an adapter; not base_model_name_or_path: a site names its own copy of the base, whose
# fingerprint is what is checked (the version's base_model_sha256).
SHAPE_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "target_modules", "modules_to_save")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as weights:
        return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}


def _shape_fields(directory: Path) -> dict[str, object]:
    config = json.loads((directory / CONFIG).read_text())
    fields = {key: config.get(key) for key in SHAPE_KEYS}
    for key in ("target_modules", "modules_to_save"):  # PEFT writes either a list or a set's list, in any order
        if isinstance(fields[key], list):
            fields[key] = sorted(fields[key])
    return fields


def check_personal(version: Path, personal: Path) -> None:
    """Refuse a personalised adapter that is not shaped as `version` (a verified version directory) is."""
    for path in (personal / CONFIG, personal / WEIGHTS):
        if not path.is_file():
            raise FileNotFoundError(f"--personal: {path} does not exist; is {personal} a personalised adapter (personal/<run>/round-NNNN)?")
    mine, theirs = _shape_fields(personal), _shape_fields(version)
    differ = [f"{key} {mine[key]!r} (the version's: {theirs[key]!r})" for key in SHAPE_KEYS if mine[key] != theirs[key]]
    if differ:
        raise ValueError(f"--personal: {personal} does not personalise {version}: {'; '.join(differ)}")
    mine_shapes, their_shapes = _tensor_shapes(personal / WEIGHTS), _tensor_shapes(version / WEIGHTS)
    if mine_shapes != their_shapes:
        odd = sorted(set(mine_shapes.items()) ^ set(their_shapes.items()))[:3]
        raise ValueError(f"--personal: {personal}'s tensors are not the version's (first differences: {odd})")


def copy_personal(personal: Path, target: Path) -> Path:
    """A plain PEFT directory holding the personalised adapter (its weights and config only)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy2(personal / name, target / name)
    return target


def personal_record(personal: Path) -> dict[str, str]:
    """What EXPORT.json says of a personalised export: where the weights came from and their hash."""
    return {"adapter": str(personal.resolve()), "adapter_sha256": hashlib.sha256((personal / WEIGHTS).read_bytes()).hexdigest()}
