"""DP-SGD overhead for the text task's trainable parameters: prints a table, asserts nothing.

Step time and peak memory of the shared adapter's training with Opacus (hooks, Poisson
sampling, clip + noise) against the same loop without DP, measured side by side in one
run: timings interleave the two modes in repeated blocks; peak memory is measured in a
fresh subprocess per mode (peak RSS above the process' baseline after model load).

    python benchmarks/dp_overhead.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT))
    import torch

    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.model import build_model

    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({"data": "synthetic"})
    built = build_model(cfg)
    records = torch.randint(0, 256, (400, cfg.seq_len))
    return cfg, built, records


def _run(cfg, built, records, *, dp: bool, steps: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    from fedpgen.shared.adapters import active
    from fedpgen.shared.privacy.mechanism import NoPrivacy, RecordDP
    from fedpgen.shared.training import train

    privacy = RecordDP(noise_multiplier=1.0, clip=1.0, accountant="prv", history=[]) if dp else NoPrivacy()
    with active(built.model, ["shared"], built.sets.shared_trainable) as params:
        start = time.perf_counter()
        train(built.model, params, records, task=built.task, steps=steps, batch_size=cfg.batch_size, lr=1e-3,
              gen=torch.Generator().manual_seed(0), privacy=privacy)
        return (time.perf_counter() - start) / steps


def memory(dp: bool, steps: int) -> None:
    """Peak RSS while training, above the RSS right before it (model loaded), sampled every 2 ms."""
    import psutil

    cfg, built, records = _setup()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _run(cfg, built, records, dp=dp, steps=steps)
    done.set()
    thread.join()
    print(json.dumps({"peak_kib": (peak[0] - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", choices=["dp", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        memory(args.memory == "dp", args.steps)
        return
    from rich.console import Console
    from rich.table import Table

    cfg, built, records = _setup()
    _run(cfg, built, records, dp=False, steps=5)  # warm-up both paths
    _run(cfg, built, records, dp=True, steps=5)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for dp in (False, True):
            times[dp].append(_run(cfg, built, records, dp=dp, steps=args.steps))
    mem = {}
    for mode in ("plain", "dp"):
        out = subprocess.run([sys.executable, __file__, "--memory", mode, "--steps", "10"], capture_output=True,
                             text=True, check=True).stdout
        mem[mode] = json.loads(out.strip().splitlines()[-1])["peak_kib"]
    plain, dp = statistics.median(times[False]), statistics.median(times[True])
    trainable = sum(p.numel() for n, p in built.model.named_parameters() if n in built.sets.shared_trainable)
    table = Table(title=f"DP-SGD overhead, text task, shared adapter ({trainable} trainable parameters), "
                        f"batch {cfg.batch_size} x {cfg.seq_len}, 1 thread")
    for col in ("", "no DP", "DP (Opacus hooks)", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("step time (ms, median of repeats)", f"{plain * 1e3:.1f}", f"{dp * 1e3:.1f}", f"{dp / plain:.2f}x")
    table.add_row("peak RSS while training, above the loaded model (MiB)", f"{mem['plain'] / 1024:.1f}", f"{mem['dp'] / 1024:.1f}",
                  f"{mem['dp'] / max(mem['plain'], 1):.2f}x")
    Console(width=120).print(table)
    Console().print("DP batches are Poisson-sampled (expected size = batch size); target: time ratio <= 1.2x.")


if __name__ == "__main__":
    main()
