"""Sites that hold the base in different formats (NF4 on CPU, bf16 on GPU) train one adapter.

bf16 on CPU stands in for a GPU site here: the format, not the device, is what changes the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator, initial_adapter
from fedlora.config import ConfigError, load_config
from fedlora.model import model_fingerprint
from fedlora.precision import parse_site_precision
from participant.app import app
from participant.local_config import (
    LOCAL_CONFIG,
    LocalDataSection,
    LocalModelSection,
    effective_config,
)
from participant.runtime import get_runtime, train_round
from participant.site import EVENTS
from participant.status import run_summaries
from tests.conftest import SMALL
from tests.test_participant_policy import run_config, site

MIXED = [*SMALL, "federation.participants=4", "simulation.site_precision=['0=bf16', '1=bf16']"]


def node(partition: int, participants: int = 4) -> dict:
    return {"partition-id": partition, "num-partitions": participants}


def quantised_linears(model: torch.nn.Module) -> int:
    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        (["0=fp8"], "unknown format 'fp8'; formats are nf4, bf16, float32"),
        (["bf16"], "is not '<partition id>=<format>'"),
        (["1=bf16", "1=nf4"], "names partition 1 twice"),
    ],
)
def test_site_precision_entries_are_checked_naming_the_entry(entries: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_site_precision(entries)
    with pytest.raises(ConfigError, match="simulation.site_precision"):
        load_config(None, [*SMALL, f"simulation.site_precision={entries!r}"])


def test_site_precision_names_only_the_runs_partitions() -> None:
    with pytest.raises(ConfigError, match=r"simulation.site_precision: partitions \[3\] are not among the 3 participants"):
        load_config(None, [*SMALL, "simulation.site_precision=['3=bf16']"])
    assert parse_site_precision(["0=bf16", " 2 = float32 "]) == {0: "bf16", 2: "float32"}


def test_a_deployed_site_holds_the_base_in_its_own_format() -> None:
    local = site()
    local.model = LocalModelSection(path="builtin:tiny-llama", sha256=local.model.sha256, quantization="none", compute_dtype="bfloat16")
    effective = effective_config(run_config("model.quantization=nf4", "model.device=cpu"), local)
    assert (effective.model.quantization, effective.model.compute_dtype, effective.model.device) == ("none", "bfloat16", "cpu")
    assert effective_config(run_config("model.quantization=nf4"), site()).model.quantization == "nf4"  # empty: the run's
    with pytest.raises(ConfigError, match=r"model.quantization: 'fp4' is not one of nf4, int8, none \(or empty: the run's\)"):
        LocalModelSection(quantization="fp4")


def test_nf4_and_bf16_sites_train_the_same_adapter_to_close_but_different_updates() -> None:
    cfg = load_config(None, MIXED)
    bf16, nf4 = get_runtime(cfg, node(0), own_rank=True), get_runtime(cfg, node(2), own_rank=True)
    assert quantised_linears(nf4.loaded.model) > 0 and quantised_linears(bf16.loaded.model) == 0
    base_dtypes = {p.dtype for n, p in bf16.loaded.model.named_parameters() if "lora_" not in n}
    assert base_dtypes == {torch.bfloat16}
    lora_dtypes = {p.dtype for m in (bf16, nf4) for n, p in m.loaded.model.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
    assert bf16.layout == nf4.layout  # the adapter is one object: same names, shapes, order
    # The same site (partition 0) with the same records and starting adapter, in each format.
    start = initial_adapter(cfg).vector
    as_nf4 = load_config(None, SMALL + ["federation.participants=4"])
    from_bf16, _ = train_round(bf16, cfg, start, 1)
    from_nf4, _ = train_round(get_runtime(as_nf4, node(0), own_rank=True), as_nf4, start, 1)
    cosine = float(np.dot(from_bf16, from_nf4) / (np.linalg.norm(from_bf16) * np.linalg.norm(from_nf4)))
    assert from_bf16.shape == from_nf4.shape and 0.9 < cosine < 0.9999


def test_a_mixed_federation_applies_every_round_to_one_adapter(tmp_path: Path) -> None:
    cfg = load_config(None, MIXED)
    grid = LocalGrid(app, {p + 1: node(p) for p in range(4)})
    rows = Coordinator(cfg, tmp_path).run(grid)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:  # every update had the layout the coordinator expects, so none was skipped
        assert row["applied"] and row["participants"] == 4 and not row.get("skipped")
    before = (tmp_path / "adapters" / "round-0000" / "adapter_model.safetensors").read_bytes()
    assert before != (tmp_path / "adapters" / "final" / "adapter_model.safetensors").read_bytes()
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_a_deployed_sites_events_record_the_format_it_trained_in(tmp_path: Path) -> None:
    sha = model_fingerprint("builtin:tiny-llama")
    local = site(model_sha256=sha)
    local.model = LocalModelSection(path="builtin:tiny-llama", sha256=sha, quantization="none", compute_dtype="bfloat16", device="cpu")
    local.data = LocalDataSection(path="diabetes", label_names=["no", "yes"], max_examples=60)
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    cfg = load_config(None, [*SMALL, "federation.rounds=1", "federation.participants=1", f"model.sha256={sha}", "data.label_names=no,yes"])
    rows = Coordinator(cfg, tmp_path / "run").run(LocalGrid(app, {1: {"participant-dir": str(directory)}}))
    assert rows[1]["applied"]
    logged = [json.loads(line) for line in (directory / EVENTS).read_text().splitlines()]
    assert {e["event"]: e["base_weights"] for e in logged if "base_weights" in e} == {"trained": "none bfloat16 cpu", "evaluated": "none bfloat16 cpu"}
    assert [run["base_weights"] for run in run_summaries(logged)] == [["none bfloat16 cpu"]]
    assert cfg.model.quantization == "nf4"  # the run (and its coordinator) said NF4; the site chose otherwise
