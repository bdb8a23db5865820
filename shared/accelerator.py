"""Where a device computes: CPU or a CUDA GPU, and in which precision.

Selection is explicit and validated (a node asking for ``cuda:1`` on a machine without it
gets an error naming the setting, not a silent CPU run). Mixed precision: bf16 autocast
where the GPU supports it, else fp16 autocast on CUDA, none on CPU. DP-SGD phases run in
fp32 on every device: Opacus' per-sample clipping in reduced precision is not validated
here, and the privacy guarantee rests on the clipping being exact.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit systems


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only: musl and macOS have no mallopt to tune)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_heap(mib: int) -> bool:
    """Let this process keep up to ``mib`` MiB of freed heap instead of handing it back to the OS.

    glibc returns the top of the heap to the OS as soon as more than a (dynamic) threshold is
    free there, and serves blocks above another threshold with fresh ``mmap`` calls: a
    training step whose tensors change shape every step (DP-SGD's Poisson-sampled batches)
    then page-faults its memory in again at every step. Measured side by side: 4-11% of a
    plain text-task step on Poisson-sized batches against fixed ones with glibc's defaults,
    none with 64 MiB kept (docs/scale.md, "DP-SGD's own cost"). Sets glibc's trim threshold to
    ``mib``, its top pad to a quarter of it and its mmap threshold to 32 MiB (the most its
    dynamic rule would reach), so the process's resident memory may stay up to ``mib`` MiB above
    what it uses. ``0`` leaves glibc's defaults. Returns whether anything was set (False on a
    C library other than glibc)."""
    libc = _glibc() if mib > 0 else None
    if libc is None:
        return False
    keep = mib << 20
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, keep), (_M_TOP_PAD, keep // 4)))
