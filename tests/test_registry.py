"""Signed adapter versions: a run's adapters verify; a modified file, an edited fact and another
key's signature are each detected; the signed directory still loads in stock PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.registry import sign_adapter, verify_adapter
from participant.app import app
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed")
    cfg = load_config(None, [*SMALL, "federation.rounds=1", "federation.participants=3"])
    Coordinator(cfg, out).run(LocalGrid(app, {p + 1: {"partition-id": p, "num-partitions": 3} for p in range(3)}))
    return out


def test_every_adapter_version_of_a_run_is_signed_and_verifies(run_dir: Path) -> None:
    trusted = (run_dir / "coordinator.pub").read_bytes()
    for name in ("round-0000", "round-0001", "final"):
        assert verify_adapter(run_dir / "adapters" / name, trusted) == []
    facts = json.loads((run_dir / "adapters" / "final" / "manifest.json").read_text())["facts"]
    assert facts["round"] == 1 and facts["parent"] == "round-0000" and facts["participants"] == ["participant-0", "participant-1", "participant-2"]
    assert main(["adapter", "verify", str(run_dir / "adapters" / "final")]) == 0


@pytest.mark.parametrize("tamper", ["weights", "fact", "other-key", "extra-file", "unsigned"])
def test_tampering_with_a_signed_adapter_is_detected(run_dir: Path, tmp_path: Path, tamper: str) -> None:
    copy = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapters" / "final", copy)
    manifest = copy / "manifest.json"
    if tamper == "weights":
        data = bytearray((copy / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 1
        (copy / "adapter_model.safetensors").write_bytes(bytes(data))
    elif tamper == "fact":
        edited = json.loads(manifest.read_text())
        edited["facts"]["epsilon"] = 0.1
        manifest.write_text(json.dumps(edited))
    elif tamper == "other-key":  # re-signed by someone else: consistent, but not the coordinator's
        sign_adapter(copy, Ed25519PrivateKey.generate(), json.loads(manifest.read_text())["facts"])
    elif tamper == "extra-file":
        (copy / "notes.txt").write_text("added later")
    else:
        manifest.unlink()
    assert verify_adapter(copy, (run_dir / "coordinator.pub").read_bytes())
    assert main(["adapter", "verify", str(copy), "--public-key", str(run_dir / "coordinator.pub")]) == 1


def test_a_signed_adapter_still_loads_in_stock_peft(run_dir: Path) -> None:
    from peft import PeftModel

    from fedlora.model import load_base_model

    stock = PeftModel.from_pretrained(load_base_model(load_config(None, SMALL).model), str(run_dir / "adapters" / "final"))
    assert any("lora_B" in name for name, _ in stock.named_parameters())
