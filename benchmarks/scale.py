"""Scaling benchmark: prints a table; asserts nothing (numbers are measured, not claimed).

The workload of issue 14: synthetic text users (``--task behavior``: synthetic interaction
logs of 240-360 events), 5 shared + 5 personal steps per round,
SecAgg+ off, 2 rounds; per setting (registered users × sampled per round) it reports:

* population build time and disk (user folders; the sealed state-dirs of the devices that
  trained), both measured once per registered size and reused by later settings;
* round 1 and round 2: devices sampled, round seconds; updates/s of round 2 (steady state);
* compute share = Σ device training seconds / (round seconds × concurrent devices) and the
  overhead core-seconds per update = (round seconds × concurrent devices − Σ training
  seconds) / updates, of round 2;
* peak RSS of the whole process tree (the driver and every Ray worker);
* KiB sent up per device against the model's KiB.

``--resident both`` runs each setting twice, side by side in one invocation: with the
resident device runtime (client/runtime.py) and with a model built per message
(``FEDPGEN_RESIDENT_RUNTIME=0``, the behaviour before it). ``benchmarks/plain_flower.py``
gives the plain-Flower ratio.

    python benchmarks/scale.py                                 # 1,000 / 10,000 registered × 100 sampled
    python benchmarks/scale.py --settings 100000x100 1000x1000 --resident on
    python benchmarks/scale.py --task behavior --settings 100000x100 --resident on
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = {"data": "synthetic", "min-records": 30, "num-server-rounds": 2, "local-steps": 5,
            "personal-max-steps": 5, "personal-eval-every": 5, "secure-aggregation": False}


def du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def process_label(p) -> str:  # type: ignore[no-untyped-def]
    """A short name for a process of the run's tree: what it runs, not its arguments."""
    if p.pid == os.getpid():
        return "launcher"
    if p.name().startswith("ray::"):
        return "ray worker"
    cmd = p.cmdline()
    if cmd and "python" in Path(cmd[0]).name:  # a Python script: the script, not the interpreter
        cmd = [w for w in cmd[1:] if not w.startswith("-")]
    name = Path(cmd[0]).name if cmd else ""
    return name if name and " " not in name else p.name()  # python -c CODE: the process' name


def peak_rss_sampler() -> tuple[list[int], threading.Event, dict[str, float]]:
    """Peak RSS of this process and all its descendants, every 0.5 s; and, at that peak, MiB per kind
    of process (``process_label``)."""
    import psutil

    peak, stop, at_peak = [0], threading.Event(), {}

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            total, parts = 0, {}
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    label = process_label(p)
                except psutil.Error:
                    continue
                total += rss
                parts[label] = parts.get(label, 0.0) + rss / 2**20
            if total > peak[0]:
                peak[0] = total
                at_peak.clear()
                at_peak.update({k: round(v) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])})
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    return peak, stop, at_peak


def workload(task: str) -> dict[str, object]:
    """The benchmark workload for ``task``; behavior users keep simulations/behavior.toml's shape
    (20-30 records of 12 events: 240-360 events per user)."""
    shape = {"seq-len": 12, "min-records": 20} if task == "behavior" else {}
    return {**WORKLOAD, "task": task, **shape}


def population_dir(work: Path, task: str, registered: int) -> Path:
    """Each task's population once per size (text keeps the folder name of earlier runs)."""
    return work / (f"users-{registered}" if task == "text" else f"users-{task}-{registered}")


