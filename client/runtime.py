"""The resident device runtime: the model built once per (process, run config), reused by every message.

Building the base model with its adapters (and importing what that needs) was most of a
round's cost for a device that trains a few steps (docs/scale.md). A simulation worker or a
long-running ClientApp process keeps one ``Runtime`` and lends it to one message at a time.
Each lease starts from the state a fresh build has — nothing one user trained can reach the
next user's round:

* every adapter parameter and every buffer is restored to its value at build time;
* gradients and every attribute Opacus (or anything else) attached to a parameter or a
  module are removed; the optimizer and the DP session are per phase anyway
  (``shared/privacy/mechanism.py``) and so is the DP noise generator (fresh OS entropy);
* a model that still carries a hook it did not have at build time (a DP session that could
  not clean up) is thrown away and built again.

``tests/test_runtime.py`` holds it to this: two users trained one after the other by one
runtime give bit-identical deltas and personal parts to two fresh builds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch

from fedpgen.shared.accelerator import select_device
from fedpgen.shared.adapters import get_tensors, set_tensors
from fedpgen.shared.config import RunConfig
from fedpgen.shared.model import Built, build_model

log = logging.getLogger(__name__)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hook_counts(model: torch.nn.Module) -> list[int]:
    return [len(getattr(m, name, {})) for m in model.modules() for name in _HOOK_DICTS]


class Runtime:
    """One built model and the snapshot that resets it for the next user."""

    def __init__(self, cfg: RunConfig, device: str = "cpu") -> None:
        self.device = select_device(device)
        self.built: Built = build_model(cfg)
        self.built.model.to(self.device)
        model, sets = self.built.model, self.built.sets
        self.adapter_names = tuple(dict.fromkeys((*sets.send, *sets.keep, *sets.shared_trainable,
                                                  *sets.personal_trainable)))
        self._params = get_tensors(model, self.adapter_names)
        self._buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self._param_attrs = {n: set(vars(p)) for n, p in model.named_parameters()}
        self._module_attrs = {n: set(vars(m)) for n, m in model.named_modules()}
        self._hooks = _hook_counts(model)

    def clean(self) -> bool:
        """Whether the model carries exactly the hooks it was built with."""
        return _hook_counts(self.built.model) == self._hooks

    def reset(self) -> None:
        """Back to the state of a fresh build (see the module docstring)."""
        model = self.built.model
        with torch.no_grad():
            set_tensors(model, self._params)
            for name, buf in model.named_buffers():
                buf.copy_(self._buffers[name])
        for name, param in model.named_parameters():
            param.grad = None
            param.requires_grad_(False)
            for attr in set(vars(param)) - self._param_attrs[name]:
                delattr(param, attr)
        for name, module in model.named_modules():
            for attr in set(vars(module)) - self._module_attrs[name]:
                delattr(module, attr)
        model.eval()


class _Slot:
    """One resident runtime per process: the newest (run config, device) wins, one lease at a time."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.runtime: Runtime | None = None
        self.lock = threading.Lock()


_SLOT = _Slot()


@contextlib.contextmanager
def lease(cfg: RunConfig, device: str = "cpu") -> Iterator[Runtime]:
    """The process's resident runtime for ``cfg``, reset for one message; built on first use.

    A second concurrent message in the same process gets a fresh runtime of its own (never
    a model another user is training). ``FEDPGEN_RESIDENT_RUNTIME=0`` in the environment builds
    a fresh model for every message, as before the runtime existed (benchmarks/scale.py
    measures both side by side)."""
    if os.environ.get("FEDPGEN_RESIDENT_RUNTIME") == "0" or not _SLOT.lock.acquire(blocking=False):
        yield Runtime(cfg, device)
        return
    try:
        key = (cfg.model_hash(), device)
        if _SLOT.key != key or _SLOT.runtime is None or not _SLOT.runtime.clean():
            if _SLOT.runtime is not None and _SLOT.key == key:
                log.warning("the resident model carries a hook it was not built with: building it again")
            _SLOT.key, _SLOT.runtime = None, None  # the old model is freed before the new one is built
            _SLOT.runtime, _SLOT.key = Runtime(cfg, device), key
        _SLOT.runtime.reset()
        yield _SLOT.runtime
    finally:
        _SLOT.lock.release()


def drop() -> None:
    """Forget the resident runtime (tests; a process that changes runs frees the old one by itself)."""
    with _SLOT.lock:
        _SLOT.key, _SLOT.runtime = None, None
