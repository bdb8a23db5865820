"""Issue 12, finding 4: budgets cannot be overspent by two writers, and a crash is charged honestly.

Two runs on one run folder: the second stops at once. A crash after the devices spent a
round: the retry is charged and recorded as a retry, the run says it ended short because
budgets ran out, and the CLI exits non-zero. Every device's ε is recomputed from its ledger.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.compat.common import recorddict_compat as compat
from typer.testing import CliRunner

from fedpgen.client.device import Device
from conftest import TINY
from fedpgen.cli import cli
from fedpgen.simulate import RunFailedError, simulate
from fedpgen.shared.locking import LOCK_FILE, FolderLockedError, exclusive
from fedpgen.shared.population import ensure_population
from fedpgen.shared.privacy.accounting import epsilon
from fedpgen.shared.privacy.ledger import PrivacyLedger

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mod below runs in Ray workers


def recomputed(ledger: PrivacyLedger, *, delta: float, accountant: str) -> float:
    """ε from the ledger's own events only: (σ, q, steps) of each private event, one accountant."""
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.events() if e.private]
    return epsilon(history, delta=delta, accountant=accountant)


def test_finding4_a_device_state_dir_has_one_writer(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(local_steps=1, personal_max_steps=0)
    d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=tmp_path / "state")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from shared.locking import exclusive\n"
                               f"with exclusive({str(tmp_path / 'state')!r}, what='x'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match="device state-dir .* is in use by pid"):
            d.fit(d.init_send, server_round=1)
        assert d.ledger.events() == []  # nothing charged, nothing written
    finally:
        holder.kill()
        holder.wait()
    d.fit(d.init_send, server_round=1)  # the lock died with its holder: no stale lock
    assert len(d.ledger.events()) == 1


def test_the_folder_lock_is_reentrant_in_one_process_only(tmp_path: Path) -> None:
    with exclusive(tmp_path, what="run folder"), exclusive(tmp_path, what="run folder"):
        assert (tmp_path / LOCK_FILE).read_text() == f"pid {os.getpid()}"


def cli_args(run_dir: Path, **extra: object) -> list[str]:
    values = {**TINY, "secure-aggregation": False, "min-fit-clients": 3, **extra}
    return ["simulate", "--run-dir", str(run_dir), *(a for k, v in values.items() for a in ("--set", f"{k}={v}"))]


@pytest.mark.slow
def test_finding4_a_second_run_on_one_run_folder_stops_at_once(make_cfg, tmp_path: Path) -> None:
    # Prepare: a first run in its own process
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", "from fedpgen.cli import main; main()", *cli_args(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not ((run_dir / LOCK_FILE).is_file() and (run_dir / LOCK_FILE).read_text().startswith("pid")):
        assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
        time.sleep(0.2)
    # Execute: a second run on the same folder, while the first trains
    started = time.monotonic()
    second = CliRunner().invoke(cli, cli_args(run_dir))
    waited = time.monotonic() - started
    out, _ = first.communicate(timeout=600)
    # Assert: the second stopped at once with a clear message; the first finished untouched
    assert isinstance(second.exception, FolderLockedError) and "run folder" in str(second.exception)
    assert f"pid {first.pid}" in str(second.exception) and waited < 10
    assert first.returncode == 0, out[-3000:]
    cfg = make_cfg(run_dir=str(run_dir), secure_aggregation=False)
    devices = sorted(p for p in (run_dir / "devices").iterdir() if p.is_dir())
    assert len(devices) == 3
    for state in devices:  # every ledger consistent: each event's ε is the ledger's own recomputation
        ledger = PrivacyLedger(state)
        events = ledger.events()
        assert [e.round for e in events] == [1, 2]
        assert events[-1].epsilon == pytest.approx(recomputed(ledger, delta=cfg.dp_delta, accountant="prv"))
        assert events[-1].epsilon <= cfg.dp_epsilon * 1.0001


class CrashAfterTraining:
    """Every device trains (and is charged for) round ``at``, then its reply is lost: the round fails."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out = call_next(msg, ctxt)
        if msg.metadata.message_type == "train":
            if int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["server-round"]) == self.at:
                raise ConnectionError("reply lost after training (the crash under test)")
        return out


@pytest.mark.slow
def test_finding4_a_retried_round_is_charged_as_a_retry_and_the_run_ends_short_loudly(make_cfg, tmp_path: Path,
                                                                                        ) -> None:
    # Prepare: 3 planned rounds, σ planned for exactly 3 rounds at ε = 8; round 2 crashes after training
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir=str(run_dir), secure_aggregation=False, min_fit_clients=3, num_server_rounds=3,
                   personal_max_steps=0)
    with pytest.raises(RunFailedError, match="RoundFailedError"):  # the ServerApp's error, in the run's log
        simulate(cfg, client_mods=([CrashAfterTraining(2)], []))
    # Execute: resume (from the checkpoint of round 1) through the CLI
    result = CliRunner().invoke(cli, cli_args(run_dir, **{"num-server-rounds": 3, "personal-max-steps": 0}))
    # Assert: exit code 3, the summary says training stopped early because budgets ran out, and names the retry
    assert result.exit_code == 3, result.output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final-round"] == 2 and summary["planned-rounds"] == 3
    assert "stopped early" in summary["ended-short"] and "budget" in summary["ended-short"]
    assert any("run again after an interruption" in line for line in summary["privacy"])
    for state in sorted(p for p in (run_dir / "devices").iterdir() if p.is_dir()):
        ledger = PrivacyLedger(state)
        events = ledger.events()
        assert [(e.round, e.attempt) for e in events] == [(1, 1), (2, 1), (2, 2)]  # the retry, charged
        eps = recomputed(ledger, delta=cfg.dp_delta, accountant="prv")
        assert events[-1].epsilon == pytest.approx(eps) and eps <= cfg.dp_epsilon * 1.0001
        assert recomputed(ledger, delta=cfg.dp_delta, accountant="rdp") >= eps  # RDP: an upper bound
