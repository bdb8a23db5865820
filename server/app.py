"""FedPGen ServerApp: parse the run config, run the federation. Logic lives in server/federation.py."""

from __future__ import annotations

from flwr.app import Context
from flwr.server import Grid
from flwr.serverapp import ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedpgen.server.federation import run_server
from fedpgen.server.metrics_log import require_backend
from fedpgen.server.progress import ensure_log_handler
from fedpgen.server.standalone import run_under_flwr
from fedpgen.shared.config import RunConfig


def build_app() -> ServerApp:
    """The ServerApp. In Flower's Simulation Engine (an in-memory grid: ``fedpgen simulate`` and
    ``flwr run .``) it also prepares and finishes the run (server/standalone.py). A run that
    ends before its planned rounds (budgets spent) or refused an out-of-bounds round fails, after
    its summary is written: Flower then reports the run as failed."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping(dict(context.run_config))
        require_backend(cfg.metrics_log)  # a missing fedpgen[tracking] fails here, before anything runs
        ensure_log_handler()  # the progress lines reach Flower's log stream
        strategy = (run_under_flwr if isinstance(grid, InMemoryGrid) else run_server)(grid, context, cfg)
        if strategy.stopped or strategy.refused_rounds:
            raise RuntimeError(f"the run ended short of its plan: {strategy.stopped or ''} "
                               f"refused rounds {strategy.refused_rounds}")

    return app


app = build_app()
