"""The on-device store: a ``state-dir`` per device on disk, written atomically.

Holds what must survive rounds and process restarts and never leaves the device: the
personal part and the device's bookkeeping. ``Context.state`` is not used for this: it is
in memory, lost on restart and shipped with every message in simulation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class DeviceStore:
    """Personal tensors and device metadata in ``state_dir``."""

    PERSONAL = "personal.safetensors"
    META = "device.json"

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def load_personal(self) -> dict[str, torch.Tensor] | None:
        path = self.dir / self.PERSONAL
        return dict(st_load(path.read_bytes())) if path.is_file() else None

    def save_personal(self, tensors: dict[str, torch.Tensor]) -> None:
        atomic_write_bytes(self.dir / self.PERSONAL, st_save({k: v.contiguous() for k, v in tensors.items()}))

    def load_meta(self) -> dict[str, Any]:
        path = self.dir / self.META
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_bytes(self.dir / self.META, json.dumps(meta, indent=2, sort_keys=True).encode())
