"""``fedpgen simulate``: one machine, many virtual devices, Flower's Simulation Engine (Ray).

It runs the app the way Flower supports (a SuperLink in simulation mode and ``flwr run``;
``fedpgen/superlink.py``), so both launchers share one code path: this process builds the
population, pre-trains the base and starts the run folder over or resumes it (with progress on
the terminal, and errors before anything starts), then Flower's simulation process runs the
ServerApp, which prepares and finishes the run as under ``flwr run .`` (``server/standalone.py``).
This process draws the live display from the ServerApp's progress events, prints the results
table and exits non-zero when the run failed (docs/flwr-run.md).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from rich.console import Console

from fedpgen.server.progress import EVENTS_FILE, replay
from fedpgen.server.summary import render_summary
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import SHARE_ENV, exclusive
from fedpgen.superlink import RunOutcome, app_folder, sigterm_interrupts, superlink

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod

LOG_FILE = "flower.log"  # the run's whole log stream, in the run folder
_LEVEL = re.compile(r"^(?:\x1b\[[0-9;]*m)?(WARNING|ERROR|CRITICAL)\b")  # the simulation process's own warnings
_NOT_FOR_US = ("Since flwr 1.32, default simulated SuperNodes",)  # this launcher always sets the number


class RunFailedError(RuntimeError):
    """Flower reports that the run failed; the message holds its reason and the log's last lines."""


def federation_config(cfg: RunConfig, users: int) -> dict[str, Any]:
    """Flower's federation config for the run: one virtual SuperNode per user; each one's CPU and
    GPU share; Ray started on this machine's CPUs, or an existing cluster joined (``ray-address``,
    then given to Ray as ``RAY_ADDRESS``: the cluster brings its own resources)."""
    if cfg.client_gpus > 0 and not cfg.ray_address:
        import torch

        if not torch.cuda.is_available():  # Flower would fail with an empty actor pool, then hang
            raise ValueError(f"config 'client-gpus': {cfg.client_gpus} but this machine has no GPU that torch can "
                             "use: set client-gpus = 0 (CPU), or run on a Ray cluster with GPUs (ray-address)")
    config: dict[str, Any] = {"num-supernodes": users, "client-resources-num-cpus": int(cfg.client_cpus),
                              "client-resources-num-gpus": float(cfg.client_gpus)}
    if not cfg.ray_address:
        config["init-args-num-cpus"] = os.cpu_count() or 1
    return config


def simulation_env(cfg: RunConfig, mods_file: Path | None) -> dict[str, str]:
    """What the SuperLink and the simulation it starts need in their environment."""
    env = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # silence a Ray FutureWarning
    if cfg.ray_address:
        env["RAY_ADDRESS"] = cfg.ray_address
    if mods_file is not None:  # the mods' classes are imported by reference there: this process's path
        from fedpgen.client.app import SIMULATION_MODS_ENV  # tests only: torch is loaded already

        env[SIMULATION_MODS_ENV] = str(mods_file)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _prepare_in_child(cfg: dict[str, Any], fresh: bool, share: str, conn: Connection) -> None:
    """Runs in a spawned process: ``standalone.prepare``, its lines and its outcome sent over ``conn``."""
    os.environ[SHARE_ENV] = share  # the run folder's lock, shared with this process too
    try:
        from fedpgen.server import standalone

        prepared, users = standalone.prepare(RunConfig.from_mapping(cfg), fresh=fresh,
                                             say=lambda text: conn.send(("say", text)))
        conn.send(("done", prepared.to_toml_dict(), [str(u) for u in users]))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the launcher, which raises it
        try:
            conn.send(("error", exc))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()


def prepare(cfg: RunConfig, *, fresh: bool, share: str, say: Callable[[str], None]) -> tuple[RunConfig, list[Path]]:
    """``standalone.prepare`` (population, pre-trained base, run folder): here when torch is
    loaded in this process already (tests, a notebook), else in a spawned process that ends
    before the run starts, so this launcher waits through the run without torch and the base
    model in memory (about 470 MiB of the process tree's peak, docs/scale.md)."""
    if "torch" in sys.modules:
        from fedpgen.server import standalone

        return standalone.prepare(cfg, fresh=fresh, say=say)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=False)
    child = context.Process(target=_prepare_in_child, args=(cfg.to_toml_dict(), fresh, share, theirs),
                            name="fedpgen-prepare")
    child.start()
    theirs.close()
    try:
        with sigterm_interrupts():  # SIGTERM here would end this launcher alone, the child preparing on
            return _replies(ours, child, say)
    finally:
        if child.is_alive():  # interrupted: the child is not left writing into a folder no lock guards
            child.terminate()
        child.join()


