"""Running Flower's own processes for `fedlora coordinator ...` and `fedlora participant ...`.

We write no transport: the coordinator is a `flower-superlink`, a participant a `flower-supernode`,
and runs are submitted with `flwr run`. Each keeps its Flower state (FLWR_HOME: connection
settings, installed app bundles) inside the fedlora directory it belongs to, so two
participants (or a coordinator and a participant) can share one machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from fedlora.logs import quiet_environment


def executable(name: str) -> str:
    """Path of a Flower command installed next to this Python (flwr[simulation] provides them)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed; `pip install 'flwr[simulation]>=1.41,<2'` provides it")
    return found


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """This process's environment with FLWR_HOME set and the ML libraries kept offline (and quiet, fedlora/logs.py)."""
    environment = {**quiet_environment(), **os.environ, "FLWR_HOME": str(flwr_home)}
    environment["HF_HUB_OFFLINE"] = "1"
    return environment


def run_service(argv: list[str], environment: dict[str, str], explain: dict[str, str] | None = None, ended_alone: str = "") -> int:
    """Run a long-lived Flower process in the foreground; SIGTERM/SIGINT reach it; its exit code.

    Its output passes through; once it ends, the explanation of the first key of `explain` (in
    its order) that some line contained is printed (Flower reports some refusals only as text),
    else `ended_alone` if it exited with status 0 though nobody signalled it to stop.
    """
    child = subprocess.Popen(argv, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    signalled: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        signalled.append(signum)
        child.send_signal(signum)

    seen: list[str] = []

    def relay() -> None:  # in a thread: a grandchild may hold the pipe open after the child exits
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            seen.extend(note for key, note in (explain or {}).items() if key in line and note not in seen)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
        reader.join(timeout=2.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    first = next((note for note in (explain or {}).values() if note in seen), None)
    if not first and code == 0 and not signalled:
        first = ended_alone
    if first:
        print(f"fedlora: {first}", file=sys.stderr)
    return code


def run_command(argv: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A short Flower CLI call, output captured (for `flwr supernode register` and friends)."""
    return subprocess.run(argv, env=environment, capture_output=True, text=True, check=False)
