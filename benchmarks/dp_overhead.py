"""DP-SGD overhead for the text task's trainable parameters: prints a table, asserts nothing.

Step time and peak memory of the shared adapter's training with Opacus (hooks, Poisson
sampling, clip + noise) against the same loop without DP, measured side by side in one
run, in four modes: no DP; no DP on batches of Poisson-sampled size (what DP's varying
batch shapes cost by themselves: with glibc's malloc defaults, tensors whose shapes change
every step are page-faulted in again at every step, see ``--heap`` and docs/scale.md); DP as
devices run it (per-sample gradients captured by ``OutputGradHooks``,
shared/privacy/per_sample.py); and the same DP-SGD with Opacus' own ``GradSampleHooks``
(full backward hooks), the way FedPGen ran before. Timings interleave
the modes in repeated blocks (reversing their order every other block);
peak memory is measured in a fresh subprocess per mode (peak RSS above the process'
baseline after model load).

Three ratios: wall time per step; CPU time of this process per step (what the machine's
other jobs disturb least); and CPU time per *expected* batch — a DP batch is Poisson-sampled,
so a block of 20 steps draws 160 ± 13 records at batch 8 where the plain loop draws
exactly 160, and step time is close to linear in the records (measured: 4 / 8 / 12 / 16
records ≈ 31 / 57 / 86 / 113 ms): the per-record time × the batch size compares the same
work. Opening and closing a DP session (``make_private``, the hooks) is timed apart; a
device opens one per private phase per round.

    python benchmarks/dp_overhead.py [--steps 20] [--repeats 8] [--heap 0]   # 0: glibc's malloc defaults
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT))
    import torch

    from fedpgen.shared.accelerator import keep_freed_heap
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.model import build_model

    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({"data": "synthetic", **HEAP})
    keep_freed_heap(cfg.cpu_heap_keep_mib)  # as a device's ClientApp does (client/app.py)
    built = build_model(cfg)
    records = torch.randint(0, 256, (400, cfg.seq_len))
    return cfg, built, records


HEAP: dict[str, int] = {}  # --heap: cpu-heap-keep-mib for this run (else the config's default)

MODES = {"plain": "no DP", "poisson": "no DP, Poisson-sized batches", "dp": "DP (FedPGen)",
         "opacus": "DP (Opacus' hooks)"}


def _run(cfg, built, records, *, mode: str, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """One training phase of ``steps`` steps: wall and CPU seconds per step, and the records drawn.

    ``mode``: plain (no DP), poisson (no DP, but batches of Poisson-sampled size, as DP draws
    them: what varying shapes alone cost), dp (FedPGen's DP-SGD as devices run it:
    ``OutputGradHooks``) or opacus (the same DP-SGD with Opacus' own ``GradSampleHooks``, i.e.
    full backward hooks)."""
    import torch
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    from fedpgen.shared.adapters import active
    from fedpgen.shared.privacy.mechanism import DPSession, NoPrivacy, PlainSession, RecordDP
    from fedpgen.shared.training import train

    dp = mode in ("dp", "opacus")
    privacy = RecordDP(noise_multiplier=1.0, clip=1.0, accountant="prv", history=[]) if dp else NoPrivacy()
    drawn = [0]
    original, hooks_class, plain_batch = DPSession.next_batch, DPSession.hooks_class, PlainSession.next_batch

    def counted(self):  # type: ignore[no-untyped-def]
        batch = original(self)
        drawn[0] += batch.shape[0]
        return batch

    def poisson(self):  # type: ignore[no-untyped-def]
        n = self.records.shape[0]
        batch = self.records[torch.rand(n, generator=self.gen) < min(1.0, self.batch_size / n)]
        drawn[0] += batch.shape[0]
        return batch

    DPSession.next_batch = counted  # type: ignore[method-assign]
    if mode == "poisson":
        PlainSession.next_batch = poisson  # type: ignore[method-assign]
    if mode == "opacus":
        DPSession.hooks_class = GradSampleHooks
    try:
        with active(built.model, ["shared"], built.sets.shared_trainable) as params, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # LoRA inputs need no grad
            wall, cpu = time.perf_counter(), time.process_time()
            train(built.model, params, records, task=built.task, steps=steps, batch_size=cfg.batch_size, lr=1e-3,
                  gen=torch.Generator().manual_seed(0), privacy=privacy)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        DPSession.next_batch, DPSession.hooks_class = original, hooks_class  # type: ignore[method-assign]
        PlainSession.next_batch = plain_batch  # type: ignore[method-assign]
    records_drawn = drawn[0] if mode != "plain" else steps * min(cfg.batch_size, records.shape[0])
    return {"wall": wall / steps, "cpu": cpu / steps, "cpu per batch": cpu / records_drawn * cfg.batch_size}


def _session_cost(cfg, built, records, *, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds to open and close one DP session (no step), median of ``repeats``."""
    import torch

    from fedpgen.shared.adapters import active
    from fedpgen.shared.privacy.mechanism import RecordDP

    times = []
    for _ in range(repeats):
        privacy = RecordDP(noise_multiplier=1.0, clip=1.0, accountant="prv", history=[])
        with active(built.model, ["shared"], built.sets.shared_trainable) as params:
            built.model.train()  # as the training loop does before it opens a session
            start = time.process_time()
            privacy.open(built.model, params, records, batch_size=cfg.batch_size, lr=1e-3,
                         gen=torch.Generator()).close()
            times.append(time.process_time() - start)
            built.model.eval()
    return statistics.median(times)


