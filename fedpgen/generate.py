"""Personalized generation for one user: the run's final shared base + the device's own personal part.

Runs where the device's state is (its folder, its sealed state-dir, its key): the personal
part is unsealed in memory only, and nothing is sent anywhere. In a simulation run folder
every device's state is under ``<run-dir>/devices/<user>`` and its folder under
``<run-dir>/users/<user>`` (or the run's ``data-dir``); a deployed device passes its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fedpgen.client.device import BOTH, SHARED, Device
from fedpgen.server import checkpoint
from fedpgen.server.results import read_config
from fedpgen.shared.adapters import active, set_arrays, set_tensors
from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.user_folder import read_profile
from fedpgen.shared.population import ensure_population

VARIANTS = ("personal", "shared", "base")  # shared+personal (the product), shared-only, the base model


def run_config(run_dir: Path) -> RunConfig:
    """The configuration a run folder was written with (its ``run-dir`` set to where it is now)."""
    return dataclasses.replace(read_config(run_dir), run_dir=str(run_dir))


def generate(run_dir: Path, user: str, prompt: str, *, variant: str = "personal", out: Path | None = None,
             user_dir: Path | None = None, device_state: Path | None = None, key_file: Path | None = None,
             seed: int = 0, count: int = 4, device: str = "cpu", subject: str | None = None) -> str:
    """Generate for ``user`` from ``prompt``; return the text, the items, or where images were written."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not user or Path(user).name != user or user in {".", ".."}:
        raise ValueError(f"user must be a device folder's name, got {user!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    cfg = run_config(run_dir)
    if user_dir is None:
        found = {p.name: p for p in ensure_population(cfg)}
        if user not in found:
            raise ValueError(f"no user {user!r} in this run; users: {', '.join(sorted(found)[:20])}")
        user_dir = found[user]
    device_state = device_state or Path(run_dir) / "devices" / user
    if variant == "personal" and not device_state.is_dir():
        raise FileNotFoundError(f"no device state at {device_state}: this user never trained")
    d = Device(cfg, user_dir=user_dir, state_dir=device_state, key_file=key_file, device=device, create_key=False)
    ckpt = checkpoint.latest(Path(run_dir) / "checkpoints", config_hash=cfg.model_hash(), names=d.sets.send)
    if ckpt is None and variant != "base":
        raise FileNotFoundError(f"{run_dir}/checkpoints: no shared base yet (no finished round)")
    if ckpt is not None:
        set_arrays(d.model, d.sets.send, ckpt.theta)
    stored = d.store.load_personal() if variant == "personal" else None
    if variant == "personal" and stored is None:
        raise FileNotFoundError(f"{device_state}: no personal part stored (this user never trained)")
    set_tensors(d.model, stored if stored is not None else d.init_keep)
    torch.manual_seed(seed)
    kwargs = {"dest": out or Path(run_dir) / "generated" / user / variant, "n": count, "seed": seed,
              "profile": read_profile(user_dir)[0], "bindings": d.data.bindings, "subject": subject}
    if variant == "base":
        with d.model.disable_adapter():
            return d.task.generate(d.model, d.base_path, prompt, **kwargs)
    with active(d.model, BOTH if variant == "personal" else SHARED, ()):
        return d.task.generate(d.model, d.base_path, prompt, **kwargs)
