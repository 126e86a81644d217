"""Shared fixtures: small, fast settings that still use the real components."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedlora.config import Config, load_config

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The tests' task: the diabetes table as a yes/no generation task with the learning rate of the
# earlier defaults (the default federation is the `stress` classification task).
SMALL = [
    "data.dataset=diabetes",
    "model.task=generation",
    "train.lr=3e-3",
    "federation.rounds=2",
    "federation.participants=3",
    "federation.min_participants=1",
    "train.local_steps=4",
    "train.batch_size=4",
    "data.max_examples=240",
    "data.partition=iid",
]


@pytest.fixture
def small_config() -> Config:
    return load_config(None, SMALL)


def registered_coordinator(root: Path, sites: dict[int, str]) -> Path:
    """`coordinator init ROOT/coordinator` with each site's real node key registered in the book under its
    LocalGrid node id (what `coordinator register` records, without a SuperLink)."""
    from coordinator.participants import BOOK, ParticipantBook
    from fedlora.cli import main
    from fedlora.pki import create_node_key, public_key_fingerprint

    directory = root / "coordinator"
    assert main(["coordinator", "init", str(directory)]) == 0
    book = ParticipantBook(directory / BOOK)
    for node, name in sites.items():
        _, pub = create_node_key(root / name)
        book.add(name, node, public_key_fingerprint(pub))
    return directory


TINY_BASE = "builtin:tiny-llama"


def chat_base(directory: Path, template: str) -> str:
    """The tiny Llama as a local Hugging Face directory whose tokenizer carries chat template `template`."""
    from fedlora.model import base_model_dir

    shutil.copytree(base_model_dir(TINY_BASE), directory)
    config_path = directory / "tokenizer_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"chat_template": template}, indent=2))
    return str(directory)


def signed_version(root: Path, overrides: list[str], scale: float, base: str = TINY_BASE, facts: dict | None = None) -> Path:
    """A signed adapter version ROOT/adapters/final of the tiny Llama (or `base`) with random LoRA weights (normal,
    `scale`), its manifest stating the base and fingerprint (and `facts`), as the coordinator signs a round's version."""
    import numpy as np

    from fedlora.adapter import adapter_vector, save_peft_dir
    from fedlora.model import load_model, model_fingerprint
    from fedlora.registry import load_or_create_key, sign_adapter

    cfg = load_config(None, [*SMALL, "model.quantization=none", f"model.name={base}", *overrides])
    model = load_model(cfg.model, cfg.lora, [], seed=0).model
    _, layout = adapter_vector(model)
    vector = np.random.default_rng(0).normal(0.0, scale, layout.size).astype(np.float32)
    directory = save_peft_dir(root / "adapters" / "final", vector, layout, model.peft_config["default"])
    stated = {"round": 1, "parent": "round-0000", "base_model": base, "base_model_sha256": model_fingerprint(base)}
    sign_adapter(directory, load_or_create_key(root / "coordinator.key"), stated | (facts or {}))
    return directory


def trusted(version: Path) -> bytes:
    """The public key a signed_version verifies against."""
    return (version.parents[1] / "coordinator.pub").read_bytes()


def lying_evaluator(lies: dict[int, dict], reported: dict[int, dict]):
    """The participant app whose evaluation replies claim `lies[partition id]` over its honest metrics, which it
    keeps in `reported` (a site lying about its scores, counts or losses)."""
    from flwr.clientapp import ClientApp

    from fedlora.wire import read_reply, reply_content
    from participant import app as participant_app

    lying_app = ClientApp()
    lying_app.train()(participant_app.train)

    @lying_app.evaluate()
    def evaluate_lying(msg, context):
        reply = participant_app.evaluate_global(msg, context)
        _, metrics = read_reply(reply.content)
        reported[metrics["partition_id"]] = dict(metrics)
        return type(reply)(reply_content(metrics | lies.get(metrics["partition_id"], {})), reply_to=msg)

    return lying_app
