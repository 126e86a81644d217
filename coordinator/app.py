"""Flower ServerApp of the coordinator, for `flwr run .` and for `fedlora simulate`.

With `flwr run`, the run config carries fedlora keys as "section.key" plus optional
"config-file" (a TOML loaded first) and "out" (the run directory).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.rounds import Coordinator
from fedlora.config import Config, config_from_flat

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    flat = dict(context.run_config)
    run_dir = Path(str(flat.pop("out", "") or f"runs/run-{context.run_id}"))
    Coordinator(config_from_flat(flat), run_dir).run(grid)


def make_server_app(cfg: Config, run_dir: Path, failures: list[BaseException]) -> ServerApp:
    """A ServerApp bound to an already validated config; exceptions are kept for the caller."""
    server_app = ServerApp()

    @server_app.main()
    def run(grid: Grid, context: Context) -> None:
        try:
            Coordinator(cfg, run_dir).run(grid)
        except BaseException as err:
            failures.append(err)
            raise

    return server_app
