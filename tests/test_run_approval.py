"""Run approval and the consortium's terms (issue 24): a site takes part only in runs it approved, and
every adapter version states the terms it was trained under.

Pure checks of `approval_violations`, the approvals file and the terms rules of `policy_violations`,
then one whole run over LocalGrid (the real Coordinator and participant ClientApp, a site directory)
in which the site approves the run after round 1 and withdraws the approval after round 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from coordinator.deploy import next_run_sha256, run_config_sha256
from coordinator.local_grid import LocalGrid
from coordinator.outputs import RunDirectory
from coordinator.rounds import Coordinator
from fedlora.cli import main
from fedlora.config import ConfigError, load_config
from fedlora.model import model_fingerprint
from fedlora.registry import find_public_key, verify_adapter
from fedlora.wire import instruction_content, read_instruction
from participant import app as participant_app
from participant.approvals import (
    APPROVALS,
    CONFIG,
    RUN,
    Approval,
    approval_records,
    approval_violations,
    approve,
    approved,
    parse_approval,
    revoke,
)
from participant.local_config import LOCAL_CONFIG, LocalDataSection, PolicySection, policy_violations
from participant.site import Refusal
from tests.conftest import SMALL
from tests.test_light_commands import run_light
from tests.test_participant_policy import NODE, _context, _message, events, run_config, site

HASH = "c" * 64
OTHER = "d" * 64
TERMS = ['terms.owner="North Consortium"', 'terms.licence="CC-BY-NC-4.0"', 'terms.permitted_use="research only"']


def required(**policy) -> PolicySection:
    return PolicySection(require_approval=True, **policy)


# --- what an approval is -----------------------------------------------------------------

def test_an_approval_is_a_configuration_hash_or_a_flower_run_id() -> None:
    assert parse_approval(f" {HASH.upper()} ") == Approval(CONFIG, HASH)
    assert parse_approval("0042") == Approval(RUN, "42")
    for bad in ("", "abc", HASH[:-1], HASH + "0", "run-42", "-3"):
        with pytest.raises(ValueError, match="neither a run configuration hash .* nor a Flower run id"):
            parse_approval(bad)


def test_an_unapproved_run_is_refused_naming_its_run_id_and_hash() -> None:
    (violation,) = approval_violations(required(), set(), HASH, 17)
    assert violation.startswith("policy.require_approval:") and "Flower run 17" in violation and HASH in violation
    assert f"fedlora participant approve DIR {HASH}" in violation


def test_a_run_is_approved_by_its_hash_or_its_run_id_and_by_nothing_else() -> None:
    assert approval_violations(required(), {Approval(CONFIG, HASH)}, HASH, 17) == []
    assert approval_violations(required(), {Approval(RUN, "17")}, HASH, 17) == []
    assert approval_violations(required(), {Approval(CONFIG, OTHER), Approval(RUN, "18")}, HASH, 17) != []


def test_the_default_policy_requires_approval_and_false_turns_it_off() -> None:
    assert PolicySection().require_approval is True
    assert approval_violations(PolicySection(require_approval=False), set(), HASH, 17) == []


def test_a_pinned_hash_approves_the_run(tmp_path: Path) -> None:
    policy = required(approved_config_sha256=[HASH])
    assert approval_violations(policy, approved(tmp_path, policy), HASH, 17) == []
    assert approval_violations(policy, approved(tmp_path, policy), OTHER, 17) != []


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"approved_config_sha256": ["abc"]}, "not SHA-256 hashes"),
        ({"approved_config_sha256": [HASH.upper()]}, "not SHA-256 hashes"),
        ({"approved_config_sha256": [HASH], "require_approval": False}, "policy.require_approval = false"),
    ],
)
def test_a_bad_pin_is_a_config_error_naming_the_key(policy: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"policy.approved_config_sha256: .*{message}"):
        PolicySection(**policy)


# --- the approvals file ------------------------------------------------------------------

def test_approving_revoking_and_approving_again_keeps_the_history(tmp_path: Path) -> None:
    policy = required()
    assert approve(tmp_path, HASH) == (Approval(CONFIG, HASH), True)
    assert approve(tmp_path, HASH) == (Approval(CONFIG, HASH), False)  # already standing: nothing written
    assert approve(tmp_path, "17") == (Approval(RUN, "17"), True)
    assert approved(tmp_path, policy) == {Approval(CONFIG, HASH), Approval(RUN, "17")}
    assert revoke(tmp_path, HASH, policy) == Approval(CONFIG, HASH)
    assert approved(tmp_path, policy) == {Approval(RUN, "17")}
    assert approval_violations(policy, approved(tmp_path, policy), HASH, 18) != []
    approve(tmp_path, HASH)
    records = approval_records(tmp_path)
    assert [(r["value"], bool(r["revoked"])) for r in records] == [(HASH, True), ("17", False), (HASH, False)]
    assert json.loads((tmp_path / APPROVALS).read_text()) == records


def test_revoking_what_is_not_approved_or_is_pinned_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has not approved it"):
        revoke(tmp_path, HASH, required())
    approve(tmp_path, HASH)
    with pytest.raises(ValueError, match="pins it; remove it from participant.toml"):
        revoke(tmp_path, HASH, required(approved_config_sha256=[HASH]))
    assert approved(tmp_path, required()) == {Approval(CONFIG, HASH)}  # nothing was withdrawn


@pytest.mark.parametrize("content", ['{"a": 1}', '[{"kind": "run_id", "value": "x", "approved": "t"}]', '[{"kind": "config_sha256", "value": "17", "approved": "t"}]', "[1]"])
def test_an_edited_approvals_file_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / APPROVALS).write_text(content)
    with pytest.raises(ValueError, match=f"{APPROVALS} is not a list of approvals"):
        approved(tmp_path, required())


def test_the_cli_approves_lists_and_revokes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / LOCAL_CONFIG).write_text(site(require_approval=True).to_toml())
    assert main(["participant", "approvals", str(tmp_path)]) == 0
    assert "no run approved: this site refuses every run" in capsys.readouterr().out
    assert main(["participant", "approve", str(tmp_path), HASH]) == 0
    assert f"approved configuration sha256 {HASH}" in capsys.readouterr().out
    assert main(["participant", "status", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["require_approval"] and [r["value"] for r in report["approvals"]] == [HASH]
    assert main(["participant", "approve", str(tmp_path), HASH, "--revoke"]) == 0
    assert main(["participant", "approvals", str(tmp_path)]) == 0
    assert "REVOKED" in capsys.readouterr().out
    assert main(["participant", "approve", str(tmp_path), "not-a-hash"]) == 2
    assert run_light("participant", "approvals", str(tmp_path))[:2] == (0, [])  # no model stack, no Flower


# --- the consortium's terms --------------------------------------------------------------

def test_a_site_pinning_another_owner_refuses_naming_the_rule() -> None:
    run = run_config(*TERMS)
    assert policy_violations(run, site(required_owner="North Consortium")) == []
    (violation,) = policy_violations(run, site(required_owner="South Trust"))
    assert violation.startswith("policy.required_owner:") and "'North Consortium'" in violation and "'South Trust'" in violation
    (violation,) = policy_violations(run_config(), site(required_owner="South Trust"))
    assert "terms.owner is not stated" in violation


def test_a_site_accepting_other_licences_refuses_naming_the_rule() -> None:
    run = run_config(*TERMS)
    assert policy_violations(run, site(accepted_licences=["CC-BY-4.0", "CC-BY-NC-4.0"])) == []
    (violation,) = policy_violations(run, site(accepted_licences=["CC-BY-4.0"]))
    assert violation.startswith("policy.accepted_licences:") and "'CC-BY-NC-4.0'" in violation and "'CC-BY-4.0'" in violation


# --- the hash the operator sends is the hash the site sees --------------------------------

def test_the_operators_hash_is_the_one_every_instruction_carries(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"  # as an operator writes it: a few keys, comments; the rest defaults
    path.write_text('# the consortium\'s run\n[terms]\nowner = "North Consortium"  # agreed 2026-11\n[federation]\nrounds = 2\n')
    cfg = load_config(path)
    sent = read_instruction(instruction_content(np.zeros(4, dtype=np.float32), 1, cfg.to_toml()))
    assert run_config_sha256(path) == RunDirectory(tmp_path / "run", cfg).config_sha256 == sent.config_sha256
    assert next_run_sha256(tmp_path) == sent.config_sha256
    path.write_text("[terms]\nowner = 3\nlicense = 'x'\n")
    assert next_run_sha256(tmp_path) is None  # status says run.toml does not load instead


def test_terms_change_the_hash_a_site_approved() -> None:
    """An approval by hash fixes the terms: the same run with another owner is not approved."""
    agreed, changed = run_config(*TERMS), run_config(*TERMS[1:], 'terms.owner="Someone Else"')
    first = read_instruction(instruction_content(np.zeros(4, dtype=np.float32), 1, agreed.to_toml())).config_sha256
    second = read_instruction(instruction_content(np.zeros(4, dtype=np.float32), 1, changed.to_toml())).config_sha256
    assert approval_violations(required(), {Approval(CONFIG, first)}, second, 1) != []


# --- a whole run: refused, approved, trained, withdrawn -------------------------------------

class SiteDecidesBetweenRounds(LocalGrid):
    """The site approves the run once it has refused round 1's train requests, and withdraws before round 3's."""

    def __init__(self, directory: Path, config_sha256: str) -> None:
        super().__init__(participant_app.app, {1: {"participant-dir": str(directory)}})
        self.directory, self.config_sha256 = directory, config_sha256

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        trained = {int(m.metadata.group_id) for m in messages if m.metadata.message_type == "train"}
        if 3 in trained:  # before round 3's requests reach the site
            revoke(self.directory, self.config_sha256, required())
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if 1 in trained:  # once round 1's are refused
            approve(self.directory, self.config_sha256)
        return replies


@pytest.fixture(scope="module")
def approval_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("approval")
    sha = model_fingerprint("builtin:tiny-llama")
    directory = root / "site"
    directory.mkdir()
    local = site(require_approval=True, model_sha256=sha)
    local.data = LocalDataSection(path="diabetes", label_names=["no", "yes"], max_examples=60)
    (directory / LOCAL_CONFIG).write_text(local.to_toml())
    cfg = load_config(None, [*SMALL, "federation.rounds=3", "federation.participants=1", f"model.sha256={sha}", "data.label_names=no,yes", *TERMS])
    coordinator = Coordinator(cfg, root / "run")
    rows = coordinator.run(SiteDecidesBetweenRounds(directory, coordinator.out.config_sha256))
    return {"rows": rows, "site": directory, "out": root / "run", "sha": coordinator.out.config_sha256, "cfg": cfg}


def test_a_site_that_has_not_approved_the_run_trains_nothing_and_logs_why(approval_run: dict) -> None:
    first = next(row for row in approval_run["rows"] if row["round"] == 1)
    assert first["applied"] is False and first["participants"] == 0
    (skip,) = first["skipped"]
    assert skip["reason"].startswith("refused: ") and "policy.require_approval" in skip["reason"] and approval_run["sha"] in skip["reason"]
    refused = [e for e in events(approval_run["site"]) if e["event"] == "refused"]
    assert [e["round"] for e in refused[:2]] == [0, 1]  # the round-0 evaluation, then round 1's training
    assert all("policy.require_approval" in e["reason"] and approval_run["sha"] in e["reason"] for e in refused)


def test_approving_lets_the_next_round_proceed_and_revoking_refuses_again(approval_run: dict) -> None:
    by_round = {row["round"]: row for row in approval_run["rows"] if "stopped" not in row}
    assert by_round[2]["applied"] is True and by_round[2]["participants"] == 1
    assert by_round[3]["applied"] is False and "policy.require_approval" in by_round[3]["skipped"][0]["reason"]
    logged = events(approval_run["site"])
    assert sorted({e["round"] for e in logged if e["event"] == "refused"}) == [0, 1, 3]  # round 2 and its evaluations were served
    assert [(e["event"], e["round"]) for e in logged if e["event"] != "refused"] == [  # what it did, once approved
        ("evaluated", 1), ("trained", 2), ("contributed", 2), ("evaluated", 2)
    ]


def test_a_revoked_approval_refuses_evaluations_too(approval_run: dict) -> None:
    _message(RecordDict())  # sets Flower's task identity, which a Message needs
    message = Message(instruction_content(np.zeros(8, dtype=np.float32), 4, approval_run["cfg"].to_toml()), dst_node_id=NODE, message_type="evaluate", group_id="4")
    with pytest.raises(Refusal, match="refuses an evaluation request for round 4: policy.require_approval"):
        participant_app.checked_instruction(message, _context(approval_run["site"]), "an evaluation request")


def test_every_manifest_states_the_terms_under_its_signature(approval_run: dict) -> None:
    versions = sorted((approval_run["out"] / "adapters").glob("round-*"))
    assert [v.name for v in versions] == ["round-0000", "round-0001", "round-0002", "round-0003"]
    key = find_public_key(versions[0]).read_bytes()
    terms = {"owner": "North Consortium", "licence": "CC-BY-NC-4.0", "permitted_use": "research only"}
    for version in versions:
        manifest = json.loads((version / "manifest.json").read_text())
        assert manifest["facts"]["terms"] == terms and manifest["facts"]["config_sha256"] == approval_run["sha"]
        assert verify_adapter(version, key) == []
    tampered = json.loads((versions[-1] / "manifest.json").read_text())
    tampered["facts"]["terms"]["owner"] = "Someone Else"
    (versions[-1] / "manifest.json").write_text(json.dumps(tampered))
    assert any("signature does not verify" in problem for problem in verify_adapter(versions[-1], key))
