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
from fedpgen.shared.data.user_folder import read_documents, read_profile
from fedpgen.shared.population import ensure_population

VARIANTS = ("personal", "shared", "base")  # shared+personal (the product), shared-only, the base model


def run_config(run_dir: Path) -> RunConfig:
    """The configuration a run folder was written with (its ``run-dir`` set to where it is now)."""
    return dataclasses.replace(read_config(run_dir), run_dir=str(run_dir))


@dataclasses.dataclass(frozen=True)
class UserModel:
    """One user's device model with the run's newest shared base and, for ``personal``, its
    stored personal part loaded (``fedpgen generate``, ``fedpgen export``)."""

    cfg: RunConfig
    device: Device
    user_dir: Path
    checkpoint: checkpoint.Checkpoint | None
    personal: dict[str, torch.Tensor] | None


def load_user_model(run_dir: Path, user: str, *, variant: str, user_dir: Path | None = None,
                    device_state: Path | None = None, key_file: Path | None = None, device: str = "cpu",
                    variants: tuple[str, ...] = VARIANTS, need_state: bool = False) -> UserModel:
    """Check the request, open the device (its sealed meta: another key fails here) and load the
    newest shared base and, for ``personal``, the stored personal part (else the part's init)."""
    if variant not in variants:
        raise ValueError(f"variant must be one of {', '.join(variants)}, got {variant!r}")
    if not user or Path(user).name != user or user in {".", ".."}:
        raise ValueError(f"user must be a device folder's name, got {user!r}")
    cfg = run_config(Path(run_dir))
    if user_dir is None:
        found = {p.name: p for p in ensure_population(cfg)}
        if user not in found:
            raise ValueError(f"no user {user!r} in this run; users: {', '.join(sorted(found)[:20])}")
        user_dir = found[user]
    device_state = Path(device_state) if device_state else Path(run_dir) / "devices" / user
    if (variant == "personal" or need_state) and not device_state.is_dir():
        raise FileNotFoundError(f"no device state at {device_state}: this user never trained")
    d = Device(cfg, user_dir=Path(user_dir), state_dir=device_state, key_file=key_file, device=device,
               create_key=False)
    ckpt = checkpoint.latest(Path(run_dir) / "checkpoints", config_hash=cfg.model_hash(), names=d.sets.send)
    if ckpt is None and variant != "base":
        raise FileNotFoundError(f"{run_dir}/checkpoints: no shared base yet (no finished round)")
    if ckpt is not None:
        set_arrays(d.model, d.sets.send, ckpt.theta)
    stored = d.store.load_personal() if variant == "personal" else None
    if variant == "personal" and stored is None:
        raise FileNotFoundError(f"{device_state}: no personal part stored (this user never trained)")
    set_tensors(d.model, stored if stored is not None else d.init_keep)
    return UserModel(cfg=cfg, device=d, user_dir=Path(user_dir), checkpoint=ckpt, personal=stored)


def generate(run_dir: Path, user: str, prompt: str, *, variant: str = "personal", out: Path | None = None,
             user_dir: Path | None = None, device_state: Path | None = None, key_file: Path | None = None,
             seed: int = 0, count: int = 4, device: str = "cpu", subject: str | None = None) -> str:
    """Generate for ``user`` from ``prompt``; return the text, the items, or where images were written."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    loaded = load_user_model(run_dir, user, variant=variant, user_dir=user_dir, device_state=device_state,
                             key_file=key_file, device=device)
    d, user_dir = loaded.device, loaded.user_dir
    torch.manual_seed(seed)
    kwargs = {"dest": out or Path(run_dir) / "generated" / user / variant, "n": count, "seed": seed,
              "profile": read_profile(user_dir)[0], "bindings": d.data.bindings, "subject": subject,
              "history": read_documents(user_dir)[0] if loaded.cfg.retrieval_k else [],
              "memory": d.data.memory if variant == "personal" else None}
    if variant == "base":
        with d.model.disable_adapter():
            return d.task.generate(d.model, d.base_path, prompt, **kwargs)
    with active(d.model, BOTH if variant == "personal" else [SHARED], ()):
        return d.task.generate(d.model, d.base_path, prompt, **kwargs)
