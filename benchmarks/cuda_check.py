"""One short check of the CUDA path of an edge device (run it where a GPU is available).

Prints the device selection, the autocast dtype, and one device round (DP-SGD shared
phase in fp32, personal phase and evaluation under autocast) on the GPU next to the same
round on the CPU, with the shared deltas' agreement. Exit code 1 if no GPU is visible.

    FEDPGEN_CACHE=/tmp/fedpgen-cache python benchmarks/cuda_check.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedpgen.client.device import Device
from fedpgen.shared.accelerator import autocast_dtype, select_device
from fedpgen.shared.config import RunConfig
from fedpgen.shared.population import ensure_population

SETTINGS = {"data": "synthetic", "num-users": 1, "min-records": 30, "pretrain-steps": 30, "seq-len": 64,
            "local-steps": 5, "personal-max-steps": 4, "personal-eval-every": 2, "dp": "sigma",
            "dp-noise-multiplier": 0.0, "dp-epsilon": 1000.0}


def one_round(device: str, run_dir: Path) -> tuple[list[np.ndarray], dict, float]:
    cfg = RunConfig.from_mapping({**SETTINGS, "run-dir": str(run_dir)})
    user = ensure_population(cfg)[0]
    torch.manual_seed(0)
    d = Device(cfg, user_dir=user, state_dir=run_dir / f"state-{device}", device=device, micro_batch=4)
    start = time.perf_counter()
    delta, _, _ = d.fit(d.init_send, server_round=1)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    shared = [a + b for a, b in zip(d.init_send, delta, strict=True)]
    return delta, d.evaluate(shared), seconds


def main() -> int:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
          f"devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    chosen = select_device("auto")
    print(f"select_device('auto') -> {chosen}; autocast dtype -> {autocast_dtype(chosen)}")
    if chosen.type != "cuda":
        print("no GPU visible: nothing more to check here")
        return 1
    print(f"GPU: {torch.cuda.get_device_name(chosen)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    with tempfile.TemporaryDirectory() as tmp:
        cpu_delta, cpu_eval, cpu_s = one_round("cpu", Path(tmp))
        gpu_delta, gpu_eval, gpu_s = one_round("cuda:0", Path(tmp))
    worst = max(float(np.abs(a - b).max()) for a, b in zip(cpu_delta, gpu_delta, strict=True))
    scale = max(float(np.abs(a).max()) for a in cpu_delta)
    print(f"device round (σ=0 DP shared phase, micro-batch 4): CPU {cpu_s:.2f} s, GPU {gpu_s:.2f} s")
    print(f"shared delta: max |CPU - GPU| = {worst:.3g} (max |delta| {scale:.3g})")
    for key in ("base-ppl", "shared-ppl", "personal-ppl"):
        print(f"{key}: CPU {cpu_eval[key]:.4f}  GPU (autocast) {gpu_eval[key]:.4f}")
    print("peak GPU memory: %.1f MiB" % (torch.cuda.max_memory_allocated() / 2**20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
