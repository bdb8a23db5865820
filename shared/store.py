"""The on-device store: a ``state-dir`` per device on disk, written atomically, sealed.

Holds what must survive rounds and process restarts and never leaves the device: the
personal part and the device's bookkeeping. ``Context.state`` is not used for this: it is
in memory, lost on restart and shipped with every message in simulation. Every file is
encrypted and authenticated with the device key (``shared/sealing.py``); a file modified on
disk raises ``TamperedStateError`` instead of being used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedpgen.shared.sealing import Sealer, TamperedStateError, key_from_passphrase, load_or_create_key


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


KEY_FILE = "device.key"
PASSPHRASE_ENV = "FEDPGEN_DEVICE_PASSPHRASE"


def device_sealer(state_dir: Path, key_file: Path | None = None, *, create: bool = True) -> Sealer:
    """The device's sealer: a passphrase from ``$FEDPGEN_DEVICE_PASSPHRASE`` (scrypt, salt in the
    state-dir), else the key file ``key_file`` (default ``<state-dir>/device.key``, created 0600
    unless ``create`` is false: readers such as ``fedpgen ledger`` never create a key)."""
    state_dir = Path(state_dir)
    passphrase = os.environ.get(PASSPHRASE_ENV, "")
    if passphrase:
        return Sealer(key_from_passphrase(passphrase, state_dir / "key.salt"))
    path = Path(key_file) if key_file else state_dir / KEY_FILE
    if not create and not path.is_file():
        raise FileNotFoundError(f"device key not found: {path} (give --key-file, or set ${PASSPHRASE_ENV})")
    return Sealer(load_or_create_key(path))


class SealedFiles:
    """Whole files in a state-dir, sealed under their own name (the role)."""

    def __init__(self, state_dir: Path, sealer: Sealer | None = None) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sealer = sealer or device_sealer(self.dir)

    def read(self, name: str) -> bytes | None:
        path = self.dir / f"{name}.sealed"
        self.refuse_plaintext(name)
        return self.sealer.open(name, path.read_bytes(), where=str(path)) if path.is_file() else None

    def refuse_plaintext(self, name: str) -> None:
        """A plaintext state file (an unsealed store, or one dropped in) is never used."""
        if (self.dir / name).exists():
            raise TamperedStateError(f"{self.dir / name}: plaintext state where only sealed files belong "
                                     "(an unsealed older store?); refusing to use it: start a fresh state-dir")

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.dir / f"{name}.sealed", self.sealer.seal(name, data))

    def read_json(self, name: str) -> Any:
        data = self.read(name)
        return None if data is None else json.loads(data)

    def write_json(self, name: str, value: Any) -> None:
        self.write(name, json.dumps(value, indent=2, sort_keys=True).encode())


class DeviceStore(SealedFiles):
    """Personal tensors and device metadata in ``state_dir``."""

    PERSONAL = "personal.safetensors"
    META = "device.json"

    def load_personal(self) -> dict[str, torch.Tensor] | None:
        data = self.read(self.PERSONAL)
        return None if data is None else dict(st_load(data))

    def save_personal(self, tensors: dict[str, torch.Tensor]) -> None:
        self.write(self.PERSONAL, st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def load_meta(self) -> dict[str, Any]:
        return self.read_json(self.META) or {}

    def save_meta(self, meta: dict[str, Any]) -> None:
        self.write_json(self.META, meta)
