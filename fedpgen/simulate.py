"""``fedpgen simulate``: one machine, many virtual devices, Flower's Simulation Engine (Ray)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod
from rich.console import Console

from fedpgen.client.app import build_app as build_client_app
from fedpgen.server import standalone
from fedpgen.server.app import build_app as build_server_app
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import exclusive
from fedpgen.simulation_engine import population_independent_poll

log = logging.getLogger(__name__)

def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower's Ray backend: each virtual device's CPU and GPU share; Ray started here, or an
    existing cluster joined (``ray-address``; docs/scale.md)."""
    resources = {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}
    if cfg.client_gpus > 0 and not cfg.ray_address:
        import torch

        if not torch.cuda.is_available():  # Flower would fail with an empty actor pool, then hang
            raise ValueError(f"config 'client-gpus': {cfg.client_gpus} but this machine has no GPU that torch can "
                             "use: set client-gpus = 0 (CPU), or run on a Ray cluster with GPUs (ray-address)")
    if cfg.ray_address:  # a running cluster brings its own resources: ray.init refuses num_cpus with an address
        return {"client_resources": resources, "init_args": {"address": cfg.ray_address}}
    return {"client_resources": resources, "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}


def simulate(cfg: RunConfig, *, fresh: bool = False, console: Console | None = None,
             client_mods: tuple[list[Mod], list[Mod]] = ([], [])) -> dict[str, Any]:
    """Run a whole simulation and return its summary (also in ``<run-dir>/summary.json``).

    ``client_mods``: (outer, inner) mods around the SecAgg+ mod of every device (tests only).
    """
    console = console or Console()
    with exclusive(Path(cfg.run_dir), what="run folder"):  # a second run on this folder stops here, at once
        cfg, users = standalone.prepare(cfg, fresh=fresh, say=console.print)
        overrides = cfg.to_toml_dict()
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray FutureWarning
        with warnings.catch_warnings(), population_independent_poll():
            warnings.simplefilter("ignore", DeprecationWarning)
            from flwr.simulation import run_simulation

            client_app = build_client_app(overrides, mods=client_mods[0], inner_mods=client_mods[1])
            run_simulation(server_app=build_server_app(overrides, fail_short=False, standalone=False),
                           client_app=client_app, num_supernodes=len(users), backend_config=backend_config(cfg))
        return standalone.finish(cfg, users, console=console)
