"""The participant's log (participant/report.py): one line per instruction, a refusal without a traceback.

The ClientApp's real handlers are driven over coordinator/local_grid.py (Flower messages through
protobuf, as a SuperNode delivers them); the lines are read with caplog.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from coordinator.gather import error_reason
from coordinator.local_grid import LocalGrid
from coordinator.rounds import Coordinator
from fedlora.config import load_config
from fedlora.wire import instruction_content
from participant import app as participant_app
from participant.report import trained
from participant.site import EVENTS
from tests.conftest import SMALL
from tests.test_participant_policy import run_config, secure_only_site  # noqa: F401 (a fixture)

NODE = 7


def participant_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "fedlora.participant"]


def test_each_train_and_evaluation_is_one_line_with_records_loss_time_and_epsilon(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run with local DP-SGD: every trained line states the sample-level epsilon spent so far."""
    caplog.set_level(logging.INFO, logger="fedlora")
    cfg = load_config(None, [*SMALL, "federation.rounds=1", "federation.participants=2", "train.local_steps=1", "data.max_examples=60",
                             "privacy.local_noise_multiplier=1.0"])  # fmt: skip
    grid = LocalGrid(participant_app.app, {node: {"partition-id": node - 1, "num-partitions": 2} for node in (1, 2)})
    rows = Coordinator(cfg, tmp_path / "run").run(grid)
    lines = [record.getMessage() for record in participant_lines(caplog)]
    trained_lines = [line for line in lines if " trained " in line]
    assert len(trained_lines) == 2, lines
    for line in trained_lines:
        # One step of Poisson draws may take no record: then there is no loss to state.
        match = re.fullmatch(r"round 1: trained on (\d+) records, loss (\d+\.\d{3}|n/a \(DP-SGD's Poisson draws took no record\)), (\d+\.\d) s, epsilon (\d+\.\d{2}) so far", line)
        assert match, line
        assert int(match[1]) > 0 and float(match[4]) > 0
    evaluated_lines = [line for line in lines if " evaluated " in line]
    assert len(evaluated_lines) == 2 * len(rows)  # both participants, before training (round 0) and after round 1
    assert all(re.fullmatch(r"round [01]: evaluated on \d+ records: loss \d+\.\d{3}, accuracy [01]\.\d{3}", line) for line in evaluated_lines), evaluated_lines
    assert len(lines) == len(trained_lines) + len(evaluated_lines)  # nothing else, and nothing twice


def test_a_trained_line_without_dp_sgd_states_no_epsilon(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedlora")
    trained(3, {"num-examples": 412, "train_loss": 0.5321, "partition_id": 0}, 4.06)
    assert [record.getMessage() for record in participant_lines(caplog)] == ["round 3: trained on 412 records, loss 0.532, 4.1 s"]


def _plaintext_message(message_type: str, server_round: int) -> Message:
    LocalGrid(participant_app.app, {})  # sets Flower's task identity, which a Message needs
    content = instruction_content(np.zeros(8, dtype=np.float32), server_round, run_config().to_toml())
    return Message(content, dst_node_id=NODE, message_type=message_type, group_id=str(server_round))


def test_a_refusal_is_one_warning_line_and_an_error_reply_not_a_raised_exception(secure_only_site: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Flower logs a traceback only for a ClientApp that raises; a refusing one answers instead."""
    caplog.set_level(logging.INFO, logger="fedlora")
    context = Context(run_id=1, node_id=NODE, node_config={"participant-dir": str(secure_only_site)}, state=RecordDict(), run_config={})
    reply = participant_app.app(_plaintext_message("train", 3), context)  # returns: nothing for Flower to log
    assert reply.has_error()
    assert error_reason(reply.error.reason).startswith("refused: hospital-a refuses a train request for round 3: policy.require_secagg")
    (line,) = participant_lines(caplog)
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert line.getMessage().startswith("round 3: refused: hospital-a refuses a train request for round 3: policy.require_secagg")
    assert "\n" not in line.getMessage()
    (event,) = [json.loads(text) for text in (secure_only_site / EVENTS).read_text().splitlines()]
    assert event["event"] == "refused" and event["round"] == 3 and "policy.require_secagg" in event["reason"]


def test_the_coordinator_reads_the_refusal_from_the_reply_over_the_wire(secure_only_site: Path) -> None:
    grid = LocalGrid(participant_app.app, {NODE: {"participant-dir": str(secure_only_site)}})
    (reply,) = grid.send_and_receive([_plaintext_message("train", 1)])
    assert reply.has_error() and "Refusal" in reply.error.reason
    assert error_reason(reply.error.reason).startswith("refused: hospital-a refuses a train request for round 1")


def test_an_evaluation_refusal_names_what_an_evaluation_sends(secure_only_site: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedlora")
    grid = LocalGrid(participant_app.app, {NODE: {"participant-dir": str(secure_only_site)}})
    (reply,) = grid.send_and_receive([_plaintext_message("evaluate", 2)])
    reason = error_reason(reply.error.reason)
    assert reason.startswith("refused: hospital-a refuses an evaluation request for round 2: policy.require_secagg")
    assert "not even to evaluate" in reason and "loss, accuracy or generation scores, and record counts" in reason
    assert "update" not in reason  # an evaluation sends no update
    (line,) = participant_lines(caplog)
    assert line.getMessage().startswith("round 2: refused: ") and "update" not in line.getMessage()
    (event,) = [json.loads(text) for text in (secure_only_site / EVENTS).read_text().splitlines()]
    assert "not even to evaluate" in event["reason"]


def test_a_replayed_secure_stage_is_refused_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The secure-aggregation stages answer their refusals the same way (participant/secure.py)."""
    from coordinator.secure import secure_sum
    from fedlora.config import SecaggSection
    from tests.test_secure_federation import _federation

    grid, members, _, _ = _federation(3, 50)
    secure_sum(grid, members, SecaggSection(enabled=True), server_round=3, length=50, run_tag="t", clip_norm=1.0)
    caplog.set_level(logging.INFO, logger="fedlora")
    again = secure_sum(grid, members, SecaggSection(enabled=True), server_round=3, length=50, run_tag="t2", clip_norm=1.0)
    assert not again.buckets and all("refused: refused a setup request for round 3" in r.reason for r in again.skipped)
    lines = [record.getMessage() for record in participant_lines(caplog)]
    assert len(lines) == len(members) and all(line.startswith("round 3: refused: refused a setup request for round 3") for line in lines), lines


def test_a_step_that_drew_no_record_states_no_loss(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedlora")
    trained(2, {"num-examples": 40, "train_loss": float("nan"), "local_epsilon": 0.5}, 1.0)
    (line,) = [record.getMessage() for record in participant_lines(caplog)]
    assert line == "round 2: trained on 40 records, loss n/a (DP-SGD's Poisson draws took no record), 1.0 s, epsilon 0.50 so far"
