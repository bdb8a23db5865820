"""FedPGen ServerApp: parse the run config, run the federation. Logic lives in server/federation.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.server import Grid
from flwr.serverapp import ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedpgen.server.federation import run_server
from fedpgen.server.metrics_log import require_backend
from fedpgen.server.progress import ensure_log_handler
from fedpgen.server.standalone import run_under_flwr
from fedpgen.shared.config import RunConfig


def build_app(overrides: Mapping[str, Any] | None = None, *, fail_short: bool = True,
              standalone: bool = True) -> ServerApp:
    """A ServerApp; ``overrides`` (TOML keys) win over Flower's run config (used by ``fedpgen``).

    ``fail_short``: a run that ends before its planned rounds (budgets spent) or refused an
    out-of-bounds round fails (``fedpgen simulate`` reports it itself, after the summary).
    ``standalone``: in Flower's Simulation Engine, prepare and finish the run here (``flwr run .``;
    ``fedpgen simulate`` does both itself, around the engine)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        require_backend(cfg.metrics_log)  # a missing fedpgen[tracking] fails here, before anything runs
        ensure_log_handler()  # under `flwr run`: the progress lines reach Flower's log stream
        simulated = standalone and isinstance(grid, InMemoryGrid)
        strategy = (run_under_flwr if simulated else run_server)(grid, context, cfg)
        if fail_short and (strategy.stopped or strategy.refused_rounds):
            raise RuntimeError(f"the run ended short of its plan: {strategy.stopped or ''} "
                               f"refused rounds {strategy.refused_rounds}")

    return app


app = build_app()
