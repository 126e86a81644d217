"""One round loop per run directory.

A deployed run's round loop lives in the ServerApp process the SuperLink starts, not in the
`fedlora coordinator run` that submitted it: when that command dies (a closed terminal, a
Kubernetes Job's pod evicted) the loop goes on, and a `--resume` would start a second loop
writing the same metrics, audit chain and checkpoint. The loop therefore holds an exclusive
`flock` on `DIR/runs/<name>/round-loop.lock` from before it reads the checkpoint until it ends;
the kernel drops the lock with the process, so a crash never leaves a stale lock behind (a pid
file would, and pids repeat across container restarts). The lock is seen by every process on the
machine that mounts the run directory, a command in another pod on the same node included.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = "round-loop.lock"


@contextmanager
def round_loop(out: Path) -> Iterator[None]:
    """Hold the run's lock while its round loop runs; RuntimeError if another loop holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{out}: another round loop is running this run; wait for it (or stop it) before resuming") from None
        yield


def wait_for_round_loop(out: Path) -> bool:
    """Block while another process runs the run's round loop; whether one was running."""
    path = Path(out) / LOCK
    if not path.is_file():
        return False
    with path.open() as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            fcntl.flock(handle, fcntl.LOCK_SH)
            return True
