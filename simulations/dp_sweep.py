"""Privacy/utility sweep for any task: the same run at ε ∈ {1, 8, ∞} side by side.

Each point is a full ``fedpgen simulate`` with the same overrides except the privacy
setting; ∞ is the run without DP (NOT PRIVATE). Two units of protection:

- ``--unit record`` (default): DP-SGD on every device, ``dp-epsilon = ε`` per user for
  one record (a document, an event window, a photo).
- ``--unit user``: user-level DP-FedAvg (``dp = off``, ``user-dp`` distributed unless the
  config names central): ``user-noise-multiplier`` z is calibrated so that the run's
  rounds at the cohort's sampling rate q = n / N spend ε per user
  (``fedpgen.shared.privacy.user_level.calibrate_user_noise``); the server reports the ε
  it actually spent, which the table prints.

Prints one table (base / shared-only / shared+personal / local-only medians of the task's
primary metric; per user, shared+personal against shared-only and local-only as wins / ties /
losses: a rate such as HR@10 ties often, so against local-only also on the task's continuous
metric where its primary ties (behavior: held-out NLL; faces: identity similarity); the users
for whom shared+personal is better than both shared-only and local-only, on that metric; ε;
wall time) and writes ``<out>/dp_sweep.json``, ``dp_sweep.md`` and ``dp_sweep.png``. ``--report
DIR ...`` prints one table from sweeps already run (e.g. a record-level and a user-level
sweep of the same cohort) without running.

    python simulations/dp_sweep.py                                   # text, 20 roles (about 30 min on 2 cores)
    python simulations/dp_sweep.py --config simulations/image.toml   # faces, 10 users (about 25 min)
    python simulations/dp_sweep.py --config simulations/behavior_cohort.toml --unit user
    python simulations/dp_sweep.py --config simulations/text_cohort_wide.toml --unit user --epsilons 8  # about 55 min
    python simulations/dp_sweep.py --report runs/dp_sweep/behavior-record runs/dp_sweep/behavior-user
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPSILONS = (1.0, 8.0, math.inf)
VARIANTS = (("base", "base"), ("shared", "shared-only"), ("personal", "shared+personal"), ("local", "local-only"))


def privacy_overrides(base: dict[str, Any], eps: float, unit: str) -> dict[str, Any]:
    """The run-config keys that set one sweep point's privacy; everything else stays ``base``."""
    from fedpgen.shared.config import RunConfig
    from fedpgen.shared.privacy.user_level import calibrate_user_noise, cohort_sample_rate

    if math.isinf(eps):
        return {"dp": "off", "user-dp": "off"}
    if unit == "record":
        return {"dp": "epsilon", "dp-epsilon": eps, "user-dp": "off"}
    cfg = RunConfig.from_mapping(base)
    mode = cfg.user_dp if cfg.user_dp != "off" else "distributed"
    q = cohort_sample_rate(population=cfg.num_users, fraction=cfg.fraction_fit, min_clients=cfg.min_fit_clients)
    z = calibrate_user_noise(target_epsilon=eps, sample_rate=q, rounds=cfg.num_server_rounds, delta=cfg.dp_delta,
                             accountant=cfg.dp_accountant)
    return {"dp": "off", "user-dp": mode, "user-noise-multiplier": z}


def spent_epsilon(run_dir: Path, summary: dict[str, Any], unit: str) -> float:
    """What the run reports: the median device's record-level ε, or the server's user-level ε."""
    from fedpgen.server.results import read_jsonl

    if unit == "user":
        rows = [r for r in read_jsonl(run_dir / "rounds.jsonl") if "user-epsilon" in r]
        return float(rows[-1]["user-epsilon"]) if rows else math.inf
    spent = list(summary["epsilon-by-client"].values())
    return statistics.median(spent) if spent else math.inf


def head_to_head(run_dir: Path, metric: str, higher_is_better: bool, a: str, b: str) -> tuple[int, int, int]:
    """Users for whom variant ``a`` is better than, equal to, worse than ``b`` (clients.csv)."""
    from fedpgen.server.results import read_clients

    sign = 1.0 if higher_is_better else -1.0
    diffs = [sign * (float(c[f"{a}-{metric}"]) - float(c[f"{b}-{metric}"])) for c in read_clients(run_dir)
             if f"{b}-{metric}" in c]
    return sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)


