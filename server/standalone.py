"""One simulation, started either by ``fedpgen simulate`` or by Flower's own CLI (``flwr run .``).

Both paths prepare the run the same way before any device trains — the built-in population,
the pre-trained base, the run folder (resume or start over) — and finish it the same way: plots,
the image task's sample grids, the summary, plots and report. ``fedpgen simulate`` calls these before and after
Flower's Simulation Engine; under ``flwr run`` the ServerApp calls them itself (the population is
then built by the app, in the folder the run config names, relative to where Flower runs it).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import shutil
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.server import Grid
from rich.console import Console
from rich.text import Text

from fedpgen.client.evaluation import REPORT
from fedpgen.server.federation import run_server
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.server.summary import print_summary
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import exclusive
from fedpgen.shared.population import ensure_population, state_dir
from fedpgen.shared.store import DeviceStore
from fedpgen.shared.tasks import get_task
from fedpgen.shared.wire_transcript import RUN_TRANSCRIPT_DIR

log = logging.getLogger(__name__)

RESULT_FILES = ("rounds.jsonl", "client_rounds.jsonl", "clients.csv", "summary.json")


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
        for name in RESULT_FILES:
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / "clients.csv").unlink(missing_ok=True)
    return resuming


def prepare(cfg: RunConfig, *, fresh: bool, say: Callable[[str], None]) -> tuple[RunConfig, list[Path]]:
    """Population, base model and run folder, before any device starts. Returns the config a
    simulation runs with (``min-available-clients`` 0 = the whole population) and the users."""
    users = ensure_population(cfg)
    say(f"[bold]{len(users)} users[/] ({cfg.data}) task={cfg.task} preset={cfg.preset} "
        f"rounds={cfg.num_server_rounds} run-dir={Path(cfg.run_dir).resolve()}")
    base = get_task(cfg.task).base_model_path(cfg)  # pre-train and cache once, before any device starts
    say(f"base model: {base}")
    if prepare_run_dir(cfg, fresh=fresh):
        say("resuming from the newest checkpoint in the run dir (use --fresh to start over)")
    if not cfg.min_available_clients:  # round 1 samples from the whole population, not the first to register
        cfg = dataclasses.replace(cfg, min_available_clients=len(users))
    return cfg, users


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


def finish(cfg: RunConfig, users: list[Path], *, console: Console) -> dict[str, Any]:
    """Sample grids, then the summary (``<run-dir>/summary.json``, printed as a table), the plots
    and ``report.html`` (server/summary.py)."""
    collect_reports(cfg, users)
    return print_summary(Path(cfg.run_dir), names={i: u.name for i, u in enumerate(users)}, console=console)


def check_virtual_nodes(node_ids: Callable[[], int], users: int, *, settle: float = 10.0,
                        poll: float = 0.5) -> None:
    """Under ``flwr run`` the number of virtual SuperNodes is Flower's federation config, not
    ours: each one is one user. Wait until as many are registered as there are users; fail
    with the flag to set when there are more, or when fewer stop arriving for ``settle`` s."""
    last, changed = -1, time.monotonic()
    while True:
        have = node_ids()
        if have > users:
            break
        if have == users:
            return
        if have != last:
            last, changed = have, time.monotonic()
        elif time.monotonic() - changed > settle:
            break
        time.sleep(poll)
    raise ValueError(f"the federation has {have} virtual SuperNodes but the population has {users} users "
                     f"(one SuperNode per user): run `flwr run . --federation-config num-supernodes={users}`")


def run_under_flwr(grid: Grid, context: Context, cfg: RunConfig) -> SharedDeltaStrategy:
    """The whole simulation when Flower's CLI started it (``flwr run .``): prepare as
    ``fedpgen simulate`` does, run the federation, finish the run folder. Output goes to Flower's
    log stream (``flwr run --stream`` / ``flwr log``)."""
    def say(text: str) -> None:
        flwr_log(INFO, "%s", Text.from_markup(text).plain)

    with exclusive(Path(cfg.run_dir), what="run folder"):  # a second run on this folder stops here, at once
        cfg, users = prepare(cfg, fresh=False, say=say)
        check_virtual_nodes(lambda: len(list(grid.get_node_ids())), len(users))
        strategy = run_server(grid, context, cfg)
        table = Console(record=True, file=io.StringIO(), width=120)
        finish(cfg, users, console=table)
        say(table.export_text())
    return strategy
