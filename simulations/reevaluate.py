"""Re-evaluate a finished simulation on the same users, with other personal-fit settings.

Flower samples the users of a run's final evaluation anew in every run, so two runs' tables
differ in who was evaluated as well as in what was changed; a few users either way is the
size of the effects a personal-fit setting has. This script takes a finished run — its final
shared base (the newest checkpoint, checked against the run's config), its users' folders and
device states, and the users its four-way evaluation chose (``clients.csv``) — and evaluates
exactly those users again, four-way (``client/evaluation.py``), with only the keys of the
personal fit and of the evaluation changed: everything that made the shared base stays, so
nothing here is a new federated run and nothing is sent anywhere. It prints the run's own
numbers and the new ones side by side: medians, and per user shared+personal against
shared-only and local-only (the goal's count: README, "Does federation pay off under DP?").

``--users OTHER`` evaluates the users another run of the same population evaluated instead
(e.g. two cohort sizes' shared bases compared on the same users).

The copy under ``--out`` holds the new ``clients.csv`` and ``config.json`` and the evaluated
devices' states (simulation only: one machine holds every simulated device's key; the run's
own folder is never written).

    python simulations/reevaluate.py --run runs/dp_sweep/text_cohort-user/eps-8 \\
        --set personal-max-steps=60 --set personal-lr=0.0015 --out runs/reevaluate/steps60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dp_sweep import VARIANTS, better_than_both, head_to_head, tie_free  # noqa: E402

# What a re-evaluation may change: the final fit of the personal part and the evaluation
# (client/evaluation.py); everything else made the shared base, or is privacy, and stays.
REEVALUABLE = frozenset({"personal-lr", "personal-max-steps", "personal-eval-every", "personal-batch-size",
                         "personal-folds", "personal-refit", "history-mix", "history-mix-fit"})
# What makes a population and its users' held-out records: two runs agreeing on these have the
# same users at the same indices (``--users``: another run's evaluated users).
POPULATION_KEYS = ("task", "data", "data-dir", "num-users", "min-records", "seq-len", "seed", "heldout-fraction",
                   "val-fraction")


def new_config(run: Path, sets: dict[str, str]) -> dict[str, Any]:
    """The run's config with ``sets`` applied; a key outside :data:`REEVALUABLE` is refused."""
    from fedpgen.shared.config import RunConfig

    refused = sorted(set(sets) - REEVALUABLE)
    if refused:
        raise ValueError(f"cannot re-evaluate with {', '.join(refused)} changed: it would change the shared base "
                         f"or the privacy of a finished run (run it again instead); valid: {', '.join(sorted(REEVALUABLE))}")
    values = {**json.loads((run / "config.json").read_text()), **sets}
    return RunConfig.from_mapping(values).to_toml_dict()  # validated: a bad value is refused here


def _evaluate(job: tuple[dict[str, Any], dict[str, Any], str, str, int]) -> dict[str, Any]:
    """One user's four-way evaluation with the new config on the run's final shared base."""
    import torch

    from fedpgen.client.device import Device
    from fedpgen.client.node import population
    from fedpgen.client.runtime import lease
    from fedpgen.server import checkpoint
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.population import population_dir, state_dir

    run_values, values, run, out, index = job
    torch.set_num_threads(1)
    run_cfg, cfg = RunConfig.from_mapping(run_values), RunConfig.from_mapping({**values, "run-dir": out})
    user = population(population_dir(run_cfg))[index]
    with lease(cfg) as runtime:  # the process's resident model, reset for this user (as in a simulation)
        device = Device(cfg, user_dir=user, state_dir=state_dir(cfg, user), client_index=index, runtime=runtime)
        ckpt = checkpoint.latest(Path(run) / "checkpoints", config_hash=run_cfg.model_hash(), names=device.sets.send)
        if ckpt is None:
            raise FileNotFoundError(f"{run}/checkpoints: no checkpoint, so no final shared base to evaluate")
        return device.evaluate(ckpt.theta, four_way=True)


def evaluated_users(run: Path, users: Path | None) -> list[int]:
    """The users ``run`` evaluated, or those of ``users`` (another run of the same population)."""
    from fedpgen.server.results import read_clients

    source = users or run
    if users is not None:
        mine, theirs = (json.loads((f / "config.json").read_text()) for f in (run, users))
        differ = [k for k in POPULATION_KEYS if mine.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"{users} is another population ({', '.join(differ)} differ): its users are not {run}'s")
    indices = sorted(int(c["client-index"]) for c in read_clients(source))
    if not indices:
        raise FileNotFoundError(f"{source}/clients.csv: no evaluated users (a finished four-way run has them)")
    return indices