def memory(mode: str, steps: int) -> None:
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
    _run(cfg, built, records, mode=mode, steps=steps)
    done.set()
    thread.join()
    print(json.dumps({"peak_kib": (peak[0] - base) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--heap", type=int, help="cpu-heap-keep-mib (default: the run config's; 0 = glibc's "
                        "defaults)")
    parser.add_argument("--memory", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heap is not None:
        HEAP["cpu-heap-keep-mib"] = args.heap
    if args.memory:
        memory(args.memory, args.steps)
        return
    from rich.console import Console
    from rich.table import Table

    cfg, built, records = _setup()
    for mode in MODES:  # warm-up every path
        _run(cfg, built, records, mode=mode, steps=5)
    times: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in (list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]):
            times[mode].append(_run(cfg, built, records, mode=mode, steps=args.steps))
    session = _session_cost(cfg, built, records, repeats=5)
    mem = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--memory", mode, "--steps", "10",
                              *(["--heap", str(args.heap)] if args.heap is not None else [])], capture_output=True,
                             text=True, check=True).stdout
        mem[mode] = json.loads(out.strip().splitlines()[-1])["peak_kib"]

    def med(mode: str, key: str) -> float:
        return statistics.median(t[key] for t in times[mode])

    trainable = sum(p.numel() for n, p in built.model.named_parameters() if n in built.sets.shared_trainable)
    table = Table(title=f"DP-SGD overhead, text task, shared adapter ({trainable} trainable parameters), "
                        f"batch {cfg.batch_size} x {cfg.seq_len}, 1 thread, cpu-heap-keep-mib {cfg.cpu_heap_keep_mib}")
    for col in ("", *MODES.values(), "ratio DP / no DP", "of it: Poisson sizes alone", "ratio (Opacus' hooks)"):
        table.add_column(col, justify="right")

    def ratios(got: dict[str, float]) -> tuple[str, str, str]:
        return tuple(f"{got[m] / max(got['plain'], 1e-12):.2f}x" for m in ("dp", "poisson", "opacus"))

    for key, label in (("wall", "wall time per step"), ("cpu", "CPU time per step"),
                       ("cpu per batch", "CPU time per expected batch (same records)")):
        got = {mode: med(mode, key) for mode in MODES}
        table.add_row(f"{label} (ms, median of {args.repeats} blocks)", *(f"{v * 1e3:.1f}" for v in got.values()),
                      *ratios(got))
    table.add_row("opening + closing a DP session (ms of CPU, once per phase)",
                  *(f"{session * 1e3:.1f}" if m == "dp" else "" for m in MODES), "", "", "")
    table.add_row("peak RSS while training, above the loaded model (MiB)", *(f"{mem[m] / 1024:.1f}" for m in MODES),
                  *ratios(mem))
    Console(width=160).print(table)
    Console().print("DP batches are Poisson-sampled (expected size = batch size); 'of it: Poisson sizes alone' is "
                    "the same plain training on batches of those sizes. Target (issue 14): DP / no DP <= 1.15x.")


if __name__ == "__main__":
    main()
