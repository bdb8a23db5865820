"""FedPGen ServerApp: parse the run config, run the federation. Logic lives in server/federation.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.server import Grid
from flwr.serverapp import ServerApp

from server.federation import run_server
from shared.config import RunConfig


def build_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` (TOML keys) win over Flower's run config (used by ``fedpgen``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **dict(overrides or {})})
        run_server(grid, context, cfg)

    return app


app = build_app()
