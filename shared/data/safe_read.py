"""Reading a user's files safely: size caps, no symlinks, every failure a counted skip.

A user's folder is input from outside the program: a file in it may be huge, binary,
growing while it is read, a symlink to a system file, a FIFO or a device. Every reader of a
user folder goes through :func:`list_folder` and :func:`read_file`, which

- never follow a symlink inside the user folder: subfolders are checked with ``lstat`` and
  files opened with ``O_NOFOLLOW``; a symlink is skipped and counted (``symlink``);
- read regular files only, and at most ``cap + 1`` bytes of one: the size is checked with
  ``stat`` before reading and again by what was read, so a file growing underneath cannot
  blow memory (``too-large``, or the caller's reason, e.g. ``huge-image`` for photos);
- charge every byte read to the user's :class:`UserBudget`; the first file that does not
  fit, and every file after it, is ``user-cap``;
- count a zero-byte file (``empty-file``) and any other failure (``unreadable-file``).

The caps live here, in one place; ``docs/user-folder.md`` lists them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KiB, MiB = 2**10, 2**20
DOCUMENT_MAX_BYTES = 4 * MiB  # one documents/*.txt
PROFILE_MAX_BYTES = 64 * KiB  # profile.json
LOG_MAX_BYTES = 32 * MiB  # behavior.jsonl (some 400,000 events)
PHOTO_MAX_BYTES = 20 * MiB  # one photo, before decoding
USER_MAX_BYTES = 64 * MiB  # all files read for one user together

# O_NOFOLLOW: a symlink as the last component fails with ELOOP instead of being followed
# (the lstat before opening catches links where the flag does not exist). O_NONBLOCK: a
# FIFO swapped in after the lstat cannot block the open; fstat then rejects it.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


class UserBudget:
    """Bytes still allowed to be read for one user, across all their files.

    Once a file does not fit, the budget is spent: later files are skipped too, so what is
    read is always a prefix of the folder in reading order, not whatever happens to fit.
    """

    def __init__(self, total: int = USER_MAX_BYTES) -> None:
        if total < 0:
            raise ValueError(f"user budget must be >= 0 bytes, got {total}")
        self.left = total
        self.spent = False

    def take(self, size: int) -> bool:
        """Charge ``size`` bytes; ``False`` (and spent from now on) when they do not fit."""
        if self.spent or size > self.left:
            self.spent = True
            return False
        self.left -= size
        return True


def count(counts: dict[str, int], reason: str, n: int = 1) -> None:
    """Add ``n`` skips for ``reason`` to ``counts`` (in place)."""
    counts[reason] = counts.get(reason, 0) + n


def list_folder(folder: Path) -> tuple[list[Path], list[Path], dict[str, int]]:
    """``(files, subfolders, skipped)`` directly in ``folder``, each in name order.

    Symlinks are neither files nor subfolders: they are counted (``symlink``). A ``folder``
    that is itself a symlink lists nothing and counts one; a missing one lists nothing.
    "Files" are all other entries (FIFOs and devices included: :func:`read_file` rejects them).
    """
    try:
        mode = os.lstat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return [], [], {}
    except OSError as exc:
        log.warning("cannot look at %s: %s", folder.name, exc)
        return [], [], {"unreadable-file": 1}
    if stat.S_ISLNK(mode):
        log.warning("not following symlinked folder %s", folder.name)
        return [], [], {"symlink": 1}
    if not stat.S_ISDIR(mode):
        return [], [], {}
    files: list[Path] = []
    dirs: list[Path] = []
    skipped: dict[str, int] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    log.warning("not following symlink %s in %s", entry.name, folder.name)
                    count(skipped, "symlink")
                elif entry.is_dir(follow_symlinks=False):
                    dirs.append(Path(entry.path))
                else:
                    files.append(Path(entry.path))
    except OSError as exc:
        log.warning("cannot list %s: %s", folder.name, exc)
        count(skipped, "unreadable-file")
    return sorted(files), sorted(dirs), skipped


def read_file(path: Path, *, cap: int, budget: UserBudget, too_large: str = "too-large") -> tuple[bytes | None, str]:
    """``(content, "")`` or ``(None, skip reason)`` for one file of a user's folder.

    Parameters
    ----------
    path
        The file; a symlink is never followed (``symlink``).
    cap
        Most bytes this file may have; a larger one is ``too_large``, known from its size
        before reading or, for a file that grew since, after reading ``cap + 1`` bytes.
    budget
        The user's remaining bytes, charged with what is read (``user-cap`` once spent).
    too_large
        The reason a file over ``cap`` is counted under.
    """
    if budget.spent:
        return None, "user-cap"
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            log.warning("not following symlink %s", path.name)
            return None, "symlink"
        if not stat.S_ISREG(st.st_mode):
            log.warning("skipping %s: not a regular file", path.name)
            return None, "unreadable-file"
        if st.st_size > cap:
            log.warning("skipping %s: %d bytes, over the cap of %d", path.name, st.st_size, cap)
            return None, too_large
        if st.st_size > budget.left:
            budget.take(st.st_size)
            return None, "user-cap"
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink after the lstat
            return None, "symlink"
        log.warning("skipping unreadable %s: %s", path.name, exc)
        return None, "unreadable-file"
    try:
        with open(fd, "rb") as file:
            st = os.fstat(file.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, "unreadable-file"
            # Ask for one byte more than the size seen: a file that grew shows it, and is read
            # on only up to the cap (never more than cap + 1 bytes in memory).
            want = min(st.st_size, cap) + 1
            data = file.read(want)
            if len(data) == want and want <= cap:
                data += file.read(cap + 1 - want)
    except OSError as exc:
        log.warning("skipping unreadable %s: %s", path.name, exc)
        return None, "unreadable-file"
    if len(data) > cap:
        log.warning("skipping %s: grew over the cap of %d bytes while read", path.name, cap)
        return None, too_large
    if not budget.take(len(data)):
        return None, "user-cap"
    if not data:
        return None, "empty-file"
    return data, ""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """``json.loads`` for a user's file: ``NaN``/``Infinity`` literals and nesting too deep
    for the parser are ``ValueError`` (Python's ``json`` accepts the former and raises
    ``RecursionError`` for the latter)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
