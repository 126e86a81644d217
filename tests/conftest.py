"""Shared fixtures: small, fast settings that still use the real components."""

from __future__ import annotations

import os

import pytest

from fedlora.config import Config, load_config

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = [
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
