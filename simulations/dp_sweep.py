"""Privacy/utility sweep for the text task: personalized held-out perplexity at ε ∈ {1, 3, 8, ∞}.

Each point is a full ``fedpgen simulate`` with the same overrides except the privacy
setting (∞ = dp off). Prints a table and writes ``<out>/dp_sweep.png``.

    python simulations/dp_sweep.py                         # 24 users, the default run (about 25 min on 2 cores)
    python simulations/dp_sweep.py --set num-users=8 --set num-server-rounds=3   # smaller
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPSILONS = (1.0, 3.0, 8.0, float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--out", type=Path, default=Path("runs/dp_sweep"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rich.console import Console
    from rich.table import Table

    from fedpgen.simulate import simulate
    from fedpgen.shared.config import RunConfig

    base = dict(s.split("=", 1) for s in args.sets)
    rows = []
    quiet = Console(file=open("/dev/null", "w"))
    for eps in EPSILONS:
        privacy = {"dp": "off"} if eps == float("inf") else {"dp": "epsilon", "dp-epsilon": eps}
        cfg = RunConfig.from_mapping({**base, **privacy, "run-dir": str(args.out / f"eps-{eps:g}")})
        summary = simulate(cfg, fresh=True, console=quiet)
        spent = list(summary["epsilon-by-client"].values())
        rows.append({"epsilon": eps, "spent-median": statistics.median(spent) if spent else float("inf"),
                     **{f"{k}-ppl": v for k, v in summary["median-ppl"].items()},
                     "personal-beats-shared": summary["personal-beats-shared"], "clients": summary["clients"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_sweep.json").write_text(json.dumps(rows, indent=2))
    table = Table(title="Median held-out perplexity vs record-level ε (per user, whole run)")
    for col in ("ε target", "ε spent (median)", "base", "shared", "shared+personal", "local-only", "pers>shared"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['epsilon']:g}", f"{r['spent-median']:.2f}", f"{r['base-ppl']:.3f}",
                      f"{r['shared-ppl']:.3f}", f"{r['personal-ppl']:.3f}", f"{r['local-ppl']:.3f}",
                      f"{r['personal-beats-shared']}/{r['clients']}")
    Console(width=140).print(table)
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['epsilon']:g}" for r in rows]
    for key, label in (("shared-ppl", "shared only"), ("personal-ppl", "shared + personal"),
                       ("local-ppl", "local only")):
        ax.plot(labels, [r[key] for r in rows], marker="o", label=label)
    ax.set(xlabel="record-level ε per user (∞ = no DP)", ylabel="median held-out perplexity",
           title="Privacy / utility")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "dp_sweep.png", dpi=100)
    print(f"wrote {args.out / 'dp_sweep.png'}")


if __name__ == "__main__":
    main()
