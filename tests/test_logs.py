"""Quiet by default (fedlora/logs.py): fedlora's own lines show, other libraries' only with --verbose.

Each case runs in a fresh interpreter, as a `fedlora` command would: logging is set up once, first.
"""

from __future__ import annotations

import os
import subprocess
import sys

from fedlora.logs import QUIET_ENVIRONMENT, VERBOSE

SPEAK = """
import logging, os, sys, warnings
from fedlora.logs import configure
configure({verbose})
logging.getLogger("fedlora.coordinator").info("round 1/3: 4/4 participants")
logging.getLogger("fedlora.participant").warning("round 1: refused: policy.require_secagg")
logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
logging.getLogger("ray").error("a worker died")
warnings.warn("`torch.jit.script_method` is deprecated", DeprecationWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
import flwr.common.logger as flower
flower.log(logging.DEBUG, "Registered 4 nodes")
flower.warn_deprecated_feature("The `run_simulation` function is deprecated")
flower.log(logging.WARNING, "Connection attempt failed, retrying")
print("\\n".join(f"{{name}}={{os.environ.get(name)}}" for name in ({names!r})), file=sys.stderr)
"""


def speak(verbose: bool) -> str:
    environment = {name: value for name, value in os.environ.items() if name not in {*QUIET_ENVIRONMENT, VERBOSE}}
    code = SPEAK.format(verbose=verbose, names=[*QUIET_ENVIRONMENT, VERBOSE])
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True, timeout=120).stderr


def test_by_default_only_fedlora_lines_and_other_libraries_errors_and_warnings_of_flower_show() -> None:
    out = speak(False)
    assert "round 1/3: 4/4 participants" in out and "round 1: refused: policy.require_secagg" in out
    assert "a worker died" in out  # other libraries' errors always show
    assert "Connection attempt failed" in out and out.count("Connection attempt failed") == 1  # Flower's warnings, once
    for noise in ("setup plugin", "gemm_4bit_forward", "script_method", "is_gradient_checkpointing", "Registered 4 nodes", "DEPRECATED"):
        assert noise not in out
    # Processes a command starts (Ray workers, SuperLink, SuperNode) inherit the quiet settings.
    assert f"{VERBOSE}=None" in out and all(f"{name}={value}" in out for name, value in QUIET_ENVIRONMENT.items())


def test_verbose_shows_every_librarys_lines() -> None:
    out = speak(True)
    for line in ("setup plugin", "gemm_4bit_forward", "script_method", "is_gradient_checkpointing", "Registered 4 nodes", "DEPRECATED", "round 1/3"):
        assert line in out
    assert f"{VERBOSE}=1" in out and "FLWR_LOG_LEVEL=None" in out
