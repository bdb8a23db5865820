"""One writer at a time for a run folder or a device's state-dir.

Two runs on one run folder (or two SuperNodes on one state-dir) would interleave ledger
appends, checkpoint writes and deletions: a budget could be overspent with every file
still looking consistent. ``exclusive`` takes an advisory ``flock`` on ``<folder>/.lock``
and fails at once, with a clear message, when another process holds it. The kernel drops
the lock when its holder dies, so a crash never leaves a stale lock behind.

Re-entrant within one process (``fedpgen simulate`` holds the run folder while its
ServerApp, in the same process, takes it again): ``flock`` locks belong to an open file, so
a second ``open`` in the same process would otherwise block itself. The table of held locks
is process state by nature, like the locks themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"

_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth) held by this process
_guard = threading.Lock()


class FolderLockedError(RuntimeError):
    """Another process is writing to this folder."""


@contextlib.contextmanager
def exclusive(folder: Path, *, what: str) -> Iterator[None]:
    """Hold ``folder`` exclusively for the block; raise ``FolderLockedError`` at once if another process does.

    ``what`` names the folder in the error (e.g. "run folder", "device state-dir").
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _guard:
        if folder in _held:
            fd, depth = _held[folder]
            _held[folder] = (fd, depth + 1)
        else:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderLockedError(f"{what} {folder} is in use by {holder}: one run (or device) at a time; "
                                        "wait for it to finish or use another folder") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            _held[folder] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[folder]
            if depth > 1:
                _held[folder] = (fd, depth - 1)
            else:
                del _held[folder]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
