"""What a participant keeps between rounds: the loaded base model and its data shard.

Flower may call the ClientApp many times in one worker process, and in a simulation one
worker serves several virtual participants. The base model is loaded once per process
and reused (simulation users report memory growth when actors reload models each round);
only the adapter weights are overwritten for each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlora.adapter import AdapterLayout, adapter_vector
from fedlora.config import Config
from fedlora.data import answer_choices, load_examples
from fedlora.model import LoadedModel, load_model
from fedlora.partition import Shard, shard_for, split_holdout


@dataclass
class ParticipantRuntime:
    loaded: LoadedModel
    layout: AdapterLayout
    shard: Shard
    partition_id: int


_MODEL: dict[tuple, tuple[LoadedModel, AdapterLayout]] = {}
_SHARDS: dict[tuple, tuple[Shard, int]] = {}


def label_names_for(cfg: Config) -> list[str]:
    """Class names (or answer choices) from the whole dataset, so every party agrees on order."""
    return answer_choices(load_examples(cfg.data, cfg.federation.seed))


def local_shard(cfg: Config, node_config: dict[str, Any]) -> tuple[Shard, int]:
    """A simulated participant's partition of the shared dataset, or a site's own whole dataset."""
    examples = load_examples(cfg.data, cfg.federation.seed)
    if "partition-id" in node_config:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config.get("num-partitions", cfg.federation.participants))
        shard = shard_for(examples, cfg.data.partition, num_partitions, partition_id, cfg.data.test_fraction, cfg.federation.seed)
        return shard, partition_id
    return split_holdout(examples, cfg.data.test_fraction, cfg.federation.seed), int(node_config.get("participant-id", -1))


def get_runtime(cfg: Config, node_config: dict[str, Any]) -> ParticipantRuntime:
    model_key = (repr(cfg.model), repr(cfg.lora), repr(cfg.data), cfg.federation.seed)
    if model_key not in _MODEL:
        _MODEL.clear()  # one base model per process: a new config replaces the old one
        loaded = load_model(cfg.model, cfg.lora, label_names_for(cfg), cfg.federation.seed)
        _MODEL[model_key] = (loaded, adapter_vector(loaded.model)[1])
    shard_key = (repr(cfg.data), cfg.federation.seed, cfg.federation.participants, tuple(sorted(node_config.items())))
    if shard_key not in _SHARDS:
        _SHARDS[shard_key] = local_shard(cfg, node_config)
    loaded, layout = _MODEL[model_key]
    shard, partition_id = _SHARDS[shard_key]
    return ParticipantRuntime(loaded, layout, shard, partition_id)
