"""Flower's supported way to run a simulation, for ``fedpgen simulate``: a SuperLink of its own and ``flwr run``.

Flower 1.42 deprecates the in-process ``flwr.simulation.run_simulation``; what it supports is a
SuperLink in simulation mode and Flower's CLI. ``fedpgen simulate`` does just that, one private
SuperLink per run (docs/flwr-run.md):

1. ``flower-superlink --simulation`` on a free loopback port, in-memory state, runtime dependency
   installation off (the simulation runs in the environment FedPGen is installed in), started in
   the user's working folder (relative ``run-dir`` and ``data-dir`` resolve there) in a process
   group of its own;
2. Flower's CLI submits the app, ``flwr run APP fedpgen --run-config FILE --federation-config ...
   --stream``, with a Flower home (``FLWR_HOME``) whose one connection is that SuperLink; each
   line of the run's log goes to a callback and to ``<run-dir>/flower.log``;
3. ``flwr ls fedpgen --run-id ID --format json`` says how the run ended;
4. the SuperLink is stopped (its process group), and so is every process it started in a
   session of its own (Flower's SuperExec, the simulation process: ServerApp, Simulation
   Engine, Ray): after a completed run they have ended; after Ctrl-C or SIGTERM, which stop
   the run first, they would otherwise train on (the simulation process has no parent monitor).

The app Flower packs (its FAB) is the project's ``pyproject.toml`` alone: the ServerApp and
ClientApp components it names are imported from the installed ``fedpgen``, the code this process
runs, so the simulation runs what was installed and never a copy of the working tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

from fedpgen.deploy import CONNECTION, cli_value, flower_exe, flwr_home, run_status
from fedpgen.shared.config import PYPROJECT

STARTUP_TIMEOUT = 60.0
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class SuperLinkError(RuntimeError):
    """The SuperLink did not start, or Flower's CLI did not accept the run."""


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """How a run ended, as the SuperLink reports it (``flwr ls``)."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "finished:stopped"
    log: Path  # the run's whole log stream

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class SuperLink:
    """A running private SuperLink: the environment for Flower's CLI to reach it, and its process."""

    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def run(self, app: Path, run_config: Path, federation: Mapping[str, Any], *, cwd: Path, log_file: Path,
            on_line: Callable[[str], None]) -> RunOutcome:
        """``flwr run --stream`` until the run ends; every log line to ``on_line`` and ``log_file``."""
        cmd = [flower_exe("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
        for key, value in federation.items():
            cmd += ["--federation-config", f"{key}={cli_value(value)}"]
        log_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = None
        with open(log_file, "w", encoding="utf-8") as out, \
                subprocess.Popen(cmd, env=self.env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace") as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    out.write(line)
                    out.flush()
                    if run_id is None and (m := _RUN_ID.search(line)):
                        run_id = int(m.group(1))
                    on_line(line.rstrip("\n"))
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (``superlink`` turns it into this)
                if run_id is not None:  # stop the run, not only the stream
                    subprocess.run([flower_exe("flwr"), "stop", str(run_id), CONNECTION], env=self.env,
                                   capture_output=True, timeout=60, check=False)
                proc.terminate()  # a SIGTERM reached this process alone: the stream would go on
                raise
        if run_id is None:
            raise SuperLinkError(f"Flower did not start the run: {log_file.read_text()[-2000:]}")
        return RunOutcome(run_id=run_id, status=self._final_status(run_id), log=log_file)

    def _final_status(self, run_id: int, timeout: float = 60.0) -> str:
        """The stream ends with the run's log; its final status follows within moments."""
        deadline = time.monotonic() + timeout
        while not (status := run_status(run_id, env=self.env)).startswith("finished") and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        return status


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def superlink(*, cwd: Path, env: Mapping[str, str] | None = None) -> Iterator[SuperLink]:
    """A SuperLink in simulation mode for the block, then stopped (module docstring, step 4)."""
    home = Path(tempfile.mkdtemp(prefix="fedpgen-flwr-"))
    port = free_port()
    full_env = {**flwr_home(home, superlink=f"127.0.0.1:{port}", ca=None, insecure=True), **(env or {})}
    log = home / "superlink.log"
    cmd = [flower_exe("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
           "--health-server-address", f"127.0.0.1:{free_port()}", "--log-file", str(log)]
    process = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own process group: stopped as one
    try:
        with sigterm_interrupts():
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not _healthy(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise SuperLinkError(f"flower-superlink did not start (exit {process.poll()}): {text}")
                time.sleep(0.2)
            yield SuperLink(env=full_env, process=process)
    finally:
        _stop_tree(process)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a batch scheduler, ``timeout``, ``kill``) ends the block as Ctrl-C does: the run
    is stopped and everything it started ends with it (``_stop_tree``). Python's default would
    end this process alone and leave the federation training. Main thread only (where Python
    delivers signals); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_tree(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop the SuperLink's process group and every process it started in a session of its own
    (Flower's SuperExec, the simulation, Ray's processes and workers): after a completed run
    they have ended; after an interrupted one they would train on. SIGTERM, then SIGKILL."""
    try:
        started = psutil.Process(process.pid).children(recursive=True)  # before any of them ends
    except psutil.NoSuchProcess:
        started = []
    for p in started:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _stop_group(process, timeout=timeout)
    _, left = psutil.wait_procs(started, timeout=timeout)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)


def _stop_group(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM to the SuperLink's process group, then SIGKILL. Flower's SuperExec and the
    simulation run in sessions of their own, outside this group: ``_stop_tree`` ends them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process.poll()  # reap the SuperLink itself
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@contextlib.contextmanager
def app_folder() -> Iterator[Path]:
    """A folder holding the project's ``pyproject.toml`` alone: the app Flower packs."""
    with tempfile.TemporaryDirectory(prefix="fedpgen-app-") as folder:
        shutil.copyfile(PYPROJECT, Path(folder) / "pyproject.toml")
        yield Path(folder)
