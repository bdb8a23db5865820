"""How tight the white-box one-run audit is: prints a table, asserts nothing.

For the DP plan a default demo device runs (q = 1/13: 100 training records at batch 8;
T = 15 local steps × 4 rounds = 60 DP steps; C = 1; δ = 1e-5), audit FedPGen's own
mechanism with m gradient canaries at ε ∈ {∞ (σ = 0), 8, 1} and a mechanism that lies
(adds σ/10, accounts σ) at ε = 1 and 8. Columns: the claimed ε, the measured lower bound
(95% confidence), the most any audit with this many canaries could show, the guesses.

    python benchmarks/audit_tightness.py [--canaries 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpgen.audit.whitebox import UnderstatedNoise, audit_mechanism  # noqa: E402
from fedpgen.shared.privacy.accounting import calibrate_sigma  # noqa: E402




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    q, steps, delta = 1 / 13, 60, 1e-5
    settings = [("no DP (σ = 0)", 0.0, None), ("ε = 8", 8.0, None), ("ε = 1", 1.0, None),
                ("lie at ε = 8 (σ/10)", 8.0, UnderstatedNoise), ("lie at ε = 1 (σ/10)", 1.0, UnderstatedNoise)]
    print(f"q = {q:.4f}, T = {steps}, δ = {delta:g}, m = {args.canaries} canaries, {args.repeats} repeats "
          "(median bound; min-max)")
    print(f"{'setting':22s} {'σ':>7s} {'claimed ε':>10s} {'lower bound':>18s} {'max provable':>13s} "
          f"{'v/r':>9s} {'verdict':>8s} {'s':>5s}")
    for name, eps, mech in settings:
        sigma = calibrate_sigma(target_epsilon=eps, delta=delta, sample_rate=q, steps=steps, accountant="prv") \
            if eps else 0.0
        started = time.perf_counter()
        runs = [audit_mechanism(noise_multiplier=sigma, clip=1.0, sample_rate=q, steps=steps, delta=delta,
                                canaries=args.canaries, mechanism=mech, seed=s) for s in range(args.repeats)]
        bounds = [r.lower_bound for r in runs]
        mid = runs[bounds.index(statistics.median_low(bounds))]
        verdict = "pass" if all(r.passed for r in runs) else "FAIL"
        print(f"{name:22s} {sigma:7.3f} {mid.claimed_epsilon:10.2f} "
              f"{statistics.median(bounds):6.2f} ({min(bounds):.2f}-{max(bounds):.2f}) {mid.max_provable:13.2f} "
              f"{mid.guesses.correct:4d}/{mid.guesses.r:<4d} {verdict:>8s} "
              f"{(time.perf_counter() - started) / args.repeats:5.1f}")


if __name__ == "__main__":
    main()
