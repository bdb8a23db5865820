"""One writer at a time for a run folder or a device's state-dir.

Two runs on one run folder (or two SuperNodes on one state-dir) would interleave ledger
appends, checkpoint writes and deletions: a budget could be overspent with every file
still looking consistent. ``exclusive`` takes an advisory ``flock`` on ``<folder>/.lock``
and fails at once, with a clear message, when another process holds it. The kernel drops
the lock when its holder dies, so a crash never leaves a stale lock behind.

Re-entrant within one process: ``flock`` locks belong to an open file, so a second ``open``
in the same process would otherwise block itself. The table of held locks is process state by
nature, like the locks themselves.

Shared with the run a holder starts (``share_with``): ``fedpgen simulate`` holds the run folder
for the whole run while its ServerApp runs in Flower's simulation process, which it starts
through a SuperLink (no file descriptor can be handed down that way). The holder writes a
digest of a fresh secret into the lock file and gives the secret to that process tree in
``$FEDPGEN_RUN_FOLDER_SHARE``; a process holding it may use the folder, any other (a second run
by a careless operator) is refused as before. The lock still ends with its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"
SHARE_ENV = "FEDPGEN_RUN_FOLDER_SHARE"

_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth) held by this process
_guard = threading.Lock()


class FolderLockedError(RuntimeError):
    """Another process is writing to this folder."""


def _shared_line(secret: str) -> str:
    return "shared " + hashlib.sha256(secret.encode()).hexdigest()


@contextlib.contextmanager
def exclusive(folder: Path, *, what: str, share_with: str | None = None) -> Iterator[None]:
    """Hold ``folder`` exclusively for the block; raise ``FolderLockedError`` at once if another process does.

    ``what`` names the folder in the error (e.g. "run folder", "device state-dir").
    ``share_with``: a secret that lets the processes this one starts (given it in
    ``$FEDPGEN_RUN_FOLDER_SHARE``) use the folder while this one holds it.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    shared = False
    with _guard:
        if folder in _held:
            fd, depth = _held[folder]
            _held[folder] = (fd, depth + 1)
        else:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lines = os.pread(fd, 256, 0).decode(errors="replace").splitlines()
                os.close(fd)
                secret = os.environ.get(SHARE_ENV)
                shared = bool(secret) and _shared_line(secret or "") in lines[1:]  # its holder started this run
                if not shared:
                    holder = (lines[0].strip() if lines else "") or "another process"
                    raise FolderLockedError(f"{what} {folder} is in use by {holder}: one run (or device) at a time; "
                                            "wait for it to finish or use another folder") from None
            else:
                os.ftruncate(fd, 0)
                text = f"pid {os.getpid()}" + (f"\n{_shared_line(share_with)}" if share_with else "")
                os.pwrite(fd, text.encode(), 0)
                _held[folder] = (fd, 1)
    if shared:  # the holder keeps the lock; nothing to release here
        yield
        return
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
