"""Base-model fingerprints: stated values agree with the computed one; only what defines a model counts."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedlora.cli import main
from fedlora.fingerprint import model_directory_fingerprint
from fedlora.model import builtin_tiny_llama_dir, model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = "builtin:tiny-llama"
# Where prose states a base model's fingerprint (whole or abbreviated to a prefix).
STATED = re.compile(r"(?:base model fingerprint|model\.sha256 is|base_model_sha256\W+|sha256\s*=\s*\[?\s*\")\s*([0-9a-f]{8,64})")


@pytest.fixture(scope="module")
def tiny() -> Path:
    return builtin_tiny_llama_dir()


@pytest.fixture
def copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def stated_in_tomls() -> list[tuple[str, str]]:
    """(file, fingerprint) for every TOML under examples/ and docs/ whose [model] is the built-in tiny Llama."""
    found = []
    for path in sorted([*ROOT.glob("examples/**/*.toml"), *ROOT.glob("docs/**/*.toml")]):
        model = tomllib.loads(path.read_text()).get("model", {})
        if BUILTIN in (model.get("name"), model.get("path")) and model.get("sha256"):
            found.append((str(path.relative_to(ROOT)), model["sha256"]))
    return found


def stated_in_docs() -> list[tuple[str, str]]:
    """(file:line, fingerprint) for every fingerprint stated in README.md and docs/**/*.md (all are the built-in's)."""
    found = []
    for path in sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")]):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [(f"{path.relative_to(ROOT)}:{number}", match) for match in STATED.findall(line)]
    return found


def test_every_stated_fingerprint_of_the_builtin_model_is_the_computed_one() -> None:
    actual = model_fingerprint(BUILTIN)
    stated = stated_in_tomls() + stated_in_docs()
    assert any(where.startswith("examples/deployment/run.toml") for where, _ in stated)  # the scan still finds them
    stale = [f"{where}: {value}" for where, value in stated if not actual.startswith(value)]
    assert not stale, f"these state another fingerprint for {BUILTIN} than the computed {actual}; update them: {stale}"


def test_two_builds_in_different_caches_are_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "one"))
    one = builtin_tiny_llama_dir()
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "two"))
    two = builtin_tiny_llama_dir()
    assert one != two
    assert model_directory_fingerprint(one) == model_directory_fingerprint(two) == model_fingerprint(BUILTIN)
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in ("config.json", "model.safetensors"))


def test_a_copy_with_other_serialisation_details_keeps_the_fingerprint(copy: Path) -> None:
    before = model_directory_fingerprint(copy)
    config = json.loads((copy / "config.json").read_text())
    config |= {"transformers_version": "4.46.0", "_name_or_path": "/somewhere/else", "torch_dtype": "float32"}
    (copy / "config.json").write_text(json.dumps(dict(reversed(config.items())), indent=4))  # other order and spacing
    tensors = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:5]}, str(copy / "model-00001-of-00002.safetensors"), metadata={"format": "pt", "by": "x"})
    save_file({name: tensors[name] for name in names[5:]}, str(copy / "model-00002-of-00002.safetensors"))
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "?" for n in names}}))
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "download.lock").write_text("2026-01-01")
    assert model_directory_fingerprint(copy) == before


def test_re_saving_with_the_installed_transformers_keeps_the_fingerprint(tiny: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    resaved = tmp_path / "resaved"
    LlamaForCausalLM.from_pretrained(tiny).save_pretrained(resaved, max_shard_size="1MB")  # stamped, sharded
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / name, resaved / name)
    assert len(list(resaved.glob("*.safetensors"))) > 1
    assert model_directory_fingerprint(resaved) == model_fingerprint(BUILTIN)


def test_one_changed_weight_config_value_or_token_changes_the_fingerprint(copy: Path) -> None:
    before = model_directory_fingerprint(copy)
    tensors = load_file(str(copy / "model.safetensors"))
    tensors["lm_head.weight"][3, 7] = np.nextafter(tensors["lm_head.weight"][3, 7], np.float32(1))
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    weight = model_directory_fingerprint(copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    eps = model_directory_fingerprint(copy)
    tokenizer = json.loads((copy / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<unk>"
    (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert len({before, weight, eps, model_directory_fingerprint(copy)}) == 4


def test_a_truncated_checkpoint_is_named_not_hashed(copy: Path) -> None:
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* outside the file"):
        model_directory_fingerprint(copy)


def test_the_builtin_model_loads_every_weight_and_tokenises_as_the_shipped_tokenizer(tiny: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fedlora.config import DataSection
    from fedlora.data import load_examples
    from fedlora.tokenizer import builtin_tokenizer

    model, info = LlamaForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert not any(info.values()), info
    assert abs(float(model.lm_head.weight.norm(dim=1).mean()) - 2.0) < 0.05  # rows of norm ~2: see tiny_llama_tensors
    ours, shipped = AutoTokenizer.from_pretrained(tiny), builtin_tokenizer()
    texts = [e.prompt + e.response for e in load_examples(DataSection(max_examples=50))]
    assert [ours(t)["input_ids"] for t in texts] == [shipped(t)["input_ids"] for t in texts]
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (0, 1, 2)


def test_model_hash_and_model_save_print_and_keep_the_one_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "hash", BUILTIN]) == 0
    assert capsys.readouterr().out.strip() == model_fingerprint(BUILTIN)
    assert main(["model", "save", BUILTIN, str(tmp_path / "base")]) == 0
    assert model_fingerprint(str(tmp_path / "base")) == model_fingerprint(BUILTIN)
    assert main(["model", "save", BUILTIN, str(tmp_path / "base")]) == 2  # refuses to write into a full directory
