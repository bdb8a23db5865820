"""Built-in base models: built once per settings hash and cached, never committed.

Under ``$FEDPGEN_CACHE`` (default ``~/.cache/fedpgen``). Building writes to a temporary
folder and renames it into place, so concurrent builders (Ray workers) never see half a
checkpoint; the loser of the race discards its identical copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

MARKER = "fedpgen_base.json"  # written last by a builder: its presence means the folder is complete


def cache_root() -> Path:
    return Path(os.environ.get("FEDPGEN_CACHE", Path.home() / ".cache" / "fedpgen"))


def cached_path(kind: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "base" / f"{kind}-{digest}"


def ensure_built(kind: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return the cached folder for ``(kind, key)``, calling ``build(tmp_dir)`` first if absent.

    ``build`` must write :data:`MARKER` last."""
    dest = cached_path(kind, key)
    if (dest / MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()  # our own progress bar shows the build; not "Writing model shards"
    build(tmp)
    if not (tmp / MARKER).is_file():
        raise RuntimeError(f"building {kind} base: {MARKER} was not written")
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
