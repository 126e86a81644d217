"""Commands that need no model start without the model stack (torch, transformers, peft and friends).

`coordinator init/register/revoke/status`, `audit verify`, `adapter verify/export`, `config` and
`datasets` each run in a fresh interpreter, with real arguments against a coordinator directory
holding a real run made here; what the command imported is read from `sys.modules` once it returns.
No SuperLink runs: `register` then fails at the `flwr` call (after its own imports), and `revoke`
records the revocation and reports that the SuperLink did not unregister the key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.local_grid import LocalGrid
from coordinator.participants import BOOK, ParticipantBook
from coordinator.rounds import Coordinator
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.pki import create_node_key
from participant.app import app
from tests.conftest import SMALL

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "opacus", "flwr", "ray", "pandas", "matplotlib")
PROBE = "import json, sys; from fedlora.cli import main; code = main(sys.argv[1:]); print(json.dumps([code, sorted(set(sys.modules) & set({heavy}))]))"


def run_light(*argv: str) -> tuple[int, list[str], str]:
    """`fedlora ARGV` in a fresh interpreter: its exit code, the heavy modules it imported, its stderr."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, check=False, timeout=120
    )
    code, imported = json.loads(probe.stdout.splitlines()[-1])
    return code, imported, probe.stderr


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A coordinator directory (`coordinator init`) with two registered sites and one finished run."""
    directory = tmp_path_factory.mktemp("light") / "coordinator"
    assert main(["coordinator", "init", str(directory)]) == 0
    book = ParticipantBook(directory / BOOK)
    for name, node_id in (("hospital-a", 11), ("hospital-b", 12)):
        book.add(name, node_id, f"fp-{name}")
    cfg = load_config(None, [*SMALL, "federation.rounds=1", "federation.participants=2", "train.local_steps=1", "data.max_examples=60"])
    grid = LocalGrid(app, {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}})
    Coordinator(cfg, directory / "runs" / "main", deployment=directory).run(grid)
    return directory


def test_coordinator_init_and_status_import_no_model_stack(coordinator: Path, tmp_path: Path) -> None:
    assert run_light("coordinator", "init", str(tmp_path / "another")) == (0, [], "")
    code, imported, _ = run_light("coordinator", "status", str(coordinator))
    assert (code, imported) == (0, [])


def test_coordinator_register_and_revoke_import_no_model_stack(coordinator: Path, tmp_path: Path) -> None:
    create_node_key(tmp_path, "node")
    code, imported, stderr = run_light("coordinator", "register", str(coordinator), str(tmp_path / "node.pub"), "--name", "hospital-c")
    assert (code, imported) == (2, []) and "flwr supernode register" in stderr  # no SuperLink to register with
    copy = tmp_path / "coordinator"
    shutil.copytree(coordinator, copy)
    code, imported, _ = run_light("coordinator", "revoke", str(copy), "hospital-b")
    assert (code, imported) == (0, [])
    assert ParticipantBook(copy / BOOK).revoked().keys() == {"hospital-b"}


def test_audit_and_adapter_commands_import_no_model_stack(coordinator: Path, tmp_path: Path) -> None:
    run = coordinator / "runs" / "main"
    assert run_light("audit", "verify", str(run / "audit.jsonl"))[:2] == (0, [])
    assert run_light("adapter", "verify", str(run / "adapters" / "final"))[:2] == (0, [])
    assert run_light("adapter", "export", "final", str(tmp_path / "exported"), "--run", str(run))[:2] == (0, [])
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("argv", [["config"], ["config", "federation.rounds=3", "secagg.enabled=true"], ["datasets"]])
def test_config_and_datasets_import_no_model_stack(argv: list[str]) -> None:
    assert run_light(*argv)[:2] == (0, [])


def test_participant_status_reads_the_ledger_without_the_model_stack(tmp_path: Path) -> None:
    from fedlora.privacy.ledger import Charge
    from participant.ledger import record_charge
    from participant.local_config import LOCAL_CONFIG
    from tests.test_participant_policy import site

    (tmp_path / LOCAL_CONFIG).write_text(site().to_toml())
    record_charge(tmp_path, "run-1/round-1", Charge(0.5, 1.0, 1.0))
    assert run_light("participant", "status", str(tmp_path))[:2] == (0, [])
    assert main(["participant", "status", str(tmp_path), "--json"]) == 0
    code, imported, stderr = run_light("participant", "monitor", str(tmp_path), "--listen", "0.0.0.0:9464")
    assert (code, imported) == (2, []) and "refusing to listen on 0.0.0.0" in stderr  # no TLS, no token: nothing served
