"""Coordinator checkpoints and `--resume` (coordinator/checkpoint.py, Coordinator.restore,
RunDirectory.resume_at): the file format, a run killed in round 3 that resumes with its
privacy accountant, server optimiser state, audit chain and signing key as they were, and a
secure round re-run with freshly drawn buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from coordinator.local_grid import LocalGrid
from coordinator.outputs import cut_torn_tail, read_metrics
from coordinator.rounds import Coordinator
from fedlora.audit import read_records, verify
from fedlora.config import Config, load_config
from fedlora.privacy.accountant import RoundAccountant
from fedlora.registry import verify_adapter
from fedlora.secagg import assign_buckets
from participant.app import app
from tests.conftest import SMALL

PARTICIPANTS = 4
# Central user-level DP (as in test_central_dp) with a stateful server optimiser; tiny rounds.
RESUMABLE = [
    *SMALL,
    "privacy.noise_multiplier=1.0",
    f"federation.participants={PARTICIPANTS}",
    "federation.fraction=0.5",
    "federation.rounds=3",
    "federation.server_optimizer=fedadam",
    "train.local_steps=1",
    "data.max_examples=80",
]


# --- the file -----------------------------------------------------------------------------

def test_a_checkpoint_round_trips_nested_arrays_none_and_lists(tmp_path: Path) -> None:
    state = {
        "round": 7,
        "config_sha256": "f" * 64,
        "adapter": np.arange(12, dtype=np.float32),
        "server_optimizer": {"name": "fedadam", "m": np.full((2, 3), 0.5), "v": None, "steps": 7, "lr": 0.01},
        "privacy": None,
        "history": [[0.5, 1.0, 3], [0.25, 2.0, 1]],
        "mixed": [np.array([1, 2, 3], dtype=np.int64), None, {"deep": [np.zeros((0,), dtype=np.float16), "text"]}],
        "special": [float("inf"), float("-inf")],
    }
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert set(loaded) == set(state)
    assert loaded["round"] == 7 and loaded["config_sha256"] == "f" * 64 and loaded["privacy"] is None
    assert loaded["history"] == [[0.5, 1.0, 3], [0.25, 2.0, 1]]
    assert loaded["special"] == [float("inf"), float("-inf")]
    for got, expected in [
        (loaded["adapter"], state["adapter"]),
        (loaded["server_optimizer"]["m"], state["server_optimizer"]["m"]),
        (loaded["mixed"][0], state["mixed"][0]),
        (loaded["mixed"][2]["deep"][0], state["mixed"][2]["deep"][0]),
    ]:
        assert isinstance(got, np.ndarray) and got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert loaded["server_optimizer"]["v"] is None and loaded["server_optimizer"]["steps"] == 7
    assert loaded["mixed"][1] is None and loaded["mixed"][2]["deep"][1] == "text"
    nan_path = tmp_path / "nan.npz"
    save_checkpoint(nan_path, {"x": float("nan")})
    assert np.isnan(load_checkpoint(nan_path)["x"])


def test_saving_replaces_the_checkpoint_whole(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"round": 1, "adapter": np.ones(1000)})
    save_checkpoint(path, {"round": 2, "adapter": np.zeros(3)})
    loaded = load_checkpoint(path)
    assert loaded["round"] == 2 and loaded["adapter"].tolist() == [0.0, 0.0, 0.0]
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temporary file left behind


@pytest.mark.parametrize("keep", ["half", "all-but-one", "ten", "none"])
def test_a_torn_checkpoint_is_a_value_error_naming_the_path(tmp_path: Path, keep: str) -> None:
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, {"round": 3, "adapter": np.arange(500, dtype=np.float32), "nested": {"v": np.ones(40)}})
    data = path.read_bytes()
    path.write_bytes(data[: {"half": len(data) // 2, "all-but-one": len(data) - 1, "ten": 10, "none": 0}[keep]])
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_file_that_is_no_checkpoint_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT
    np.savez(path, other=np.ones(3))  # a valid .npz without the state document
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_a_missing_checkpoint_says_to_start_without_resume(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(tmp_path / CHECKPOINT)
    assert "--resume" in str(err.value) and str(tmp_path / CHECKPOINT) in str(err.value)


# --- torn append-only files ---------------------------------------------------------------

def test_cut_torn_tail_drops_an_unterminated_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    complete = b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(complete + b'{"c": ')
    assert cut_torn_tail(path) == len(b'{"c": ')
    assert path.read_bytes() == complete
    assert cut_torn_tail(path) == 0 and path.read_bytes() == complete  # nothing more to cut
    path.write_bytes(b'{"only": "torn"')
    assert cut_torn_tail(path) == len(b'{"only": "torn"') and path.read_bytes() == b""
    assert cut_torn_tail(path) == 0
    assert cut_torn_tail(tmp_path / "missing.jsonl") == 0 and not (tmp_path / "missing.jsonl").exists()


# --- crash and resume over LocalGrid ----------------------------------------------------------

class KilledGrid(LocalGrid):
    """A LocalGrid whose coordinator 'dies' when it sends round `kill_round`'s train requests.

    Evaluation goes to every node, so the only exchange of a round that can be empty is its
    train exchange (Poisson sampling may draw nobody): an empty send after the previous
    round's evaluation is that round's train exchange too.
    """

    def __init__(self, *args, kill_round: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kill_round = str(kill_round)
        self.previous = (str(kill_round - 1), "evaluate")
        self.last: tuple[str, str] | None = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        kinds = {(m.metadata.group_id, m.metadata.message_type) for m in messages}
        if (self.kill_round, "train") in kinds or (not messages and self.last == self.previous):
            raise RuntimeError("killed")
        if messages:
            self.last = (messages[0].metadata.group_id, messages[0].metadata.message_type)
        return super().send_and_receive(messages, timeout=timeout)


def nodes() -> dict[int, dict]:
    return {p + 1: {"partition-id": p, "num-partitions": PARTICIPANTS} for p in range(PARTICIPANTS)}


def rounds_of(cfg: Config, rounds: int = 3) -> float:
    accountant = RoundAccountant(cfg.privacy.delta)
    for _ in range(rounds):
        accountant.compose(cfg.federation.fraction, cfg.privacy.noise_multiplier)
    return accountant.epsilon()


def check_resumed_run(cfg: Config, run_dir: Path, rows: list[dict], dropped: list[int], counted: tuple[int, ...] = ()) -> list[dict]:
    """`counted`: cut-short rounds that released a result, so their privacy cost stays spent."""
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]
    assert rows[-1]["epsilon"] == pytest.approx(rounds_of(cfg, 3 + len(counted)), rel=1e-9)
    assert [r["epsilon"] for r in rows[1:]] == sorted(r["epsilon"] for r in rows[1:])  # still growing, not restarted

    problems, _ = verify(run_dir / "audit.jsonl")
    assert problems == []
    events = read_records(run_dir / "audit.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(resumed) == 1
    assert resumed[0]["from_round"] == 2 and resumed[0]["dropped_rounds"] == dropped
    assert resumed[0]["privacy_counted_rounds"] == list(counted)
    assert resumed[0]["config_sha256"] == events[0]["config_sha256"]
    after = events[events.index(resumed[0]) + 1 :]
    assert [(e["event"], e.get("round")) for e in after] == [("round", 3), ("ended", None)]
    assert after[1]["rounds_run"] == 3 and after[1]["final"] == "final"
    assert after[0]["epsilon"] == pytest.approx(rows[-1]["epsilon"], rel=1e-12)

    state = load_checkpoint(run_dir / CHECKPOINT)
    assert state["round"] == 3
    applied = sum(bool(r.get("applied")) for r in rows[1:])
    assert state["server_optimizer"]["name"] == "fedadam" and state["server_optimizer"]["steps"] == applied
    assert sum(n for _, _, n in state["privacy"]["accountant"]["history"]) == 3 + len(counted)
    assert state["audit_last"] == [e for e in events if e["event"] == "round"][-1]["hash"]  # "ended" follows it

    trusted = (run_dir / "coordinator.pub").read_bytes()
    for name in ("round-0002", "round-0003", "final"):
        assert verify_adapter(run_dir / "adapters" / name, trusted) == [], name
    manifest = json.loads((run_dir / "adapters" / "final" / "manifest.json").read_text())["facts"]
    assert manifest["round"] == 3 and manifest["epsilon"] == pytest.approx(rows[-1]["epsilon"], rel=1e-12)
    return events


def test_a_run_killed_in_round_3_resumes_with_its_privacy_and_optimiser_state(tmp_path: Path) -> None:
    cfg = load_config(None, RESUMABLE)
    with pytest.raises(RuntimeError, match="killed"):
        Coordinator(cfg, tmp_path).run(KilledGrid(app, nodes(), kill_round=3))
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert load_checkpoint(tmp_path / CHECKPOINT)["round"] == 2

    rows = Coordinator(cfg, tmp_path, resume=True).run(LocalGrid(app, nodes()))
    events = check_resumed_run(cfg, tmp_path, rows, dropped=[])
    assert [e["event"] for e in events] == ["run", "round", "round", "resumed", "round", "ended"]
    assert events[3]["torn_audit_bytes"] == 0


def test_a_run_killed_after_writing_round_3_drops_that_round_and_its_torn_audit_line(tmp_path: Path) -> None:
    """Killed between round 3's metrics row and its checkpoint, mid-way through an audit line."""
    cfg = load_config(None, RESUMABLE)
    coordinator = Coordinator(cfg, tmp_path)
    save_adapter = coordinator.out.save_adapter

    def killed_in_round_3(server_round: int, *args, **kwargs):
        if server_round == 3:
            raise RuntimeError("killed")
        return save_adapter(server_round, *args, **kwargs)

    coordinator.out.save_adapter = killed_in_round_3
    with pytest.raises(RuntimeError, match="killed"):
        coordinator.run(LocalGrid(app, nodes()))
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]  # the row was out, the checkpoint not
    cut_short = [r for r in read_records(tmp_path / "audit.jsonl") if r["event"] == "round" and r["round"] == 3]
    torn = b'{"event": "round", "round": 4, "se'
    with (tmp_path / "audit.jsonl").open("ab") as handle:
        handle.write(torn)

    rows = Coordinator(cfg, tmp_path, resume=True).run(LocalGrid(app, nodes()))
    # Round 3's update was computed and recorded before the kill: if it was applied (Poisson sampling
    # may draw too few), it released a result, and its privacy cost is not forgotten.
    events = check_resumed_run(cfg, tmp_path, rows, dropped=[3], counted=(3,) if cut_short[0]["applied"] else ())
    # The cut-short round's record stays in the chain (it is append-only); the resumption says it was dropped.
    assert [e["event"] for e in events] == ["run", "round", "round", "round", "resumed", "round", "ended"]
    assert events[4]["torn_audit_bytes"] == len(torn)
    assert (tmp_path / "audit.jsonl").read_bytes().endswith(b"\n")


