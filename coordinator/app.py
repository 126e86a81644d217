"""Flower ServerApp of the coordinator, for `flwr run .` and for `fedlora simulate`.

With `flwr run`, the run config carries fedlora keys as "section.key" plus optional
"config-file" (a TOML loaded first), "out" (the run directory), and for a deployed coordinator
"coordinator-dir" (its directory: registered participants, signing key) and "resume".

The round loop (and with it the model stack) is imported once logging is set up: a deployed
ServerApp's process would otherwise print the ML libraries' import-time warnings.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.runlock import round_loop
from fedlora.config import Config, config_from_flat
from fedlora.logs import show_progress

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_progress()  # round lines on stderr, which `flwr run --stream` shows
    from coordinator.rounds import Coordinator

    flat = dict(context.run_config)
    run_dir = Path(str(flat.pop("out", "") or f"runs/run-{context.run_id}"))
    deployment = str(flat.pop("coordinator-dir", "") or "")
    resume = bool(flat.pop("resume", False))
    with round_loop(run_dir) if deployment else nullcontext():  # a second loop on the run is refused before it reads anything
        Coordinator(config_from_flat(flat), run_dir, Path(deployment) if deployment else None, resume).run(grid)


def make_server_app(cfg: Config, run_dir: Path, failures: list[BaseException]) -> ServerApp:
    """A ServerApp bound to an already validated config; exceptions are kept for the caller."""
    from coordinator.rounds import Coordinator

    server_app = ServerApp()

    @server_app.main()
    def run(grid: Grid, context: Context) -> None:
        try:
            Coordinator(cfg, run_dir).run(grid)
        except BaseException as err:
            failures.append(err)
            raise

    return server_app
