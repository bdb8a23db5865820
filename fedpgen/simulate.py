"""``fedpgen simulate``: one machine, many virtual devices, Flower's Simulation Engine (Ray)."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod
from rich.console import Console

from fedpgen.client.app import build_app as build_client_app
from fedpgen.client.evaluation import REPORT
from fedpgen.simulation_engine import population_independent_poll
from fedpgen.shared.wire_transcript import RUN_TRANSCRIPT_DIR
from fedpgen.server.app import build_app as build_server_app
from fedpgen.server.plots import plot_run
from fedpgen.server.summary import print_summary
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import exclusive
from fedpgen.shared.population import ensure_population, state_dir
from fedpgen.shared.store import DeviceStore
from fedpgen.shared.tasks import get_task

log = logging.getLogger(__name__)

_RESULT_FILES = ("rounds.jsonl", "client_rounds.jsonl", "clients.csv", "summary.json")


def prepare_run_dir(cfg: RunConfig, *, fresh: bool) -> bool:
    """Start over (``fresh``) or resume; returns whether a checkpoint will be resumed."""
    run_dir = Path(cfg.run_dir)
    if fresh:
        for sub in ("checkpoints", "devices"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    resuming = any((run_dir / "checkpoints").glob("round_*.safetensors"))
    if not resuming:
        shutil.rmtree(run_dir / "devices", ignore_errors=True)
        shutil.rmtree(run_dir / RUN_TRANSCRIPT_DIR, ignore_errors=True)  # a fresh run, a fresh transcript
        for name in _RESULT_FILES:
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / "clients.csv").unlink(missing_ok=True)
    return resuming


def collect_reports(cfg: RunConfig, users: list[Path]) -> list[Path]:
    """Copy each simulated device's sealed report (e.g. sample grids) into ``<run-dir>/reports``.

    Simulation only: here one machine holds every device's key. A real device keeps it sealed."""
    written = []
    for user in users:
        state = state_dir(cfg, user)
        if (state / f"{REPORT}.sealed").is_file():
            dest = Path(cfg.run_dir) / "reports" / f"{user.name}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(DeviceStore(state).read(REPORT) or b"")
            written.append(dest)
    return written


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
        users = ensure_population(cfg)
        console.print(f"[bold]{len(users)} users[/] ({cfg.data}) task={cfg.task} preset={cfg.preset} "
                      f"rounds={cfg.num_server_rounds} run-dir={cfg.run_dir}")
        base = get_task(cfg.task).base_model_path(cfg)  # pre-train and cache once, before any device starts
        console.print(f"base model: {base}")
        if prepare_run_dir(cfg, fresh=fresh):
            console.print("resuming from the newest checkpoint in the run dir (use --fresh to start over)")
        overrides = cfg.to_toml_dict()
        if not cfg.min_available_clients:  # round 1 samples from the whole population, not the first to register
            overrides["min-available-clients"] = len(users)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a Ray FutureWarning
        with warnings.catch_warnings(), population_independent_poll():
            warnings.simplefilter("ignore", DeprecationWarning)
            from flwr.simulation import run_simulation

            client_app = build_client_app(overrides, mods=client_mods[0], inner_mods=client_mods[1])
            run_simulation(server_app=build_server_app(overrides, fail_short=False), client_app=client_app,
                           num_supernodes=len(users), backend_config=backend_config(cfg))
        plot_run(Path(cfg.run_dir))
        collect_reports(cfg, users)
        return print_summary(Path(cfg.run_dir), names={i: u.name for i, u in enumerate(users)}, console=console)