def reevaluate(run: Path, sets: dict[str, str], out: Path, *, workers: int,
               users: Path | None = None) -> list[dict[str, Any]]:
    """Evaluate the users of ``run``'s ``clients.csv`` (or of ``users``') again with ``sets``;
    writes ``out``. ``workers`` processes (1: in this process)."""
    from rich.progress import track

    from fedpgen.client.node import population
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.population import population_dir, state_dir

    if out.resolve() == run.resolve():
        raise ValueError("--out must differ from --run: the run's own folder is never written")
    run_values = {**json.loads((run / "config.json").read_text()), "run-dir": str(run)}  # where it is now
    values = new_config(run, sets)
    indices = evaluated_users(run, users)
    run_cfg = RunConfig.from_mapping(run_values)
    folders = population(population_dir(run_cfg))
    for index in indices:  # the evaluated devices' sealed states, copied (the run's stay as they were)
        src, dst = state_dir(run_cfg, folders[index]), out / "devices" / folders[index].name
        shutil.rmtree(dst, ignore_errors=True)
        if src.is_dir():
            shutil.copytree(src, dst)
    jobs = [(run_values, values, str(run), str(out), i) for i in indices]
    if workers <= 1:
        rows = [_evaluate(job) for job in track(jobs, description="re-evaluating")]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            rows = list(track(pool.imap(_evaluate, jobs), total=len(jobs), description="re-evaluating"))
    write_rows(out, rows, values)
    return rows


def write_rows(out: Path, rows: list[dict[str, Any]], values: dict[str, Any]) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True))
    with (out / "clients.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted(set().union(*rows)))
        writer.writeheader()
        writer.writerows(rows)


def summary(folder: Path) -> dict[str, Any]:
    """Medians of the primary metric and the per-user counts of one evaluated folder."""
    from fedpgen.server.results import read_clients
    from fedpgen.shared.tasks.registry import task_info

    info = task_info(json.loads((folder / "config.json").read_text())["task"])
    metric, higher = info.primary, info.higher_is_better
    clients = read_clients(folder)
    judged = tie_free(folder) or (metric, higher)
    return {"median": {v: statistics.median(float(c[f"{v}-{metric}"]) for c in clients) for v, _ in VARIANTS},
            "vs-shared": head_to_head(folder, metric, higher, "personal", "shared"),
            "vs-local": head_to_head(folder, *judged, "personal", "local"),
            "both": better_than_both(folder, *judged), "metric": metric, "judged": judged[0]}


def print_side_by_side(source: Path, run: Path, out: Path, sets: dict[str, str]) -> None:
    """``source``'s own numbers (the run whose users were evaluated) and the re-evaluation's."""
    from rich.console import Console
    from rich.table import Table

    a, b = summary(source), summary(out)
    changed = ", ".join(f"{k}={v}" for k, v in sets.items()) or "its own settings"
    table = Table(title=f"the same {b['both'][1]} users: {source}; {run}'s shared base with {changed}")
    for col in ("", *(label for _, label in VARIANTS), "pers vs shared (W/T/L)",
                f"pers vs local, {a['judged']} (W/T/L)", "better than both"):
        table.add_column(col)
    for name, s in ((str(source), a), ("re-evaluated", b)):
        wins, n = s["both"]
        table.add_row(name, *(f"{s['median'][v]:.3f}" for v, _ in VARIANTS), "/".join(map(str, s["vs-shared"])),
                      "/".join(map(str, s["vs-local"])), f"{wins}/{n} ({100 * wins / n:.0f}%)")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a log file gets the whole table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run evaluated four-way")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help=f"key=value, one of: {', '.join(sorted(REEVALUABLE))}")
    parser.add_argument("--users", type=Path, help="evaluate the users another run of the same population evaluated "
                        "(e.g. two cohort sizes compared on the same users; default: --run's)")
    parser.add_argument("--out", type=Path, required=True, help="where the re-evaluation is written")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPU cores)")
    args = parser.parse_args()
    bad = [s for s in args.sets if "=" not in s]
    if bad:
        parser.error(f"--set takes key=value, not {bad[0]!r}")
    sets = dict(s.split("=", 1) for s in args.sets)
    started = time.perf_counter()
    try:
        rows = reevaluate(args.run, sets, args.out, workers=args.workers, users=args.users)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{len(rows)} users re-evaluated in {(time.perf_counter() - started) / 60:.1f} min -> {args.out}")
    print_side_by_side(args.users or args.run, args.run, args.out, sets)


if __name__ == "__main__":
    main()