def _replies(ours: Connection, child: Any, say: Callable[[str], None]) -> tuple[RunConfig, list[Path]]:
    """The preparing child's lines (to ``say``) until its outcome: raised, or returned."""
    while True:
        try:
            message = ours.recv()
        except EOFError:
            child.join()
            raise RuntimeError(f"preparing the run failed: its process ended with exit code {child.exitcode} "
                               "and no reply") from None
        if message[0] == "say":
            say(message[1])
        elif message[0] == "error":
            raise message[1]
        else:
            return RunConfig.from_mapping(message[1]), [Path(u) for u in message[2]]


def simulate(cfg: RunConfig, *, fresh: bool = False, console: Console | None = None,
             client_mods: tuple[list[Mod], list[Mod]] = ([], []), verbose: bool = False) -> dict[str, Any]:
    """Run a whole simulation and return its summary (also in ``<run-dir>/summary.json``).

    ``client_mods``: (outer, inner) mods around the SecAgg+ mod of every device (tests only).
    ``verbose``: every line of the run's log on the terminal (always in ``<run-dir>/flower.log``).
    Raises :class:`RunFailedError` when Flower reports that the run failed.
    """
    console = console or Console()
    run_dir = Path(cfg.run_dir)
    share = secrets.token_hex(16)  # the ServerApp, in Flower's simulation process, may use the folder too
    with exclusive(run_dir, what="run folder", share_with=share), \
            tempfile.TemporaryDirectory(prefix="fedpgen-run-") as tmp, app_folder() as app:
        cfg, users = prepare(cfg, fresh=fresh, share=share, say=console.print)  # a second run stops at once, above
        federation = federation_config(cfg, len(users))
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(cfg.to_toml_dict()))
        mods_file = None
        if any(client_mods):
            mods_file = Path(tmp) / "client-mods.pkl"
            from ray import cloudpickle

            mods_file.write_bytes(cloudpickle.dumps(tuple(client_mods)))
        tail: deque[str] = deque(maxlen=60)

        def on_line(line: str) -> None:
            tail.append(line)
            if verbose or (_LEVEL.match(line) and not any(text in line for text in _NOT_FOR_US)):
                console.print(line, markup=False, highlight=False)

        for stale in (EVENTS_FILE, "summary.json"):  # only this run's: a failed run must not show the last one's
            (run_dir / stale).unlink(missing_ok=True)
        stop = threading.Event()
        display = threading.Thread(target=replay, args=(run_dir / EVENTS_FILE, stop), name="fedpgen-progress",
                                   daemon=True)
        with superlink(cwd=Path.cwd(), env={**simulation_env(cfg, mods_file), SHARE_ENV: share}) as link:
            display.start()
            try:
                outcome = link.run(app, run_config, federation, cwd=Path.cwd(),
                                   log_file=run_dir / LOG_FILE, on_line=on_line)
            finally:
                stop.set()
                display.join()
    return _result(outcome, run_dir, users, tail, console)


def _result(outcome: RunOutcome, run_dir: Path, users: list[Path], tail: deque[str],
            console: Console) -> dict[str, Any]:
    """The summary of a run that finished, also one that ended short of its plan (the ServerApp then
    fails the run after writing the summary, which says why); a run without one failed."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        lines = "\n".join(tail)
        raise RunFailedError(f"run {outcome.run_id} {outcome.status}; its whole log: {outcome.log}\n{lines}")
    summary = json.loads(summary_file.read_text())
    summary["epsilon-by-client"] = {int(k): v for k, v in summary["epsilon-by-client"].items()}  # JSON keys
    render_summary(run_dir, summary, names={i: u.name for i, u in enumerate(users)}, console=console)
    console.print(f"report: {run_dir / 'report.html'}", highlight=False)
    return summary