def test_resuming_a_finished_run_changes_nothing_but_the_record(tmp_path: Path) -> None:
    cfg = load_config(None, [*RESUMABLE, "federation.rounds=1", "federation.fraction=1.0"])  # Poisson at 1: the round applies
    first = Coordinator(cfg, tmp_path).run(LocalGrid(app, nodes()))
    final = (tmp_path / "adapters" / "final" / "adapter_model.safetensors").read_bytes()
    again = Coordinator(cfg, tmp_path, resume=True).run(LocalGrid(app, nodes()))
    assert [r["round"] for r in again] == [0, 1] and again == first
    assert (tmp_path / "adapters" / "final" / "adapter_model.safetensors").read_bytes() == final
    assert [e["event"] for e in read_records(tmp_path / "audit.jsonl")] == ["run", "round", "ended", "resumed", "ended"]
    assert verify(tmp_path / "audit.jsonl")[0] == []


def test_resume_is_refused_for_another_configuration(tmp_path: Path) -> None:
    cfg = load_config(None, RESUMABLE)
    Coordinator(cfg, tmp_path).checkpoint(0)
    before = (tmp_path / "audit.jsonl").read_bytes()
    other = load_config(None, [*RESUMABLE, "train.lr=0.01"])
    assert other.train.lr != cfg.train.lr
    with pytest.raises(ValueError) as err:
        Coordinator(other, tmp_path, resume=True)
    assert "another configuration" in str(err.value) and str(tmp_path) in str(err.value)
    assert (tmp_path / "audit.jsonl").read_bytes() == before  # no 'resumed' record for a refused resumption
    assert load_config(tmp_path / "config.toml") == cfg  # the run's own config.toml is kept


