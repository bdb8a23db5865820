"""The live view: replies are counted as they arrive, with Flower's timeout semantics; the
log-line fallback says devices done/total, seconds and an ETA that is right."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from rich.console import Console

from fedpgen.server.progress import (
    ProgressGrid,
    RoundProgress,
    configure_logging,
    format_seconds,
    remaining_seconds,
    replay,
    run_eta,
    stage_name,
)


def message(node: int, *, group: str = "1", kind: str = "train", stage: str | None = None,
            reply_to: str = "", message_id: str = "", error: bool = False) -> Message:
    content = RecordDict()
    if stage is not None:
        content[RECORD_KEY_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    meta = Metadata(run_id=1, message_id=message_id, src_node_id=node if reply_to else 1,
                    dst_node_id=1 if reply_to else node, reply_to_message_id=reply_to, group_id=group,
                    created_at=time.time(), ttl=3600.0, message_type=kind)
    if error:
        return Message(error=Error(code=0, reason="device crashed"), metadata=meta)
    return Message(content=content, metadata=meta)


class FakeGrid:
    """A link on which node ``n`` answers at the ``answers[n]``-th pull (never if absent).
    ``pull_interval=None``: none, as Flower 1.42's gRPC grid (which sleeps 3 s between pulls)."""

    def __init__(self, answers: dict[int, int], failing: frozenset[int] = frozenset(), *,
                 pull_interval: float | None = 0.01) -> None:
        self.answers, self.failing = answers, failing
        if pull_interval is not None:
            self.pull_interval = pull_interval
        self.pulls: list[set[str]] = []
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = set(message_ids)
        self.pulls.append(ids)
        out = []
        for mid in sorted(ids):
            node = self.pending[mid].metadata.dst_node_id
            if self.answers.get(node) == len(self.pulls):
                out.append(message(node, reply_to=mid, error=node in self.failing))
        return out

    def get_node_ids(self) -> list[int]:
        return sorted(self.answers)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_arithmetic() -> None:
    assert remaining_seconds(0, 10, 5.0) is None
    assert remaining_seconds(2, 10, 4.0) == pytest.approx(16.0)  # 2 s per device, 8 left
    assert remaining_seconds(10, 10, 7.0) == 0.0
    assert run_eta([], 5, 0.0) is None
    assert run_eta([10.0, 20.0], 3, 4.0) == pytest.approx(15.0 * 3 - 4.0)
    assert run_eta([10.0], 1, 30.0) == 0.0  # never negative
    assert format_seconds(3725.4) == "1:02:05"
    assert format_seconds(None) == "?"


