"""Shared fixtures: small, fast settings that still use the real components."""

from __future__ import annotations

import os

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