def better_than_both(run_dir: Path, metric: str, higher_is_better: bool) -> tuple[int, int]:
    """Users for whom shared+personal is strictly better than both shared-only and local-only,
    and the users compared (the goal's count: README, "Does federation pay off under DP?")."""
    from fedpgen.server.results import read_clients

    sign = 1.0 if higher_is_better else -1.0
    rows = [c for c in read_clients(run_dir) if all(f"{v}-{metric}" in c for v in ("shared", "personal", "local"))]
    wins = sum(all(sign * (float(c[f"personal-{metric}"]) - float(c[f"{v}-{metric}"])) > 0 for v in ("shared", "local"))
               for c in rows)
    return wins, len(rows)


def tie_free(run_dir: Path) -> tuple[str, bool] | None:
    """The run's task's continuous metric for per-user comparisons, if its primary ties often."""
    from fedpgen.shared.tasks.registry import task_info

    return task_info(json.loads((run_dir / "config.json").read_text())["task"]).tie_free


GOAL_SHARE = 0.8  # the goal: shared+personal better than both for at least 80% of users


def row_cells(r: dict[str, Any]) -> tuple[list[str], float | None, str]:
    """One sweep point's table cells, its share of users better than both (None: no users) and
    the metric that share is judged on."""
    metric, higher, run_dir = r["metric"], r["higher-is-better"], Path(r["run-dir"])
    versus = []
    for other in ("shared", "local"):
        w, t, lost = head_to_head(run_dir, metric, higher, "personal", other)
        versus.append(f"{w}/{t}/{lost}" if w + t + lost else "—")
    continuous = tie_free(run_dir)
    w, t, lost = head_to_head(run_dir, *continuous, "personal", "local") if continuous else (0, 0, 0)
    versus.append(f"{w}/{t}/{lost} ({continuous[0]})" if continuous and w + t + lost else "—")
    judged = continuous or (metric, higher)
    wins, compared = better_than_both(run_dir, *judged)
    versus.append(f"{wins}/{compared} ({100 * wins / compared:.0f}%, {judged[0]})" if compared else "—")
    unit = "none" if math.isinf(r["epsilon"]) else r["unit"]
    cells = [unit, f"{r['epsilon']:g}", f"{r['spent']:.2f}",
             *(f"{r['median'][v]:.3f}" if v in r["median"] else "—" for v, _ in VARIANTS),
             *versus, f"{r['wall-seconds'] / 60:.1f} min"]
    return cells, (wins / compared if compared else None), judged[0]


def render(rows: list[dict[str, Any]], title: str, out: Path | None) -> None:
    """Print the table of ``rows``; with ``out``, also write it as Markdown and a plot there."""
    from rich.console import Console
    from rich.table import Table

    metric = rows[0]["metric"]
    higher = rows[0]["higher-is-better"]
    head = ["unit", "ε target", "ε reported", *(label for _, label in VARIANTS), "pers vs shared (W/T/L)",
            "pers vs local (W/T/L)", "pers vs local, tie-free metric (W/T/L)", "better than both", "wall"]
    table = Table(title=f"Median {metric} ({'higher' if higher else 'lower'} is better) vs ε per user ({title})")
    for col in head:
        table.add_column(col, justify="right")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    shares = []
    for r in rows:
        cells, share, judged = row_cells(r)
        shares.append(share)
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=190).print(table)
    if out is None:
        return
    (out / "dp_sweep.md").write_text("\n".join(lines) + "\n")
    plot(rows, shares, judged, out / "dp_sweep.png")
    print(f"wrote {out / 'dp_sweep.md'}, {out / 'dp_sweep.png'}")


