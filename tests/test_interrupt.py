"""A careless operator (or a batch scheduler, or ``timeout``) ends ``fedpgen simulate`` with
SIGTERM in the middle of a run: every process the run started must end with it. Before, the
launcher died alone and left its SuperLink, Flower's SuperExec, the simulation and Ray's
workers training on, writing into the run folder (docs/flwr-run.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from conftest import TINY

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _tree_when_training(launcher: subprocess.Popen[bytes], timeout: float = 300.0) -> list[psutil.Process]:
    """The launcher's process tree once a Ray worker runs a ClientApp (the devices are training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        tree = psutil.Process(launcher.pid).children(recursive=True)
        names = []
        for p in tree:
            try:
                names.append(" ".join(p.cmdline()))
            except psutil.Error:
                continue
        if any("ClientAppActor" in n for n in names):
            return tree
        time.sleep(0.5)
    raise AssertionError(f"no device started training (exit {launcher.poll()})")


def test_sigterm_ends_the_whole_run_not_only_the_launcher(tmp_path: Path) -> None:
    # Prepare: a run long enough to be interrupted while its devices train
    config = tmp_path / "run.toml"
    values = {**TINY, "num-server-rounds": 50, "run-dir": str(tmp_path / "run")}
    config.write_text(tomli_w.dumps(values))
    launcher = subprocess.Popen([str(BIN / "fedpgen"), "simulate", "--config", str(config)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        tree = _tree_when_training(launcher)
        # Execute
        os.kill(launcher.pid, signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
        _, left = psutil.wait_procs(tree, timeout=30)
        # Assert: the launcher says it stopped and how to resume, exits 130; nothing it started runs on
        said = out.decode(errors="replace")
        assert launcher.returncode == 130 and "interrupted" in said and "resumes" in said, said[-2000:]
        assert not left, f"left running: {[' '.join(p.cmdline())[:80] for p in left if p.is_running()]}"
    finally:  # whatever the old code left: orphans are no longer this process's children
        for p in [*tree, *psutil.Process(os.getpid()).children(recursive=True)]:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_sigterm_while_preparing_ends_the_preparing_process_too(tmp_path: Path) -> None:
    # Prepare: a run whose base pre-training (in a spawned process, before any SuperLink) takes long
    config = tmp_path / "run.toml"
    config.write_text(tomli_w.dumps({**TINY, "pretrain-steps": 100_000, "run-dir": str(tmp_path / "run")}))
    launcher = subprocess.Popen([str(BIN / "fedpgen"), "simulate", "--config", str(config)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not children and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.5)
            children = psutil.Process(launcher.pid).children(recursive=True)
        assert children, f"no preparing process started (exit {launcher.poll()})"
        time.sleep(3)  # into the pre-training
        # Execute
        os.kill(launcher.pid, signal.SIGTERM)
        out, _ = launcher.communicate(timeout=60)
        _, left = psutil.wait_procs(children, timeout=30)
        # Assert: the launcher says it stopped, exits 130; the pre-training does not go on without it
        said = out.decode(errors="replace")
        assert launcher.returncode == 130 and "interrupted" in said, said[-2000:]
        assert not left, f"left running: {[' '.join(p.cmdline())[:80] for p in left if p.is_running()]}"
    finally:
        for p in [*children, *psutil.Process(os.getpid()).children(recursive=True)]:
            try:
                p.kill()
            except psutil.Error:
                pass
