"""One device's round: load the shared base, train per the preset, return only the shared delta.

Plain module, no Flower: ``client/app.py`` unpacks messages and calls this.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from shared.adapters import active, get_arrays, get_tensors, set_arrays, set_tensors
from shared.config import RunConfig
from shared.model import build_model
from shared.store import DeviceStore
from shared.training import TrainResult, mean_loss, train
from shared.wire import keys_digest

log = logging.getLogger(__name__)

SHARED, BOTH = ["shared"], ["shared", "personal"]


class Device:
    """A user's device: its raw context, its personal part and its store never leave it."""

    def __init__(self, cfg: RunConfig, *, user_dir: Path, state_dir: Path, client_index: int = -1) -> None:
        self.cfg = cfg
        self.client_index = client_index
        built = build_model(cfg)
        self.task, self.preset, self.base_path = built.task, built.preset, built.base_path
        self.model, self.sets = built.model, built.sets
        self.init_send = get_arrays(self.model, self.sets.send)
        self.init_keep = get_tensors(self.model, self.sets.keep)
        self.store = DeviceStore(state_dir)
        self.data = self.task.read_user(Path(user_dir), cfg, base_path=self.base_path)
        self.key = Path(user_dir).name

    def _generator(self, purpose: str, server_round: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.cfg.seed}/{self.key}/{purpose}/{server_round}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def _round(self, gen: torch.Generator) -> tuple[TrainResult, TrainResult]:
        """Train this round per the preset's schedule (DESIGN.md §2 patterns a / b)."""
        cfg, sets, d = self.cfg, self.sets, self.data

        def shared_phase(adapters: list[str], names: tuple[str, ...]) -> TrainResult:
            with active(self.model, adapters, names) as params:
                return train(self.model, params, d.train, task=self.task, steps=cfg.local_steps,
                             batch_size=cfg.batch_size, lr=cfg.lr, gen=gen)

        def personal_phase() -> TrainResult:
            with active(self.model, BOTH, sets.personal_trainable) as params:
                return train(self.model, params, d.train, task=self.task, steps=cfg.personal_max_steps,
                             batch_size=cfg.batch_size, lr=cfg.personal_lr, gen=gen, val=d.val,
                             names=sets.personal_trainable, eval_every=cfg.personal_eval_every)

        schedule = self.preset.schedule
        if schedule == "shared-then-personal":  # pattern (a): personal adapter switched off
            return shared_phase(SHARED, sets.shared_trainable), personal_phase()
        if schedule == "joint":  # pattern (b): one optimizer over both parts
            return shared_phase(BOTH, sets.shared_trainable + sets.personal_trainable), TrainResult(0, float("nan"))
        if schedule == "personal-then-shared":  # FedRep: head first, then body
            personal = personal_phase()
            return shared_phase(BOTH, sets.shared_trainable), personal
        raise ValueError(f"unknown schedule {schedule!r}")

    def _load_personal(self) -> None:
        stored = self.store.load_personal()
        set_tensors(self.model, stored if stored is not None else self.init_keep)

    def _val_loss(self) -> float:
        if self.data.val.shape[0] == 0:
            return float("nan")
        with active(self.model, BOTH, ()):
            return mean_loss(self.model, self.data.val, task=self.task)

    def fit(self, shared: list[np.ndarray], *, server_round: int) -> tuple[list[np.ndarray], int, dict[str, object]]:
        """One federated round; returns (shared delta, number of training records, wire metrics)."""
        set_arrays(self.model, self.sets.send, shared)
        self._load_personal()
        before = self._val_loss()
        started = time.perf_counter()
        shared_res, personal_res = self._round(self._generator("fit", server_round))
        train_seconds = time.perf_counter() - started
        after = self._val_loss()
        delta = [new - old for new, old in zip(get_arrays(self.model, self.sets.send), shared, strict=True)]
        # Save the personal part and the bookkeeping BEFORE anything is sent.
        self.store.save_personal(get_tensors(self.model, self.sets.keep))
        meta = self.store.load_meta()
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        meta["last_round"] = server_round
        self.store.save_meta(meta)
        metrics: dict[str, object] = {
            "client-index": self.client_index, "keys-digest": keys_digest(self.sets.send),
            "train-loss": shared_res.mean_loss, "val-loss-before": before, "val-loss-after": after,
            "personal-best-step": personal_res.best_step, "skipped-files": self.data.skipped,
            "train-seconds": train_seconds,
        }
        return delta, self.data.num_train, metrics

    def evaluate(self, shared: list[np.ndarray]) -> dict[str, object]:
        """Held-out metrics of base, shared-only, shared+personal and local-only models."""
        held = self.data.heldout
        out: dict[str, object] = {"client-index": self.client_index, "num-heldout": int(held.shape[0]),
                                  "skipped-files": self.data.skipped}

        def record(variant: str, adapters: list[str] | None) -> None:
            if adapters is None:
                with self.model.disable_adapter():
                    scores = self.task.metrics(self.model, held)
            else:
                with active(self.model, adapters, ()):
                    scores = self.task.metrics(self.model, held)
            out.update({f"{variant}-{k}": v for k, v in scores.items()})

        record("base", None)
        set_arrays(self.model, self.sets.send, shared)
        set_tensors(self.model, self.init_keep)
        record("shared", SHARED)
        self._load_personal()
        record("personal", BOTH)
        # Local-only: the same schedule for as many rounds as this device trained, never averaged.
        set_arrays(self.model, self.sets.send, self.init_send)
        set_tensors(self.model, self.init_keep)
        for r in range(max(1, int(self.store.load_meta().get("rounds_trained", 0)))):
            self._round(self._generator("local", r))
        record("local", BOTH)
        return out
