"""What fedlora's processes print: fedlora's own progress, and other libraries' lines only when asked.

A `fedlora` command logs its own lines (loggers `fedlora`, `fedlora.*`) at INFO. Other libraries'
INFO and DEBUG lines, their warnings (logged or Python warnings) and deprecation notices (alembic,
Flower, torch, transformers, bitsandbytes, Ray) are hidden unless the command is given `--verbose`;
their errors always show, and so do Flower's warnings (a SuperNode retrying its connection).
The processes a command starts (Ray workers, Flower's SuperLink and SuperNode and the apps they
run) inherit the choice through the environment: `QUIET_ENVIRONMENT` without `--verbose`,
`FEDLORA_VERBOSE=1` with it.
"""

from __future__ import annotations

import logging
import os

VERBOSE = "FEDLORA_VERBOSE"  # "1" in the environment of a `fedlora --verbose` command and all it starts
FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
    "RAY_DEDUP_LOGS": "1",
    "FLWR_LOG_LEVEL": "WARNING",  # read by Flower when it is imported, here and in every Flower process
}


def verbose() -> bool:
    """Whether the `fedlora` command behind this process was given --verbose."""
    return os.environ.get(VERBOSE) == "1"


def quiet_environment() -> dict[str, str]:
    """The variables that keep a started process as quiet as this one (none under --verbose)."""
    return {} if verbose() else dict(QUIET_ENVIRONMENT)


def not_a_deprecation_notice(record: logging.LogRecord) -> bool:
    """Flower's notices about its own deprecated APIs (fedlora's `run_simulation` call) say nothing to a user."""
    return "DEPRECATED FEATURE" not in str(record.msg)


def configure(verbose_output: bool) -> None:
    """Set up a `fedlora` command's logging before anything noisy is imported."""
    if verbose_output:  # everything, as each library logs it
        os.environ[VERBOSE] = "1"
        logging.basicConfig(level=logging.INFO, format=FORMAT, datefmt=DATE_FORMAT)
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.ERROR, format=FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("fedlora").setLevel(logging.INFO)
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower prints its lines with its own handler; through ours they came twice
    flower.addFilter(not_a_deprecation_notice)
    logging.captureWarnings(True)  # Python warnings as `py.warnings` lines, below ERROR: hidden (libraries reset warning filters)


def show_progress() -> None:
    """fedlora's lines on stderr in a process Flower started for our apps, which sets up no logging.

    A deployed ServerApp's lines reach `flwr run --stream`; a deployed ClientApp (a fresh process
    per message) writes the participant's lines to the daemon's output. Without --verbose, other
    libraries' warnings (bitsandbytes and friends, logged as the model loads) are left out there too.
    """
    logger = logging.getLogger("fedlora")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if not verbose():
        logging.getLogger().setLevel(logging.ERROR)
