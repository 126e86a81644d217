"""A site's personalised adapter through `fedlora generate --personal` and `fedlora adapter export --personal`
(fedlora/personal_adapter.py): used only beside the verified version it personalises, and only if shaped like it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedlora.cli import main
from fedlora.data import instruction_example
from fedlora.export import export_version
from fedlora.generate import answer, open_version
from tests.conftest import signed_version, trusted
from tests.test_generate import QUESTION, stock_greedy


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return signed_version(tmp_path_factory.mktemp("personal"), [], scale=0.2)


def personal_of(version: Path, where: Path, seed: int = 5) -> Path:
    """A personalised adapter as a site keeps it: the version's config, its own weights (other values, same shapes)."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy2(version / "adapter_config.json", where / "adapter_config.json")
    rng = np.random.default_rng(seed)
    tensors = {name: rng.normal(0.0, 0.3, array.shape).astype(np.float32) for name, array in load_file(str(version / "adapter_model.safetensors")).items()}
    save_file(tensors, str(where / "adapter_model.safetensors"))
    return where


def test_generate_answers_with_the_personal_weights_in_the_versions_format(version: Path, tmp_path: Path) -> None:
    personal = personal_of(version, tmp_path / "personal" / "7" / "round-0003")
    answerer = open_version(version, trusted(version), None, "none", False, version.parents[1], personal)
    question = instruction_example(QUESTION)
    assert answer(answerer, question, 8) == stock_greedy(personal, question.prompt, 8)
    assert main(["generate", str(version), "--personal", str(personal), "--prompt", QUESTION, "--max-new-tokens", "2"]) == 0


def test_export_writes_the_personal_weights_and_names_both_sources(version: Path, tmp_path: Path) -> None:
    personal = personal_of(version, tmp_path / "mine")
    target = export_version(version, tmp_path / "served", trusted(version), personal=personal)
    exported, own = load_file(str(target / "adapter_model.safetensors")), load_file(str(personal / "adapter_model.safetensors"))
    assert exported.keys() == own.keys() and all(np.array_equal(exported[k], own[k]) for k in own)
    record = json.loads((target / "EXPORT.json").read_text())
    assert record["source_version"] == version.name and record["personalised"]["adapter"] == str(personal.resolve())
    import hashlib

    assert record["personalised"]["adapter_sha256"] == hashlib.sha256((personal / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_a_personal_adapter_of_another_shape_or_beside_a_tampered_version_is_refused(version: Path, tmp_path: Path) -> None:
    other_rank = personal_of(version, tmp_path / "r4")
    config = json.loads((other_rank / "adapter_config.json").read_text())
    (other_rank / "adapter_config.json").write_text(json.dumps(config | {"r": config["r"] * 2}))
    with pytest.raises(ValueError, match="does not personalise"):
        export_version(version, tmp_path / "a", trusted(version), personal=other_rank)
    fewer = personal_of(version, tmp_path / "fewer")
    tensors = load_file(str(fewer / "adapter_model.safetensors"))
    save_file(dict(list(tensors.items())[1:]), str(fewer / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="tensors are not the version's"):
        export_version(version, tmp_path / "b", trusted(version), personal=fewer)
    with pytest.raises(FileNotFoundError, match="personalised adapter"):
        export_version(version, tmp_path / "c", trusted(version), personal=tmp_path / "nowhere")
    tampered = tmp_path / "tampered"
    shutil.copytree(version, tampered)
    (tampered / "adapter_config.json").write_text((tampered / "adapter_config.json").read_text() + " ")
    with pytest.raises(ValueError, match="does not verify"):
        export_version(tampered, tmp_path / "d", trusted(version), personal=personal_of(version, tmp_path / "ok"))
    assert not any((tmp_path / name).exists() for name in "abcd")  # a refused export leaves nothing behind
