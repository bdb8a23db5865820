"""The one data format users bring: a device folder per user.

``<user>/profile.json``, ``<user>/documents/*.txt`` (later tasks: ``behavior.jsonl``,
``faces/``, ``subjects/``). Missing parts are fine; unreadable files are skipped and
counted, never fatal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def list_user_dirs(data_dir: Path) -> list[Path]:
    """Sorted user folders below ``data_dir``; a clear error when there are none."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data dir not found: {data_dir}")
    found = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
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


def read_documents(user_dir: Path) -> tuple[list[str], int]:
    """Return ``(texts, skipped)``: readable UTF-8 ``documents/*.txt`` in name order."""
    texts: list[str] = []
    skipped = 0
    doc_dir = user_dir / "documents"
    if not doc_dir.is_dir():
        return texts, skipped
    for path in sorted(doc_dir.iterdir()):
        if not path.is_file() or path.suffix != ".txt":
            skipped += 1
            continue
        try:
            raw = path.read_bytes()
            if b"\x00" in raw:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "binary file (NUL byte)")
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("skipping unreadable document %s: %s", path.name, exc)
            skipped += 1
            continue
        if text.strip():
            texts.append(text)
    return texts, skipped


def read_profile(user_dir: Path) -> tuple[dict[str, str], int]:
    """Return ``(profile, skipped)``; a malformed ``profile.json`` is skipped and counted."""
    path = user_dir / "profile.json"
    if not path.is_file():
        return {}, 0
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): str(v) for k, v in data.items()}, 0
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("skipping unreadable profile %s: %s", path, exc)
        return {}, 1
