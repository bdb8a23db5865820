"""The live view of a run: each round's stages, devices done/total, elapsed time and ETA.

Flower's workflows send each stage of a round (a plain fit, each SecAgg+ stage, the final
evaluation) with ``Grid.send_and_receive``. :class:`ProgressGrid` does the same push and
pull loop with Flower's own timeout semantics, and tells a :class:`RoundProgress` about
every reply as it arrives. The progress renders with ``rich`` when ``fedpgen simulate``
asked for it (:func:`configure_logging`) and stderr is a terminal; otherwise, as under
``flwr run`` where the ServerApp's output is a log stream, it logs one line per stage.

The ServerApp also appends every progress event to ``<run-dir>/progress.jsonl``
(:data:`EVENTS_FILE`): ``fedpgen simulate`` runs the ServerApp in Flower's simulation process,
not in its own, and draws the live display from that file (:func:`replay`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from flwr.app import Message
from flwr.server import Grid
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedpgen.shared.wire_transcript import stage_of

log = logging.getLogger(__name__)

_STAGE_NAMES = {"train": "fit", "evaluate": "evaluate"}
EVENTS_FILE = "progress.jsonl"
_DEFAULT_PULL_INTERVAL = 3.0  # Flower's gRPC grid sleeps 3 s between pulls; its in-memory grid has pull_interval
_FIRST_PULL_WAIT = 0.1  # a deployment's first wait after a push or a pull with replies ...
_PULL_WAIT_GROWTH = 1.5  # ... growing by half after each empty pull, up to the grid's interval


@dataclasses.dataclass
class _Display:
    """Whether this process may draw a live display (set by :func:`configure_logging`)."""

    live: bool = False


_DISPLAY = _Display()


@contextlib.contextmanager
def configure_logging(verbose: bool) -> Iterator[None]:
    """How ``fedpgen simulate`` shows a run, for the duration of the block (then restored: a
    process that runs more than one thing, e.g. tests, must not inherit the setting).

    Parameters
    ----------
    verbose
        ``True``: Flower's INFO log lines as they come, and the progress as one log line
        per round stage. ``False``: Flower's own logger at WARNING here and in the
        simulation's worker processes (unless ``FLWR_LOG_LEVEL`` is set), and a live
        progress display when stderr is a terminal.
    """
    from flwr.common.logger import update_console_handler

    handlers = list(logging.getLogger("flwr").handlers)  # Flower's logger (its console handler)
    before = ([h.level for h in handlers], os.environ.get("FLWR_LOG_LEVEL"), _DISPLAY.live)
    _DISPLAY.live = not verbose
    try:
        if verbose:
            update_console_handler(level=logging.INFO)
        else:
            level = os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # Ray's workers import Flower's logger anew
            update_console_handler(level=level.upper())
        yield
    finally:
        levels, env, _DISPLAY.live = before
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)
        if env is None:
            os.environ.pop("FLWR_LOG_LEVEL", None)
        else:
            os.environ["FLWR_LOG_LEVEL"] = env


def ensure_log_handler() -> None:
    """Let fedpgen's INFO lines out when the process did not configure them.

    Under ``flwr run`` the ServerApp runs in Flower's own process, which forwards what it
    writes to stdout and stderr as the run's log; there, fedpgen's loggers inherit the
    root's WARNING level (and may have no handler), and the progress lines would be dropped.
    """
    fedpgen = logging.getLogger("fedpgen")
    if fedpgen.getEffectiveLevel() > logging.INFO:
        fedpgen.setLevel(logging.INFO)
    if not fedpgen.hasHandlers():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)-8s: %(message)s"))
        fedpgen.addHandler(handler)


def remaining_seconds(done: int, total: int, elapsed: float) -> float | None:
    """Seconds left for ``total - done`` items at the rate so far, or ``None`` before the first.

    Parameters
    ----------
    done, total
        Items finished and expected.
    elapsed
        Seconds spent on the ``done`` items.

    Returns
    -------
    float or None
        ``elapsed / done * (total - done)`` (0 once ``done >= total``).
    """
    if done >= total:
        return 0.0
    if done <= 0:
        return None
    return elapsed / done * (total - done)


def run_eta(round_seconds: list[float], rounds_left: int, current_elapsed: float) -> float | None:
    """Seconds left in the run: the mean finished round, times the rounds left, less the
    time already spent in the current round; ``None`` before a round has finished.

    Parameters
    ----------
    round_seconds
        Durations of the rounds finished in this process.
    rounds_left
        Rounds not finished yet, the current one included.
    current_elapsed
        Seconds since the current round started.

    Returns
    -------
    float or None
        Never negative.
    """
    if not round_seconds:
        return None
    mean = sum(round_seconds) / len(round_seconds)
    return max(0.0, mean * rounds_left - current_elapsed)


def format_seconds(seconds: float | None) -> str:
    """``h:mm:ss``, or ``?`` when unknown."""
    if seconds is None:
        return "?"
    return str(datetime.timedelta(seconds=round(seconds)))


@dataclasses.dataclass(frozen=True)
class StageResult:
    """One stage of a round, as it ended."""

    server_round: int
    stage: str
    done: int
    failed: int
    total: int
    seconds: float
    eta: float | None  # seconds left in the run, None while unknown


class RoundProgress:
    """Devices done/total of the round stage in flight, elapsed time and ETA.

    Parameters
    ----------
    total_rounds
        The run's planned rounds (``num-server-rounds``).
    offset
        Rounds done before this process started (a resumed run): Flower numbers rounds
        from 1 in each process, the display shows the run's own round numbers.
    live
        Draw a live display (``True``), log one line per stage (``False``); ``None``: live
        when :func:`configure_logging` allowed it and stderr is a terminal.
    console
        Where a live display goes; default stderr.
    clock
        Monotonic seconds (tests pass their own).
    events
        A file to write every event to, one JSON object a line, for :func:`replay` (started
        afresh by each run).
    """

    def __init__(self, *, total_rounds: int, offset: int = 0, live: bool | None = None,
                 console: Console | None = None, clock: Callable[[], float] = time.monotonic,
                 events: Path | None = None) -> None:
        self.total_rounds, self.offset, self.clock = total_rounds, offset, clock
        self._events_path, self._events = events, None
        self.console = console or Console(stderr=True)
        self.live = (_DISPLAY.live and self.console.is_terminal) if live is None else live
        self.round_seconds: list[float] = []  # finished rounds, in this process
        self.round = 0
        self.stage = ""
        self.total = self.done = self.failed = 0
        self._round_start = self._stage_start = 0.0
        self._in_flight = False
        self._progress: Progress | None = None
        self._rounds_bar = self._stage_bar = TaskID(0)

    # -- the live display ------------------------------------------------------------------
    def _emit(self, event: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.write(json.dumps({"event": event, **fields}) + "\n")
            self._events.flush()

    def __enter__(self) -> Self:
        if self._events_path is not None:
            self._events = open(self._events_path, "w", encoding="utf-8")
            self._emit("open", total_rounds=self.total_rounds, offset=self.offset)
        if self.live:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                      TextColumn("ETA {task.fields[eta]}"), console=self.console,
                                      redirect_stdout=True, redirect_stderr=True)
            self._progress.start()
            self._rounds_bar = self._progress.add_task("rounds", total=self.total_rounds, completed=self.offset,
                                                       unit="rounds", eta="?")
            self._stage_bar = self._progress.add_task("waiting for devices", total=None, unit="devices", eta="?")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._in_flight:
            self.round_finished()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._events is not None:
            self._emit("close")
            self._events.close()
            self._events = None

    def _refresh(self) -> None:
        if self._progress is None:
            return
        now = self.clock()
        self._progress.update(self._rounds_bar, eta=format_seconds(self.eta()))
        stage_eta = remaining_seconds(self.done, self.total, now - self._stage_start)
        self._progress.update(self._stage_bar, completed=self.done, eta=format_seconds(stage_eta),
                              description=self.label() + (f" ({self.failed} failed)" if self.failed else ""))

    # -- what the grid reports ---------------------------------------------------------------
    def label(self) -> str:
        """``round 3/10 fit``: the round and stage in flight."""
        return f"round {self.round}/{self.total_rounds} {self.stage}"

    def eta(self) -> float | None:
        """Seconds left in the run (:func:`run_eta`), ``None`` before a round finished."""
        rounds_left = max(0, self.total_rounds - self.round + 1) if self.round else self.total_rounds - self.offset
        return run_eta(self.round_seconds, rounds_left, self.clock() - self._round_start if self.round else 0.0)

    def round_started(self, server_round: int, stage: str, total: int) -> None:
        """A stage of a round was sent to ``total`` devices.

        Parameters
        ----------
        server_round
            Flower's round number in this process (``offset`` is added).
        stage
            What was asked: ``fit``, ``fit (setup)`` (a SecAgg+ stage), ``evaluate``.
        total
            Devices asked.
        """
        if self._in_flight:
            self.round_finished()
        self._emit("stage", server_round=server_round, stage=stage, total=total)
        now = self.clock()
        r = min(self.offset + server_round, self.total_rounds)  # a finished run resumed: its final evaluation
        if r != self.round:
            if self.round:  # the previous round is over once the next one sends
                self.round_seconds.append(now - self._round_start)
                if self._progress is not None:
                    self._progress.update(self._rounds_bar, completed=self.round)
            self.round, self._round_start = r, now
        self.stage, self.total, self.done, self.failed = stage, total, 0, 0
        self._stage_start, self._in_flight = now, True
        if self._progress is not None:
            self._progress.reset(self._stage_bar, total=total, completed=0, description=self.label(),
                                 unit="devices", eta="?")  # reset replaces every field
        self._refresh()

    def reply(self, *, failed: bool = False) -> None:
        """A device answered the stage in flight (``failed``: with an error)."""
        self.done += 1
        self.failed += int(failed)
        self._emit("reply", failed=failed)
        self._refresh()

    def round_finished(self) -> StageResult:
        """The stage in flight is over (every device answered, or the timeout passed)."""
        self._in_flight = False
        result = StageResult(server_round=self.round, stage=self.stage, done=self.done, failed=self.failed,
                             total=self.total, seconds=self.clock() - self._stage_start, eta=self.eta())
        self._emit("finished", round=self.round, stage=self.stage, seconds=round(result.seconds, 3))  # the run's round
        self._refresh()
        if self._progress is None:
            log.info("%s: %d/%d devices replied%s in %.1f s, run ETA %s", self.label(), result.done, result.total,
                     f" ({result.failed} failed)" if result.failed else "", result.seconds,
                     format_seconds(result.eta))
        return result

    def round_recorded(self, row: dict[str, Any]) -> None:
        """The strategy recorded an aggregated round (its row of ``rounds.jsonl``)."""
        self._emit("recorded", row={k: row.get(k) for k in ("round", "epsilon-max")})
        if self._progress is not None:
            eps = row.get("epsilon-max")
            self._progress.update(self._rounds_bar, completed=int(row["round"]),
                                  description="rounds" + (f" (max ε {eps:.2f})" if eps is not None else ""))

    def watch(self, grid: Grid) -> Grid:
        """``grid`` reporting each stage and reply to this progress."""
        return ProgressGrid(grid, self)  # type: ignore[return-value]


def replay(events: Path, stop: threading.Event, *, console: Console | None = None, live: bool | None = None,
           poll: float = 0.2) -> None:
    """Show the progress another process writes to ``events`` (a :class:`RoundProgress` with
    ``events``), as that process would on a terminal, until ``stop`` is set and the file is read."""
    progress: RoundProgress | None = None
    position, partial = 0, ""
    try:
        while True:
            finishing = stop.is_set()
            try:
                with open(events, encoding="utf-8") as f:
                    if f.seek(0, 2) < position:  # a new run started the file afresh
                        position, partial = 0, ""
                    f.seek(position)
                    chunk = f.read()
                    position = f.tell()
            except FileNotFoundError:
                chunk = ""
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                event = json.loads(line)
                kind = event.pop("event")
                if kind == "open":
                    if progress is not None:
                        progress.__exit__(None, None, None)
                    progress = RoundProgress(total_rounds=event["total_rounds"], offset=event["offset"],
                                             live=live, console=console).__enter__()
                elif progress is None:
                    continue
                elif kind == "stage":
                    progress.round_started(event["server_round"], event["stage"], event["total"])
                elif kind == "reply":
                    progress.reply(failed=event["failed"])
                elif kind == "finished":
                    progress.round_finished()
                elif kind == "recorded":
                    progress.round_recorded(event["row"])
                elif kind == "close":
                    progress.__exit__(None, None, None)
                    progress = None
            if finishing:
                return
            stop.wait(poll)
    finally:
        if progress is not None:
            progress.__exit__(None, None, None)


def stage_name(msg: Message) -> str:
    """``fit``, ``evaluate``, or ``fit (share_keys)`` for a SecAgg+ stage."""
    kind = msg.metadata.message_type
    name = _STAGE_NAMES.get(kind, kind)
    stage = stage_of(msg)
    return f"{name} ({stage})" if stage else name


class ProgressGrid:
    """``grid`` whose ``send_and_receive`` counts replies as they arrive.

    The same push and pull loop as Flower 1.42's own grids (``InMemoryGrid``, ``GrpcGrid``):
    push every message, then pull until each has a reply or ``timeout`` seconds passed
    (``None``: wait forever). Between pulls it sleeps the grid's pull interval (Flower's
    in-memory grid: 0.1 s) — except that a grid whose interval is longer (Flower's gRPC grid:
    3 s, in a deployment) is pulled 0.1 s after a push or a pull that brought replies, then
    at waits growing by half up to that interval: a stage's last reply used to wait 1.5 s on
    average to be seen, and a SecAgg+ round has four stages and an evaluation
    (docs/scale.md, "Deployments: one resident ClientApp process per device").
    """

    def __init__(self, grid: Grid, progress: RoundProgress) -> None:
        self._grid, self._progress = grid, progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``, pull their replies; report each reply to the progress."""
        out = list(messages)
        if not out:
            return list(self._grid.send_and_receive(out, timeout=timeout))
        group = out[0].metadata.group_id
        self._progress.round_started(int(group) if group.isdigit() else 0, stage_name(out[0]), len(out))
        try:
            msg_ids = set(self._grid.push_messages(out))
            del out, messages
            ceiling = float(getattr(self._grid, "pull_interval", _DEFAULT_PULL_INTERVAL))
            end_time = time.time() + (timeout if timeout is not None else 0.0)
            replies: list[Message] = []
            first, wait = min(_FIRST_PULL_WAIT, ceiling), None
            while timeout is None or time.time() < end_time:
                pulled = list(self._grid.pull_messages(msg_ids))
                replies.extend(pulled)
                for msg in pulled:
                    self._progress.reply(failed=msg.has_error())
                msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in pulled})
                if not msg_ids:
                    break
                wait = first if pulled or wait is None else min(wait * _PULL_WAIT_GROWTH, ceiling)
                time.sleep(wait)
            return replies
        finally:
            self._progress.round_finished()
