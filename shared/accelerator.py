"""Where a device computes: CPU or a CUDA GPU, and in which precision.

Selection is explicit and validated (a node asking for ``cuda:1`` on a machine without it
gets an error naming the setting, not a silent CPU run). Mixed precision: bf16 autocast
where the GPU supports it, else fp16 autocast on CUDA, none on CPU. DP-SGD phases run in
fp32 on every device: Opacus' per-sample clipping in reduced precision is not validated
here, and the privacy guarantee rests on the clipping being exact.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

DEVICE_SPECS = "auto | cpu | cuda | cuda:N"


def select_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ``cpu``; ``cuda`` / ``cuda:N``
    (an error when that GPU is not there)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise ValueError(f"node config 'device': {spec!r} is invalid; valid: {DEVICE_SPECS}")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ValueError(f"node config 'device': {spec!r} but CUDA is not available on this machine "
                         "(torch build without CUDA, or no driver); use 'auto' or 'cpu'")
    if index >= torch.cuda.device_count():
        raise ValueError(f"node config 'device': {spec!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device``: bf16 if the GPU supports it, else fp16 on CUDA; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def precision(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (no-op when ``dtype`` is None)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
