"""The one data format users bring: a device folder per user.

``<user>/profile.json``, ``<user>/documents/*.txt`` (later tasks: ``behavior.jsonl``,
``faces/``, ``subjects/``). Missing parts are fine; unusable files are skipped and counted
by reason, never fatal; nothing inside the folder is read through a symlink
(``shared/data/safe_read.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from fedpgen.shared.data.safe_read import (DOCUMENT_MAX_BYTES, PROFILE_MAX_BYTES, UserBudget, count, list_folder,
                                   loads_strict, read_file)

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"


def list_user_dirs(data_dir: Path) -> list[Path]:
    """Sorted user folders below ``data_dir``; a clear error when there are none.

    A symlinked user folder is left out (with a warning), like any symlink in a user's folder.
    """
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data dir not found: {data_dir}")
    found = []
    for path in sorted(p for p in data_dir.iterdir() if not p.name.startswith(".")):
        if path.is_symlink():
            log.warning("skipping symlinked user folder %s: symlinks are never followed", path.name)
        elif path.is_dir():
            found.append(path)
    if not found:
        raise ValueError(f"data dir {data_dir} holds no user folders (expected <user>/documents/*.txt)")
    return found


def write_user(dest: Path, name: str, documents: list[str], profile: dict[str, str] | None = None) -> Path:
    """Write one user's documents as a device folder (used by the built-in populations)."""
    docs = dest / name / "documents"
    docs.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(documents):
        (docs / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    if profile:
        (dest / name / "profile.json").write_text(json.dumps(profile), encoding="utf-8")
    return dest / name


def read_documents(user_dir: Path, *, budget: UserBudget | None = None) -> tuple[list[str], dict[str, int]]:
    """Return ``(texts, skipped counts by reason)``: UTF-8 ``documents/*.txt`` in name order.

    Reasons: ``unreadable-file`` (another extension, binary, not UTF-8), ``empty-file`` (no
    bytes, or only whitespace), ``too-large`` (over ``DOCUMENT_MAX_BYTES``), ``user-cap``
    (``budget`` spent), ``symlink``.
    """
    budget = budget if budget is not None else UserBudget()
    texts: list[str] = []
    files, dirs, skipped = list_folder(user_dir / "documents")
    if dirs:  # a folder inside documents/ is not a document
        count(skipped, "unreadable-file", len(dirs))
    for path in files:
        if path.suffix != ".txt":
            count(skipped, "unreadable-file")
            continue
        raw, reason = read_file(path, cap=DOCUMENT_MAX_BYTES, budget=budget)
        if raw is None:
            count(skipped, reason)
            continue
        try:
            if b"\x00" in raw:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary file (NUL byte)")
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            log.warning("skipping unreadable document %s: %s", path.name, exc)
            count(skipped, "unreadable-file")
            continue
        if text.strip():
            texts.append(text)
        else:
            count(skipped, "empty-file")
    return texts, skipped


def read_profile(user_dir: Path, *, budget: UserBudget | None = None) -> tuple[dict[str, str], dict[str, int]]:
    """Return ``(profile, skipped counts by reason)`` from ``profile.json``.

    The file must hold a JSON object; its values must be scalars (string, number, boolean),
    kept as text. Reasons: ``malformed-profile`` (not a JSON object, once; a non-scalar or
    non-finite value, once per value, dropped), ``empty-file``, ``too-large`` (over
    ``PROFILE_MAX_BYTES``), ``user-cap``, ``symlink``, ``unreadable-file``.
    """
    path = user_dir / PROFILE_FILE
    if not os.path.lexists(path):
        return {}, {}
    raw, reason = read_file(path, cap=PROFILE_MAX_BYTES, budget=budget if budget is not None else UserBudget())
    if raw is None:
        return {}, {reason: 1}
    try:
        data = loads_strict(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        log.warning("skipping malformed profile: %s", exc)
        return {}, {"malformed-profile": 1}
    profile: dict[str, str] = {}
    dropped = 0
    for key, value in data.items():
        if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
            profile[key] = str(value)  # JSON object keys are always strings
        else:
            dropped += 1
    if dropped:
        log.warning("profile: dropped %d values that are not strings, numbers or booleans", dropped)
    return profile, {"malformed-profile": dropped} if dropped else {}