def test_resume_is_refused_when_the_audit_log_lost_records_before_the_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(None, RESUMABLE)
    coordinator = Coordinator(cfg, tmp_path)
    coordinator.out.audit.append({"event": "round", "round": 1})
    coordinator.checkpoint(1)  # its audit_last is the round record
    first_line = (tmp_path / "audit.jsonl").read_text().splitlines()[0]
    (tmp_path / "audit.jsonl").write_text(first_line + "\n")  # cut off the end: still a valid chain
    assert verify(tmp_path / "audit.jsonl")[0] == []
    with pytest.raises(ValueError, match="truncated"):
        Coordinator(cfg, tmp_path, resume=True)


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        Coordinator(load_config(None, RESUMABLE), tmp_path, resume=True)
    assert "--resume" in str(err.value)


def test_a_resumed_secure_round_draws_its_buckets_afresh_and_the_log_records_every_draw(tmp_path: Path) -> None:
    """Killed after round 2's audit record: the re-run round draws a new bucket secret (nothing replays it)."""
    cfg = load_config(None, [
        *SMALL, f"federation.participants={PARTICIPANTS}", "federation.fraction=1.0", "federation.rounds=2",
        "secagg.enabled=true", "secagg.bucket_size=2", "train.local_steps=1", "data.max_examples=80",
    ])
    coordinator = Coordinator(cfg, tmp_path)
    save_adapter = coordinator.out.save_adapter

    def killed_in_round_2(server_round: int, *args, **kwargs):
        if server_round == 2:
            raise RuntimeError("killed")
        return save_adapter(server_round, *args, **kwargs)

    coordinator.out.save_adapter = killed_in_round_2
    with pytest.raises(RuntimeError, match="killed"):
        coordinator.run(LocalGrid(app, nodes()))
    rows = Coordinator(cfg, tmp_path, resume=True).run(LocalGrid(app, nodes()))

    assert verify(tmp_path / "audit.jsonl")[0] == []  # which recomputes each round's buckets from its secret
    drawn = [r for r in read_records(tmp_path / "audit.jsonl") if r["event"] == "round"]
    assert [r["round"] for r in drawn] == [1, 2, 2] and len({r["bucket_secret"] for r in drawn}) == 3
    for record in drawn:  # an auditor's recomputation: ids index the round's members in name order
        members = sorted(name for bucket in record["buckets"] for name in bucket)
        assert members == sorted(record["sampled"]) and record["bucket_size"] == 2
        ids = assign_buckets(list(range(len(members))), 2, bytes.fromhex(record["bucket_secret"]))
        assert record["buckets"] == [[members[i] for i in group] for group in ids]
    assert [r["secagg"]["bucket_secret"] for r in rows if r["round"]] == [drawn[0]["bucket_secret"], drawn[2]["bucket_secret"]]
