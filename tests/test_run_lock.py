"""One round loop per run, and the command a supervisor repeats (`coordinator run --start-or-resume`).

A Kubernetes Job re-runs its command after any failure, while the round loop it started may still
be going in the SuperLink's process: the repeated command must start a new run, resume a
checkpointed one, wait for a loop that is still going, and leave a finished run alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import deploy
from coordinator.checkpoint import CHECKPOINT
from coordinator.runlock import LOCK, round_loop, wait_for_round_loop

HOLD = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def test_a_second_round_loop_on_a_run_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    with round_loop(tmp_path / "main"):
        with pytest.raises(RuntimeError, match="another round loop is running this run"):
            with round_loop(tmp_path / "main"):
                pass
    with round_loop(tmp_path / "main"):  # released with the first
        pass


def test_waiting_for_a_round_loop_returns_when_its_process_ends(tmp_path: Path) -> None:
    assert not wait_for_round_loop(tmp_path)  # no loop ever ran
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / LOCK), "1.5"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    assert wait_for_round_loop(tmp_path)
    assert time.monotonic() - started > 0.5 and holder.wait(timeout=10) == 0
    assert not wait_for_round_loop(tmp_path)


@pytest.mark.parametrize(
    ("checkpointed", "done", "expected"),
    [(False, False, [False]), (True, False, [True]), (True, True, [])],
    ids=["a new run starts", "a checkpointed run resumes", "a finished run is left alone"],
)
def test_start_or_resume_does_what_the_run_directory_calls_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpointed: bool, done: bool, expected: list[bool]
) -> None:
    out = deploy.run_directory(tmp_path, "main")
    out.mkdir(parents=True)
    if checkpointed:
        (out / CHECKPOINT).write_bytes(b"")
    submitted: list[bool] = []
    monkeypatch.setattr(deploy, "finished", lambda path: done and path == out)
    monkeypatch.setattr(deploy, "run", lambda directory, name, resume, config: submitted.append(resume) or 0)
    assert deploy.start_or_resume(tmp_path, "main", None) == 0
    assert submitted == expected
