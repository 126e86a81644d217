"""`fedlora participant init|start` before any Flower process runs: what init writes, what start refuses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.config import ConfigError
from fedlora.model import model_fingerprint
from participant import daemon
from participant.local_config import LOCAL_CONFIG, load_local_config

RECORDS = "Glucose,BMI,Outcome\n" + "".join(f"{100 + i},{20 + i % 7},{'yes' if i % 3 == 0 else 'no'}\n" for i in range(30))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "records.csv").write_text(RECORDS)
    (tmp_path / "ca.crt").write_text("stand-in: start fails before reading it when the model check fails")
    daemon.init(tmp_path / "site", "hospital-a", str(tmp_path / "records.csv"), "Outcome", "builtin:tiny-llama", "127.0.0.1:9", tmp_path / "ca.crt", 9094)
    return tmp_path / "site"


def test_init_records_the_labels_the_model_fingerprint_and_a_key_pair(site: Path) -> None:
    local = load_local_config(site)
    assert local.data.label_names == ["no", "yes"] and local.model.sha256 == model_fingerprint("builtin:tiny-llama")
    assert (site / "node.key").stat().st_mode & 0o777 == 0o600 and (site / "node.pub").is_file()
    assert local.policy.require_secagg  # secure aggregation is required unless the site says otherwise
    assert local.policy.require_approval and not local.policy.approved_config_sha256  # no run until the site approves one
    with pytest.raises(FileExistsError):
        daemon.init(site, "hospital-a", local.data.path, "Outcome", "builtin:tiny-llama", "127.0.0.1:9", None, 9094)


def test_start_refuses_a_base_model_whose_files_changed(site: Path) -> None:
    text = (site / LOCAL_CONFIG).read_text()
    recorded = tomllib.loads(text)["model"]["sha256"]
    (site / LOCAL_CONFIG).write_text(text.replace(recorded, "0" * 64))
    with pytest.raises(ConfigError, match="not the recorded model.sha256"):
        daemon.start(site)


def test_start_refuses_a_missing_ca_certificate(site: Path, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(FileNotFoundError, match="root_certificates"):
        daemon.start(site)
