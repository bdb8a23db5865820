"""Flower's own CLI is a tested path: ``flwr run .`` with the smoke configuration, on a Flower home
with nothing run before, no runtime dependency installation, the population built by the app
itself and the run folder where the user ran the command (docs/flwr-run.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from ray import cloudpickle

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# What `fedpgen simulate --config simulations/smoke.toml` writes into its run folder (README).
SIMULATE_WRITES = {"config.json", "rounds.jsonl", "client_rounds.jsonl", "clients.csv", "summary.json",
                   "rounds.png", "personalization.png", "privacy.png", "checkpoints", "users", "devices"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that ``flwr run`` started for this Flower home (it logs there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and any(b"flower-superlink" in c for c in cmd) and \
                any(str(flwr_home).encode() in c for c in cmd):
            found.append(int(proc.name))
    return found


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A Flower home with nothing in it, its own local-SuperLink ports, runtime installs off."""
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    yield env
    for pid in _superlinks_of(home):  # `flwr run` leaves its local SuperLink running: stop what we started
        try:
            os.killpg(pid, signal.SIGTERM)  # started detached: its own process group (simulation included)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    while _superlinks_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _superlinks_of(home), "the local SuperLink did not stop"


def _smoke(tmp_path: Path, env: dict[str, str], *, supernodes: int) -> tuple[Path, str, subprocess.CompletedProcess[str]]:
    """``flwr run <app> --run-config simulations/smoke.toml --stream`` from a working folder that is
    not the project (relative paths resolve there), then the documented check ``fedpgen summary``.
    Returns the working folder, flwr run's output and the check's result."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "--run-config", str(ROOT / "simulations" / "smoke.toml"),
                           "--federation-config", f"num-supernodes={supernodes}", "--stream"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]  # Flower's CLI: 0 once the run started
    check = subprocess.run([str(BIN / "fedpgen"), "summary", "runs/smoke"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    return work, proc.stdout + proc.stderr, check


def test_flwr_run_smoke_writes_the_run_folder_where_the_user_ran_it(tmp_path: Path,
                                                                    flower_env: dict[str, str]) -> None:
    # Execute
    work, out, check = _smoke(tmp_path, flower_env, supernodes=4)
    # Assert: the run folder of `fedpgen simulate`, in the user's folder, the run complete
    run_dir = work / "runs" / "smoke"
    assert SIMULATE_WRITES <= {p.name for p in run_dir.iterdir()}, out[-3000:]
    assert sorted(p.name for p in (run_dir / "users").iterdir() if p.is_dir()) == \
        [f"synthetic-{i:04d}" for i in range(4)], "the app did not build the smoke population"
    assert [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(summary["epsilon-by-client"]) == 4 and max(summary["epsilon-by-client"].values()) <= 8.0
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Installing application dependencies" not in out
    assert not (Path(flower_env["FLWR_HOME"]) / "runtime-envs").exists(), "a runtime environment was created"
    assert "DEPRECATED" not in out


def test_a_failed_flwr_run_says_why_and_the_check_exits_non_zero(tmp_path: Path,
                                                                 flower_env: dict[str, str]) -> None:
    # Execute: more users than virtual SuperNodes (one SuperNode per user)
    work, out, check = _smoke(tmp_path, flower_env, supernodes=3)
    # Assert: the log says what to set; no summary; the documented check fails
    assert "num-supernodes=4" in out, out[-3000:]
    assert not (work / "runs" / "smoke" / "summary.json").exists()
    assert check.returncode != 0 and "no per-client results" in check.stdout + check.stderr


class DropAtShareKeys:
    """Every device disappears when asked to share its keys: SecAgg+ cannot finish, the run fails."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if configs is not None and configs.get(Key.STAGE) == Stage.SHARE_KEYS:
            raise ConnectionError("dropped")
        return call_next(msg, ctxt)


def _superlink_pids() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"flower-superlink" in (proc / "cmdline").read_bytes():
                found.add(int(proc.name))
        except OSError:
            continue
    return found


def test_fedpgen_simulate_runs_through_flwr_run_and_a_failed_run_exits_non_zero(tmp_path: Path) -> None:
    # Prepare: the smoke run, every device made to drop out of SecAgg+ (the simulation hook for tests)
    mods = tmp_path / "mods.pkl"
    mods.write_bytes(cloudpickle.dumps(([DropAtShareKeys()], [])))
    env = {**os.environ, "FEDPGEN_SIMULATION_CLIENT_MODS": str(mods),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    before = _superlink_pids()
    # Execute
    proc = subprocess.run([str(BIN / "fedpgen"), "simulate", "--config", str(ROOT / "simulations" / "smoke.toml"),
                           "--run-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    # Assert: a non-zero exit that says why and where the whole log is; Flower's supported path
    # (no deprecation notice), its SuperLink stopped
    assert proc.returncode == 2, out[-3000:]
    assert "finished:failed" in out and "secure aggregation halted" in out and "flower.log" in out
    log = (tmp_path / "run" / "flower.log").read_text()
    assert "Successfully started run" in log and "secure aggregation halted" in log
    assert "DEPRECATED" not in out + log
    assert not (tmp_path / "run" / "summary.json").exists()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors")), "a halted round kept no base"
    assert _superlink_pids() <= before, "the run's SuperLink was left running"