def plot(rows: list[dict[str, Any]], shares: list[float | None], judged: str, path: Path) -> None:
    """Left: the variants' medians per sweep point; right: the share of users for whom
    shared+personal is better than both shared-only and local-only, against the goal's 80%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = {r["unit"] for r in rows if not math.isinf(r["epsilon"])}
    labels = [f"{r['epsilon']:g}" if len(units) < 2 or math.isinf(r["epsilon"]) else f"{r['unit']} {r['epsilon']:g}"
              for r in rows]
    fig, (ax, goal) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in VARIANTS:
        if all(key in r["median"] for r in rows):
            ax.plot(labels, [r["median"][key] for r in rows], marker="o", label=label)
    xlabel = f"{'/'.join(sorted(units)) or 'no DP'}-level ε per user (inf = no DP)"
    ax.set(xlabel=xlabel, ylabel=f"median {rows[0]['metric']}", title="Privacy / utility")
    ax.legend()
    goal.bar(labels, [100 * s if s is not None else 0 for s in shares], color="tab:green")
    goal.axhline(100 * GOAL_SHARE, color="black", linestyle="--", label=f"goal: {100 * GOAL_SHARE:.0f}% of users")
    goal.set(xlabel=xlabel, ylabel=f"% of users (on {judged})", ylim=(0, 100),
             title="shared+personal better than shared-only and local-only")
    goal.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_points(earlier: list[dict[str, Any]], rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                                    list[float]]:
    """This invocation's ``rows`` and the ``earlier`` points of its folder (its ``dp_sweep.json``)
    at other ε, by ε: running ``--epsilons 8``, then ``1``, into one folder gives one table.

    An earlier point joins only with the same settings (config, overrides, unit) and its run's
    results still on disk; the ε of the others are returned, so that nothing is mixed silently."""
    settings = json.dumps(rows[0]["settings"], sort_keys=True) if rows else None
    new = {r["epsilon"] for r in rows}
    kept, dropped = [], []
    for r in earlier:
        if r["epsilon"] in new:
            continue
        same = "settings" in r and json.dumps(r["settings"], sort_keys=True) == settings
        if same and (Path(r["run-dir"]) / "clients.csv").is_file():
            kept.append(r)
        else:
            dropped.append(r["epsilon"])
    return sorted(kept + rows, key=lambda r: r["epsilon"]), sorted(dropped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="override file, e.g. simulations/image.toml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--unit", choices=("record", "user"), default="record", help="what ε protects")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="inf = no DP")
    parser.add_argument("--out", type=Path, help="default runs/dp_sweep/<config>-<unit>")
    parser.add_argument("--report", type=Path, nargs="+", help="only print the table of these sweeps' folders")
    args = parser.parse_args()
    if args.report:
        missing = [str(folder) for folder in args.report if not (folder / "dp_sweep.json").is_file()]
        if missing:
            parser.error(f"no finished sweep (dp_sweep.json) in: {', '.join(missing)}")
        rows = [row for folder in args.report for row in json.loads((folder / "dp_sweep.json").read_text())]
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        render(rows, ", ".join(map(str, args.report)), args.out)  # with --out: also its .md and .png
        return

    from rich.console import Console

    from fedpgen.shared.config import RunConfig, load_override_file
    from fedpgen.simulate import simulate

    base: dict[str, Any] = dict(load_override_file(args.config)) if args.config else {}
    base.update(s.split("=", 1) for s in args.sets)
    out = args.out or Path("runs/dp_sweep") / f"{args.config.stem if args.config else 'text'}-{args.unit}"
    rows = []
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115 - the runs' own tables are in their folders
    for eps in args.epsilons:
        privacy = privacy_overrides(base, eps, args.unit)
        run_dir = out / f"eps-{eps:g}"
        cfg = RunConfig.from_mapping({**base, **privacy, "run-dir": str(run_dir)})
        print(f"ε = {eps:g} ({args.unit} level): {privacy} -> {run_dir}", flush=True)
        started = time.perf_counter()
        summary = simulate(cfg, fresh=True, console=quiet)
        p = summary["primary-metric"]
        rows.append({"epsilon": eps, "spent": spent_epsilon(run_dir, summary, args.unit), "unit": args.unit,
                     "privacy": privacy, "metric": p, "higher-is-better": summary["higher-is-better"],
                     "median": summary[f"median-{p}"], "clients": summary["clients"],
                     "wall-seconds": time.perf_counter() - started, "run-dir": str(run_dir),
                     "settings": {"config": base, "unit": args.unit}})
        print(f"  done in {rows[-1]['wall-seconds']:.0f} s: median {p} {rows[-1]['median']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "dp_sweep.json"
    rows, dropped = merge_points(json.loads(earlier.read_text()) if earlier.is_file() else [], rows)
    if dropped:
        print(f"earlier points of {out} at ε {', '.join(f'{e:g}' for e in dropped)} left out of its table: other "
              "settings, or their runs are gone (their folders are kept)", flush=True)
    earlier.write_text(json.dumps(rows, indent=2))

    render(rows, str(out), out)


if __name__ == "__main__":
    main()
