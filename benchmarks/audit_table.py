"""The audit experiment's table: run setting × threat model, from audited run folders.

Each run folder was made as docs/audit.md says (plant canaries, simulate with
simulations/canary.toml, `fedpgen audit`); this script reads their ``audit/audit.json``
and prints, per setting and observer: membership-inference AUC and TPR at 0.1% FPR, the
one-run ε lower bound (black box: planted canaries; white box: gradient canaries on the
run's own DP plan) and the claimed ε; then canary exposure per repetition. A run without
DP has no plan for the audit's white box: it is audited here with σ = 0 on the plan of the
first private run given. Prints; asserts nothing.

    python benchmarks/audit_table.py "no DP=runs/canary-nodp" "ε = 8=runs/canary" "ε = 1=runs/canary-eps1"

A run audited in parts (e.g. `--attacks membership,canaries` again after a fix): give the
folder holding the white-box audit as `--whitebox LABEL=RUN_DIR`.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpgen.audit.whitebox import audit_mechanism  # noqa: E402

OBSERVERS = [
    ("black box: final shared model, loss threshold", "black box, final model (loss)"),
    ("black box: final shared model, RMIA with the pre-federation base as reference", "black box, final model (RMIA)"),
    ("white box", "white box, every DP step of a device"),
    ("server without SecAgg+: each device's own update", "server without SecAgg+ (device updates)"),
    ("server with SecAgg+: each round's aggregate", "server with SecAgg+ (aggregates)"),
]


def main() -> None:
    args, whitebox_from = sys.argv[1:], {}
    while "--whitebox" in args:
        i = args.index("--whitebox")
        label, path = args[i + 1].rsplit("=", 1)
        whitebox_from[label] = json.loads((Path(path) / "audit" / "audit.json").read_text())["whitebox"]
        del args[i : i + 2]
    runs = [arg.rsplit("=", 1) for arg in args]
    if not runs or any(len(r) != 2 for r in runs):
        raise SystemExit(__doc__)
    audits = {label: json.loads((Path(path) / "audit" / "audit.json").read_text()) for label, path in runs}
    for label, wb in whitebox_from.items():
        audits[label]["whitebox"] = wb
    plan = next((w for a in audits.values() for w in a["whitebox"]), None)
    print("| setting | threat model | MIA AUC [95%] | TPR@0.1% FPR | one-run ε ≥ (95%) | max provable | claimed ε |")
    print("|---|---|---|---|---|---|---|")
    for label, audit in audits.items():
        mia = {m["view"]: m for m in audit["membership"]}
        one_run = {o["view"]: o for o in audit["one-run"]}
        for key, name in OBSERVERS:
            if key == "white box":
                wb = audit["whitebox"]
                if not wb and plan is not None:  # no DP: the same plan without noise
                    r = audit_mechanism(noise_multiplier=0.0, clip=plan["clip"], sample_rate=plan["sample_rate"],
                                        steps=plan["steps"], delta=plan["delta"], canaries=plan["guesses"]["m"])
                    wb = [{"lower-bound": r.lower_bound, "max_provable": r.max_provable,
                           "claimed_epsilon": float("inf")}]
                if wb:
                    lows = [w["lower-bound"] for w in wb]
                    print(f"| {label} | {name} | — | — | {statistics.median(lows):.2f} (of {len(lows)} plans: "
                          f"{min(lows):.2f}–{max(lows):.2f}) | {max(w['max_provable'] for w in wb):.2f} | "
                          f"{wb[0]['claimed_epsilon']:.2f} |")
                continue
            m, o = mia.get(key), one_run.get(key)
            auc = f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]" if m else "not measured"
            tpr = f"{m['tpr_at']['0.001'][0]:.4f}" if m else "—"
            bound = f"{o['lower-bound']:.2f} ({o['correct']}/{o['guesses']} right)" if o else "—"
            print(f"| {label} | {name} | {auc} | {tpr} | {bound} | {o['max-provable']:.2f} | "
                  f"{o['claimed']:.2f} |" if o else f"| {label} | {name} | {auc} | {tpr} | — | — | — |")
    print("\nCanary exposure under the final shared model (bits; at most log2 10^6 = 19.93), per repetition:")
    print("| setting | " + " | ".join(f"{r}×" for r in (1, 10, 100)) + " |")
    print("|---|---|---|---|")
    for label, audit in audits.items():
        cells = []
        for rep in (1, 10, 100):
            vals = [e["exposure_fit"] for e in audit["exposure"] if e["repetitions"] == rep]
            cells.append(", ".join(f"{v:.1f}" for v in vals) or "—")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
