"""Checkpoints of the shared base: safetensors + round + config hash, one file per round."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedpgen.shared.store import atomic_write_bytes

_NAME = re.compile(r"^round_(\d{4,})\.safetensors$")


@dataclasses.dataclass
class Checkpoint:
    round: int
    theta: list[np.ndarray]
    opt_state: dict[str, list[np.ndarray]]


def save(folder: Path, *, server_round: int, config_hash: str, names: tuple[str, ...],
         theta: list[np.ndarray], opt_state: dict[str, list[np.ndarray]]) -> Path:
    """Write round ``server_round``'s base atomically; a non-finite base is never written."""
    _check_finite(theta, f"round {server_round}")
    tensors = {f"theta/{n}": np.ascontiguousarray(a) for n, a in zip(names, theta, strict=True)}
    for key, arrays in opt_state.items():
        tensors.update({f"opt/{key}/{n}": np.ascontiguousarray(a) for n, a in zip(names, arrays, strict=True)})
    meta = {"round": str(server_round), "config-hash": config_hash, "names": json.dumps(list(names))}
    path = folder / f"round_{server_round:04d}.safetensors"
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return path


def _check_finite(theta: list[np.ndarray], where: str) -> None:
    for name, a in enumerate(theta):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: shared base array {name} is not finite; refusing to use it")


def _metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})


def latest(folder: Path, *, config_hash: str, names: tuple[str, ...]) -> Checkpoint | None:
    """The newest checkpoint written with the same config hash and layout, if any."""
    if not folder.is_dir():
        return None
    for path in sorted((p for p in folder.iterdir() if _NAME.match(p.name)), reverse=True):
        meta = _metadata(path)
        if meta.get("config-hash") != config_hash or json.loads(meta.get("names", "[]")) != list(names):
            raise ValueError(f"checkpoint {path} was written by a different configuration "
                             f"(hash {meta.get('config-hash')} != {config_hash}); use another run-dir")
        tensors = st_load(path.read_bytes())
        opt: dict[str, list[np.ndarray]] = {}
        for key in ("m", "v"):
            if f"opt/{key}/{names[0]}" in tensors:
                opt[key] = [tensors[f"opt/{key}/{n}"] for n in names]
        theta = [tensors[f"theta/{n}"] for n in names]
        _check_finite(theta, str(path))  # e.g. written by an older version without the server's bounds
        return Checkpoint(round=int(meta["round"]), theta=theta, opt_state=opt)
    return None