def run_plain(registered: int, sampled: int, work: Path, out: Path, task: str) -> None:
    """Inner mode: the plain-Flower reference (benchmarks/plain_flower.py) on the same population."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))  # Ray's workers import the plain app from here too
    from plain_flower import run
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.data.user_folder import list_user_dirs

    cfg = RunConfig.from_mapping({**workload(task), "num-users": registered, "dp": "off",
                                  "run-dir": str(work / "plain")})
    rounds = run(cfg, list_user_dirs(population_dir(work, task, registered)), registered, sampled)
    r2 = next(r for r in rounds if r["round"] == 2)
    concurrency = max(1, int((os.cpu_count() or 1) / cfg.client_cpus))
    out.write_text(json.dumps({"round 1 devices": rounds[0]["clients"], "round 2 devices": r2["clients"],
                               "round 1 s": rounds[0]["seconds"], "round 2 s": r2["seconds"],
                               "updates/s": r2["clients"] / r2["seconds"],
                               "compute share": r2["train-seconds"] / (r2["seconds"] * concurrency),
                               "overhead core-s/update": (r2["seconds"] * concurrency - r2["train-seconds"])
                               / r2["clients"]}))


def build_population(registered: int, work: Path, task: str) -> None:
    """Inner mode: write the synthetic population of ``registered`` users once (its time and disk)."""
    sys.path.insert(0, str(ROOT))
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.population import ensure_population

    users = population_dir(work, task, registered)
    cfg = RunConfig.from_mapping({**workload(task), "num-users": registered, "run-dir": str(work / "build")})
    started = time.perf_counter()
    ensure_population(cfg)
    build = {"build s": time.perf_counter() - started}
    shutil.rmtree(users, ignore_errors=True)
    (work / "build" / "users").rename(users)
    build["users GiB"] = du(users) / 2**30
    (work / f"build-{users.name}.json").write_text(json.dumps(build))


def run_one(registered: int, sampled: int, work: Path, out: Path, dp: str, task: str) -> None:
    """Inner mode: one simulation in this process (a fresh Ray), peak RSS sampled from a thread."""
    from rich.console import Console

    sys.path.insert(0, str(ROOT))
    from fedpgen.simulate import simulate
    from fedpgen.server.results import read_jsonl
    from fedpgen.shared.config import RunConfig

    users = population_dir(work, task, registered)
    cfg = RunConfig.from_mapping({**workload(task), "num-users": registered, "fraction-fit": sampled / registered,
                                  "min-fit-clients": sampled, "eval-fraction": min(1.0, 4 / registered), "dp": dp,
                                  "run-dir": str(work / "run")})
    if not (users / "population.json").is_file():  # the population once per size; later settings reuse it
        # Built in a process of its own: this one is the launcher, whose memory the run's peak includes
        subprocess.run([sys.executable, __file__, "--build", str(registered), "--task", task, "--work", str(work)],
                       check=True)
    build = json.loads((work / f"build-{users.name}.json").read_text())
    shutil.rmtree(work / "run", ignore_errors=True)
    (work / "run").mkdir()
    (work / "run" / "users").symlink_to(users)
    peak, stop, at_peak = peak_rss_sampler()
    simulate(cfg, fresh=True, console=Console(file=open(os.devnull, "w")))
    stop.set()
    from fedpgen.shared.model import build_model

    rounds = [r for r in read_jsonl(work / "run" / "rounds.jsonl") if "seconds" in r]
    clients = read_jsonl(work / "run" / "client_rounds.jsonl")
    model = build_model(cfg).model
    concurrency = max(1, int((os.cpu_count() or 1) / cfg.client_cpus))

    def of_round(r: int) -> dict[str, float]:
        row = next(x for x in rounds if x["round"] == r)
        mine = [c for c in clients if c["round"] == r]
        core_s = row["seconds"] * concurrency
        train = sum(c["train-seconds"] for c in mine)
        return {"clients": row["clients"], "seconds": row["seconds"], "updates/s": len(mine) / row["seconds"],
                "share": train / core_s, "overhead": (core_s - train) / len(mine),
                "KiB up": sum(c["bytes-up"] for c in mine) / len(mine) / 1024}

    r1, r2 = of_round(1), of_round(2)
    result = {"round 1 devices": r1["clients"], "round 2 devices": r2["clients"], "round 1 s": r1["seconds"],
              "round 2 s": r2["seconds"], "updates/s": r2["updates/s"], "compute share": r2["share"],
              "overhead core-s/update": r2["overhead"], "peak RSS GiB": peak[0] / 2**30,
              "peak RSS MiB by process": at_peak, **build,
              "states GiB": du(work / "run" / "devices") / 2**30, "KiB up/device": r2["KiB up"],
              "model KiB": sum(p.numel() * p.element_size() for p in model.parameters()) / 1024}
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="*", default=["1000x100", "10000x100"],
                        help="REGISTEREDxSAMPLED per setting")
    parser.add_argument("--resident", choices=["on", "off", "both"], default="both")
    parser.add_argument("--dp", choices=["epsilon", "off"], default="epsilon", help="record-level DP-SGD")
    parser.add_argument("--task", choices=["text", "behavior"], default="text", help="the synthetic population")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-scale",
                        help="populations (reused across invocations) and the run folder")
    parser.add_argument("--plain", action="store_true",
                        help="also FedPGen with dp off and a minimal plain Flower app (benchmarks/plain_flower.py), "
                             "side by side: the plain-Flower ratio")
    parser.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--inner-plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_population(args.build, args.work, args.task)
        return
    if args.inner:
        registered, sampled, out = args.inner
        if args.inner_plain:
            run_plain(int(registered), int(sampled), args.work, Path(out), args.task)
        else:
            run_one(int(registered), int(sampled), args.work, Path(out), args.dp, args.task)
        return
    from rich.console import Console
    from rich.table import Table

    modes = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.resident]
    args.work.mkdir(parents=True, exist_ok=True)
    cols = ["round 1 devices", "round 2 devices", "round 1 s", "round 2 s", "updates/s", "compute share",
            "overhead core-s/update", "peak RSS GiB", "build s", "users GiB", "states GiB", "KiB up/device",
            "model KiB"]
    table = Table(title=f"FedPGen scaling: synthetic {args.task} users, 5 + 5 steps, SecAgg+ off, dp={args.dp}, "
                        f"{os.cpu_count()} cores")
    for c in ["registered", "sampled", "resident runtime", *cols]:
        table.add_column(c, justify="right")
    ratios = []
    for setting in args.settings:
        registered, sampled = (int(x) for x in setting.lower().split("x"))
        runs = [(mode, args.dp, False) for mode in modes]
        if args.plain:  # FedPGen without DP next to plain Flower: the same work, no privacy machinery
            runs += [("on", "off", False), ("plain Flower", "off", True)]
        found = {}
        for mode, dp, plain in runs:
            label = f"{mode}, dp={dp}"
            out = args.work / f"result-{args.task}-{setting}-{mode}-{dp}.json".replace(" ", "-")
            env = {**os.environ, "FEDPGEN_RESIDENT_RUNTIME": "0" if mode == "off" else "1"}
            with (args.work / f"log-{out.stem}.txt").open("w") as log:
                subprocess.run([sys.executable, __file__, "--inner", str(registered), str(sampled), str(out),
                                "--work", str(args.work), "--dp", dp, "--task", args.task,
                                *(["--inner-plain"] if plain else [])],
                               check=True, env=env, stdout=subprocess.DEVNULL, stderr=log)
            found[label] = r = json.loads(out.read_text())
            table.add_row(str(registered), str(sampled), label,
                          *(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
            Console(width=220).print(table)
            if r.get("peak RSS MiB by process"):
                ratios.append(f"{setting} {label}: at the peak, MiB by process: "
                              + ", ".join(f"{k} {v}" for k, v in r["peak RSS MiB by process"].items()))
        if args.plain:
            fed, plain = found["on, dp=off"], found["plain Flower, dp=off"]
            ratios.append(f"{setting}: FedPGen (dp off, SecAgg+ off) round 2 / plain Flower round 2 = "
                          f"{fed['round 2 s']:.1f} / {plain['round 2 s']:.1f} s = "
                          f"{fed['round 2 s'] / plain['round 2 s']:.2f}x")
    for line in ratios:
        Console().print(line)
    Console().print("Round 2 is the steady state (round 1 also starts Ray's workers). compute share = Σ training "
                    "seconds / (round seconds × concurrent devices); overhead = the rest, per update.")


if __name__ == "__main__":
    main()