def test_log_lines_count_devices_and_give_the_eta(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = RoundProgress(total_rounds=4, offset=1, live=False, clock=clock)  # resumed after round 1
    with caplog.at_level(logging.INFO, logger="fedpgen.server.progress"), progress:
        progress.round_started(1, "fit", 4)
        clock.now += 3.0
        for failed in (False, True, False):
            progress.reply(failed=failed)
        first = progress.round_finished()
        clock.now += 7.0  # aggregation: round 2 took 10 s from its send to round 3's
        progress.round_started(2, "fit", 4)
        clock.now += 2.0
        for _ in range(4):
            progress.reply()
        second = progress.round_finished()
    assert (first.server_round, first.done, first.failed, first.total, first.seconds) == (2, 3, 1, 4, 3.0)
    assert first.eta is None  # no round finished yet
    assert (second.server_round, second.done, second.failed, second.seconds) == (3, 4, 0, 2.0)
    assert progress.round_seconds == [10.0]
    assert second.eta == pytest.approx(10.0 * 2 - 2.0)  # rounds 3 and 4 left, 2 s of round 3 spent
    lines = [r.getMessage() for r in caplog.records if r.name == "fedpgen.server.progress"]
    assert lines == ["round 2/4 fit: 3/4 devices replied (1 failed) in 3.0 s, run ETA ?",
                     "round 3/4 fit: 4/4 devices replied in 2.0 s, run ETA 0:00:18"]


def test_the_grid_counts_each_reply_and_returns_them_all() -> None:
    grid = FakeGrid({1: 1, 2: 3, 3: 3}, failing=frozenset({2}))
    progress = RoundProgress(total_rounds=3, live=False)
    counted: list[tuple[int, int]] = []
    original = progress.reply

    def reply(*, failed: bool = False) -> None:
        original(failed=failed)
        counted.append((progress.done, progress.failed))

    progress.reply = reply  # type: ignore[method-assign]
    sent = [message(n, group="2", stage="collect_masked_vectors") for n in (1, 2, 3)]
    replies = ProgressGrid(grid, progress).send_and_receive(sent)  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert counted == [(1, 0), (2, 1), (3, 1)]  # one at the first pull, two at the third
    assert grid.pulls == [{"m1", "m2", "m3"}, {"m2", "m3"}, {"m2", "m3"}]  # only the ones still missing
    assert (progress.round, progress.stage, progress.total) == (2, "fit (collect_masked_vectors)", 3)


def test_the_grid_keeps_flowers_timeout() -> None:
    grid = FakeGrid({1: 1, 2: 2})  # node 3 never answers
    progress = RoundProgress(total_rounds=1, live=False)
    started = time.monotonic()
    replies = ProgressGrid(grid, progress).send_and_receive([message(n) for n in (1, 2, 3)],  # type: ignore[arg-type]
                                                            timeout=0.3)
    waited = time.monotonic() - started
    assert len(replies) == 2 and (progress.done, progress.total) == (2, 3)
    assert 0.3 <= waited < 2.0
    assert len(grid.pulls) > 5  # it kept pulling at the grid's interval until the timeout


def test_a_deployed_link_is_pulled_soon_after_a_push_and_after_each_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    # A deployment's stage: Flower's gRPC grid sleeps 3 s between pulls, so each of a SecAgg+
    # round's exchanges waited on average 1.5 s after its last reply had arrived. The waits now
    # start at 0.1 s and grow by half after each empty pull up to the 3 s ceiling; a pull that
    # brings replies starts them again from 0.1 s (replies come in bursts).
    waits: list[float] = []
    monkeypatch.setattr("fedpgen.server.progress.time.sleep", waits.append)
    grid = FakeGrid({1: 1, 2: 12, 3: 14}, pull_interval=None)
    replies = ProgressGrid(grid, RoundProgress(total_rounds=1, live=False)).send_and_receive(
        [message(n) for n in (1, 2, 3)])  # type: ignore[arg-type]
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    growing = [0.1 * 1.5 ** k for k in range(9)]  # 0.1 ... 2.56
    assert waits == pytest.approx([0.1, *growing[1:], 3.0, 3.0, 0.1, 0.15])
    waits.clear()  # no reply at the first pull: the first wait is short all the same
    ProgressGrid(FakeGrid({1: 3}, pull_interval=None), RoundProgress(total_rounds=1, live=False)).send_and_receive(
        [message(1)])  # type: ignore[arg-type]
    assert waits == pytest.approx([0.1, 0.15])


def test_the_simulation_grid_is_pulled_at_its_own_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr("fedpgen.server.progress.time.sleep", waits.append)
    grid = FakeGrid({1: 1, 2: 4}, pull_interval=0.1)  # Flower's in-memory grid
    ProgressGrid(grid, RoundProgress(total_rounds=1, live=False)).send_and_receive([message(n) for n in (1, 2)])
    assert waits == [0.1, 0.1, 0.1]


def test_stage_names() -> None:
    assert stage_name(message(1)) == "fit"
    assert stage_name(message(1, kind="evaluate")) == "evaluate"
    assert stage_name(message(1, stage="share_keys")) == "fit (share_keys)"


def test_live_display_only_when_asked_for_and_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.logger import ConsoleHandler

    monkeypatch.setenv("FLWR_LOG_LEVEL", "")  # restored after the test, whatever it was
    monkeypatch.delenv("FLWR_LOG_LEVEL")
    handlers = [h for h in logging.getLogger("flwr").handlers if isinstance(h, ConsoleHandler)]
    levels = [h.level for h in handlers]
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    with configure_logging(verbose=False):
        assert all(h.level == logging.WARNING for h in handlers)
        assert os.environ["FLWR_LOG_LEVEL"] == "WARNING"  # for the simulation's worker processes
        assert RoundProgress(total_rounds=2, console=terminal).live
        assert not RoundProgress(total_rounds=2, console=Console(file=io.StringIO())).live  # a log file, a pipe
    with configure_logging(verbose=True):
        assert all(h.level == logging.INFO for h in handlers)
        assert not RoundProgress(total_rounds=2, console=terminal).live
    # Restored after the run: processes this one starts later (a deployed SuperNode in the tests)
    # must not inherit a WARNING level that hides their INFO lines
    assert "FLWR_LOG_LEVEL" not in os.environ and [h.level for h in handlers] == levels


def test_live_display_shows_round_stage_and_devices() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with RoundProgress(total_rounds=10, offset=2, live=True, console=console) as progress:
        progress.round_started(1, "fit", 8)
        for _ in range(5):
            progress.reply()
        progress.round_finished()
    text = out.getvalue()
    assert "round 3/10 fit" in text and "5/8" in text and "devices" in text


def test_the_servers_progress_is_drawn_by_the_process_that_started_the_run(tmp_path) -> None:
    # fedpgen simulate: the ServerApp runs in Flower's simulation process and writes its events
    events = tmp_path / "progress.jsonl"
    out = io.StringIO()
    stop = threading.Event()
    shown = threading.Thread(target=replay, args=(events, stop),
                             kwargs={"console": Console(file=out, force_terminal=True, width=120), "live": True,
                                     "poll": 0.01})
    shown.start()
    # Execute: the ServerApp's side (no terminal there)
    with RoundProgress(total_rounds=10, offset=2, live=False, events=events) as progress:
        progress.round_started(1, "fit", 8)
        for _ in range(5):
            progress.reply()
        progress.reply(failed=True)
        time.sleep(0.2)
        progress.round_finished()
        progress.round_recorded({"round": 3, "epsilon-max": 1.5})
    stop.set()
    shown.join(10)
    # Assert: drawn here as it would be there, to the last event
    text = out.getvalue()
    assert not shown.is_alive()
    assert "round 3/10 fit (1 failed)" in text and "6/8" in text and "max ε 1.50" in text
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in written] == ["open", "stage", *["reply"] * 6, "finished", "recorded", "close"]
    finished = written[8]  # the stage (round 3 of the run: offset 2) and its time (benchmarks/secagg.py)
    assert finished["round"] == 3 and finished["stage"] == "fit" and 0.2 <= finished["seconds"] < 5


def test_in_a_process_without_logging_set_up_the_lines_reach_stdout() -> None:
    # As under `flwr run`: Flower's process forwards stdout as the run's log; nothing configured fedpgen's loggers.
    import subprocess
    import sys

    script = ("import logging; logging.getLogger().setLevel(logging.WARNING)\n"
              "from fedpgen.server.progress import RoundProgress, ensure_log_handler\n"
              "ensure_log_handler()\n"
              "p = RoundProgress(total_rounds=2)\n"
              "p.round_started(1, 'fit', 3); p.reply(); p.reply(failed=True); p.round_finished()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "round 1/2 fit: 2/3 devices replied (1 failed) in" in proc.stdout, proc.stdout + proc.stderr
