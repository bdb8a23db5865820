"""A user's interaction log: ``<user>/behavior.jsonl`` and the item catalog.

One event a line: ``{"item": "i0042", "ts": 1700000000, "event": "play", "rating": 4}``
(``event`` and ``rating`` optional). The catalog (``catalog.jsonl``: ``item``, optional
``title`` and attributes) is public and ships with the base model: its order is the
model's item vocabulary.

Bad input is skipped and counted by reason, never fatal: a malformed line (not a JSON
object, an ``item`` that is not a string, a ``ts`` that is not a finite JSON number), an
item id the catalog does not know, an event whose timestamp goes back in time (earlier than
an event before it: clock skew or a corrupted append, not trusted as the user's order), an
unreadable, empty, oversized or symlinked file (``shared/data/safe_read.py``), an empty log.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from fedpgen.shared.data.safe_read import LOG_MAX_BYTES, UserBudget, count, loads_strict, read_file

log = logging.getLogger(__name__)

LOG_FILE = "behavior.jsonl"
CATALOG_FILE = "catalog.jsonl"


def write_catalog(path: Path, items: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def read_catalog(path: Path) -> list[str]:
    """Item ids in vocabulary order; a missing or malformed catalog is a clear error (it is the model's)."""
    if not path.is_file():
        raise FileNotFoundError(f"item catalog not found: {path} (it ships with the behavior base model)")
    ids: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids.append(str(json.loads(line)["item"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: a catalog line needs a JSON object with an 'item'") from None
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError(f"{path}: item ids must be unique and non-empty")
    return ids


def write_log(user_dir: Path, events: list[dict]) -> None:
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")


def read_log(user_dir: Path, index: dict[str, int], *,
             budget: UserBudget | None = None) -> tuple[list[int], dict[str, int]]:
    """Return ``(item indices in time order, skipped counts by reason)``.

    ``index`` maps catalog item ids to vocabulary indices. Reasons: ``malformed-line``,
    ``unknown-item``, ``out-of-order``, ``empty-log``, and for the file itself
    ``unreadable-file``, ``empty-file``, ``too-large`` (over ``LOG_MAX_BYTES``),
    ``user-cap`` (``budget`` spent), ``symlink``.
    """
    counts: dict[str, int] = {}
    path = user_dir / LOG_FILE
    lines: list[str] = []
    if os.path.lexists(path):
        raw, reason = read_file(path, cap=LOG_MAX_BYTES, budget=budget if budget is not None else UserBudget())
        try:
            # JSON Lines are separated by "\n" only: str.splitlines would also cut a line at
            # a U+2028 or U+0085 inside a string value.
            lines = raw.decode("utf-8").split("\n") if raw is not None else []
        except UnicodeDecodeError as exc:
            log.warning("skipping unreadable log: %s", exc)
            reason = "unreadable-file"
        if reason:
            count(counts, reason)
    items: list[int] = []
    last_ts = float("-inf")
    for line in lines:
        if not line.strip():
            continue
        event = _event(line)
        if event is None:
            count(counts, "malformed-line")
            continue
        item, ts = event
        if item not in index:
            count(counts, "unknown-item")
            continue
        if ts < last_ts:
            count(counts, "out-of-order")
            continue
        last_ts = ts
        items.append(index[item])
    if not items:
        count(counts, "empty-log")
    return items, counts


def _event(line: str) -> tuple[str, float] | None:
    """``(item, ts)`` of a well-formed line, else ``None``: a JSON object whose ``item`` is a
    string and whose ``ts`` is a finite JSON number (not a bool, not a numeric string)."""
    try:
        event: Any = loads_strict(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    item, ts = event.get("item"), event.get("ts")
    if not isinstance(item, str) or isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return None
    try:
        ts = float(ts)
    except OverflowError:  # an integer beyond any float
        return None
    return (item, ts) if math.isfinite(ts) else None
