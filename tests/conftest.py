"""Shared fixtures: small, fast settings that still use the real components."""

from __future__ import annotations

import os
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
