"""Scaling benchmark: prints a table; asserts nothing (numbers are measured, not claimed).

For 10, 100 and 1000 simulated users (a sampled fraction per round for the large ones):
client-updates per second, peak RSS of the whole simulation (main process + Ray workers),
the share of round wall time spent in local training, and bytes sent per client per round
against the full model's size. Each size runs in a fresh process (a fresh Ray).

    python benchmarks/scale.py                 # all sizes
    python benchmarks/scale.py --sizes 10 100  # some
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {10: 1.0, 100: 0.2, 1000: 0.02}  # users -> fraction-fit (20 clients per round for the large ones)


def run_one(users: int, fraction: float, out: Path) -> None:
    """Inner mode: one simulation in this process, peak RSS sampled from a thread."""
    import psutil
    from rich.console import Console

    sys.path.insert(0, str(ROOT))
    from fedpgen.simulate import simulate
    from server.results import read_jsonl
    from shared.config import RunConfig
    from shared.model import build_model

    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total)
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    cfg = RunConfig.from_mapping({
        "data": "synthetic", "num-users": users, "min-records": 30, "num-server-rounds": 2,
        "fraction-fit": fraction, "local-steps": 5, "personal-max-steps": 5, "personal-eval-every": 5,
        "eval-fraction": min(1.0, 4 / users), "run-dir": str(out / f"run-{users}"),
        "secure-aggregation": False,  # plain uploads: their size is measured here; SecAgg+: benchmarks/secagg.py
    })
    simulate(cfg, fresh=True, console=Console(file=open(os.devnull, "w")))
    stop.set()
    rounds = read_jsonl(Path(cfg.run_dir) / "rounds.jsonl")
    clients = read_jsonl(Path(cfg.run_dir) / "client_rounds.jsonl")
    model = build_model(cfg).model
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fit_seconds = sum(r["seconds"] for r in rounds)
    concurrency = max(1, int((os.cpu_count() or 1) / cfg.client_cpus))
    result = {
        "users": users, "clients/round": rounds[0]["clients"], "updates": len(clients),
        "updates/s": len(clients) / fit_seconds,
        "peak RSS GiB": peak[0] / 2**30,
        "training share": sum(c["train-seconds"] for c in clients) / concurrency / fit_seconds,
        "KiB up/client/round": sum(c["bytes-up"] for c in clients) / len(clients) / 1024,
        "model KiB": full_bytes / 1024,
    }
    (out / f"result-{users}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        run_one(args.inner, SIZES.get(args.inner, 20 / args.inner), args.out)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="FedPGen scaling (text task, synthetic users, 2 rounds, 5+5 local steps)")
    cols = ["users", "clients/round", "updates", "updates/s", "peak RSS GiB", "training share",
            "KiB up/client/round", "model KiB"]
    for c in cols:
        table.add_column(c, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for users in args.sizes:
            subprocess.run([sys.executable, __file__, "--inner", str(users), "--out", tmp], check=True,
                           stdout=subprocess.DEVNULL)
            r = json.loads((Path(tmp) / f"result-{users}.json").read_text())
            table.add_row(*(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    Console(width=140).print(table)
    Console().print("updates/s = client updates / summed round wall time; training share = summed device "
                    "training time / concurrent clients / round wall time; model KiB = base + adapters, float32.")


if __name__ == "__main__":
    main()
