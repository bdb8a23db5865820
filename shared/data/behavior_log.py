"""A user's interaction log: ``<user>/behavior.jsonl`` and the item catalog.

One event a line: ``{"item": "i0042", "ts": 1700000000, "event": "play", "rating": 4}``
(``event`` and ``rating`` optional). The catalog (``catalog.jsonl``: ``item``, optional
``title`` and attributes) is public and ships with the base model: its order is the
model's item vocabulary.

Bad input is skipped and counted by reason, never fatal: a malformed line (not JSON, no
``item``, a non-numeric ``ts``), an item id the catalog does not know, an event whose
timestamp goes back in time (earlier than an event before it: clock skew or a corrupted
append, not trusted as the user's order), an unreadable file, an empty log.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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


def read_log(user_dir: Path, index: dict[str, int]) -> tuple[list[int], dict[str, int]]:
    """Return ``(item indices in time order, skipped counts by reason)``.

    ``index`` maps catalog item ids to vocabulary indices. Reasons: ``malformed-line``,
    ``unknown-item``, ``out-of-order``, ``unreadable-file``, ``empty-log``.
    """
    counts = {"malformed-line": 0, "unknown-item": 0, "out-of-order": 0, "unreadable-file": 0, "empty-log": 0}
    path = user_dir / LOG_FILE
    try:
        lines = path.read_bytes().decode("utf-8").splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("skipping unreadable log %s: %s", path, exc)
        counts["unreadable-file"] += 1
        lines = []
    items: list[int] = []
    last_ts = float("-inf")
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            item, ts = str(event["item"]), float(event["ts"])
            if ts != ts:  # NaN
                raise ValueError
        except (ValueError, KeyError, TypeError):
            counts["malformed-line"] += 1
            continue
        if item not in index:
            counts["unknown-item"] += 1
            continue
        if ts < last_ts:
            counts["out-of-order"] += 1
            continue
        last_ts = ts
        items.append(index[item])
    if not items:
        counts["empty-log"] += 1
    return items, {k: v for k, v in counts.items() if v}
