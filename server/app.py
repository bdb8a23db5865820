"""FedPGen ServerApp: parse the run config, run the federation. Logic lives in server/federation.py."""

from __future__ import annotations

import sys

if "flwr.server.superlink.fleet.vce.vce_api" in sys.modules:  # Flower's Simulation Engine is loading this app:
    # first, before the engine (started right after this module's thread) registers its virtual
    # nodes; fedpgen/simulation_engine.py says why and what happens if it is too late
    from fedpgen.simulation_engine import install_shared_run_config

    install_shared_run_config()

from flwr.app import Context  # noqa: E402 (after the registry is installed: these imports take time)
from flwr.server import Grid  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # noqa: E402

from fedpgen.server.federation import run_server  # noqa: E402
from fedpgen.server.metrics_log import require_backend  # noqa: E402
from fedpgen.server.progress import ensure_log_handler  # noqa: E402
from fedpgen.server.standalone import run_under_flwr  # noqa: E402
from fedpgen.shared.config import RunConfig  # noqa: E402


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
