"""How many devices per round user-level DP needs before its shared update is more signal than noise.

Under user-level DP-FedAvg the server's mean is (Σ clipped Δ_i + N(0, (z·S)²·I)) / n: the noise
on the mean has norm ≈ z·S·√d / n for d numbers sent, while what the devices agree on — the
*common part* of their clipped deltas, whose squared norm is the mean inner product of two
different devices' deltas — does not shrink with n. Deltas that point every which way (each
device's own data, the loss's own randomness) average out; only the common part moves the
shared base for everyone.

This script measures that common part on a sample of a config's devices — one federated round
each from the base, exactly as a device trains it (``Device.fit``, the config's schedule), before
clipping and noise — and for each target ε calibrates z for the config's rounds at the sampling
rate q = n / N (the calibrator ``dp_sweep.py --unit user`` uses) and prints signal / noise:

- at the config's cohort, and at other fractions of its population: at a fixed population and
  rounds z grows almost as fast as q, so more devices per round buy less than 1/n;
- at the config's cohort, the ratio for other values of ``user-clip`` S (the quartiles of the
  devices' delta norms): the noise grows with S, the common part only while S is below the norms;
- the population the config's ``fraction-fit`` needs for the ratio to reach 1 (z is then fixed
  by q = fraction-fit, and the noise falls as 1/N), with its devices per round and their training
  time per round on this machine (the sample's median ``train-seconds``).

Round 1 from the base is where devices agree most (later rounds start from a base that has
learned part of what they shared), so the ratio is an upper bound for a run's later rounds. It
reads every sampled device's delta, which no server may do in a deployment: simulation only, a
planning tool for a population of your own or synthetic users, and nothing here is sent.

    python simulations/cohort_plan.py --config simulations/image_cohort.toml
    python simulations/cohort_plan.py --config simulations/text_cohort_wide.toml --devices 24 --epsilons 1 8
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EPSILONS = (1.0, 8.0)
FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


def agreement(deltas: list[np.ndarray], clip: float) -> dict[str, float]:
    """What ``deltas`` (one flat array per device) share once each is clipped to norm ``clip``.

    ``common``: √ of the mean inner product of two different devices' clipped deltas (0 when
    they disagree on average), the norm of the part of their mean that does not shrink with n;
    ``common-se``: its jackknife standard error over devices; ``cosine``: the mean pairwise
    cosine of the raw deltas; ``rms``: the root mean squared norm of the clipped deltas."""
    if len(deltas) < 3:
        raise ValueError(f"need at least 3 devices' deltas to measure their agreement, got {len(deltas)}")
    flat = np.stack([np.asarray(d, dtype=np.float64).ravel() for d in deltas])
    norms = np.linalg.norm(flat, axis=1)
    clipped = flat * np.minimum(1.0, clip / np.maximum(norms, 1e-30))[:, None]
    sq = (clipped**2).sum(axis=1)
    total = clipped.sum(axis=0)

    def mean_inner(skip: int | None = None) -> float:
        s, q, k = total, float(sq.sum()), len(clipped)
        if skip is not None:
            s, q, k = s - clipped[skip], q - float(sq[skip]), k - 1
        return (float(s @ s) - q) / (k * (k - 1))

    whole = mean_inner()
    leave_one_out = np.array([math.sqrt(max(0.0, mean_inner(i))) for i in range(len(clipped))])
    k = len(clipped)
    se = math.sqrt((k - 1) / k * float(((leave_one_out - leave_one_out.mean()) ** 2).sum()))
    unit = flat / np.maximum(norms, 1e-30)[:, None]
    cos = unit @ unit.T
    return {"devices": k, "numbers": int(flat.shape[1]), "median-norm": float(np.median(norms)),
            "rms": math.sqrt(float(sq.mean())), "common": math.sqrt(max(0.0, whole)), "common-se": se,
            "cosine": float(cos[~np.eye(k, dtype=bool)].mean())}


def noise_norm(*, multiplier: float, clip: float, numbers: int, cohort: float) -> float:
    """Norm of the noise on the mean of ``cohort`` deltas: std z·S/n in each of ``numbers`` coordinates."""
    return multiplier * clip * math.sqrt(numbers) / cohort


def multiplier(cfg: Any, *, epsilon: float, sample_rate: float) -> float:
    """z that spends ``epsilon`` per user over the config's rounds at ``sample_rate``."""
    from fedpgen.shared.privacy.user_level import calibrate_user_noise

    return calibrate_user_noise(target_epsilon=epsilon, sample_rate=sample_rate, rounds=cfg.num_server_rounds,
                                delta=cfg.dp_delta, accountant=cfg.dp_accountant)


def plan(cfg: Any, stats: dict[str, float], *, epsilons: tuple[float, ...],
         fractions: tuple[float, ...]) -> list[dict[str, Any]]:
    """One row per (ε, fraction of the population sampled per round): z, the noise on the mean,
    signal / noise; the config's own fraction marked ``config``."""
    from fedpgen.shared.privacy.user_level import expected_cohort

    population, clip = cfg.num_users, cfg.user_clip
    own = expected_cohort(population=population, fraction=cfg.fraction_fit, min_clients=cfg.min_fit_clients)
    cohorts = sorted({own, *(f * population for f in fractions if 3 <= f * population <= population)})
    rows = []
    for eps in epsilons:
        for n in cohorts:
            z = multiplier(cfg, epsilon=eps, sample_rate=n / population)
            noise = noise_norm(multiplier=z, clip=clip, numbers=stats["numbers"], cohort=n)
            rows.append({"epsilon": eps, "population": population, "cohort": n, "sample-rate": n / population,
                         "config": n == own, "z": z, "noise": noise, "ratio": stats["common"] / noise})
    return rows


def by_clip(cfg: Any, deltas: list[np.ndarray], *, epsilons: tuple[float, ...]) -> list[dict[str, Any]]:
    """At the config's cohort, signal / noise for other values of ``user-clip`` S, from the same
    deltas: the config's S and the quartiles and 90th percentile of the devices' delta norms.
    The noise grows with S; the common part only while S is below the deltas' norms, so the
    ratio stops rising once every delta is clipped. A smaller S also shortens every update the
    mean is made of (the shared base moves less per round)."""
    from fedpgen.shared.privacy.user_level import expected_cohort

    n = expected_cohort(population=cfg.num_users, fraction=cfg.fraction_fit, min_clients=cfg.min_fit_clients)
    norms = np.array([float(np.linalg.norm(d)) for d in deltas])
    quantiles = (float(f"{np.quantile(norms, p):.3g}") for p in (0.25, 0.5, 0.75, 0.9))
    clips = sorted({float(cfg.user_clip), *(c for c in quantiles if c > 0)})
    rows = []
    for eps in epsilons:
        z = multiplier(cfg, epsilon=eps, sample_rate=n / cfg.num_users)
        for clip in clips:
            stats = agreement(deltas, clip)
            noise = noise_norm(multiplier=z, clip=clip, numbers=stats["numbers"], cohort=n)
            rows.append({"epsilon": eps, "clip": clip, "config": clip == cfg.user_clip, "cohort": n,
                         "clipped": float((norms > clip).mean()), "common": stats["common"], "noise": noise,
                         "ratio": stats["common"] / noise})
    return rows


def needed_population(cfg: Any, stats: dict[str, float], *, epsilon: float) -> dict[str, Any]:
    """The population at which the config's sampling rate gives signal / noise = 1: z is fixed by
    q, the noise norm falls as 1 / (q·N). None when the devices share nothing measurable."""
    from fedpgen.shared.privacy.user_level import cohort_sample_rate

    q = cohort_sample_rate(population=cfg.num_users, fraction=cfg.fraction_fit, min_clients=cfg.min_fit_clients)
    z = multiplier(cfg, epsilon=epsilon, sample_rate=q)
    if stats["common"] <= 0:
        return {"epsilon": epsilon, "sample-rate": q, "z": z, "population": None, "cohort": None}
    cohort = z * cfg.user_clip * math.sqrt(stats["numbers"]) / stats["common"]
    return {"epsilon": epsilon, "sample-rate": q, "z": z, "population": math.ceil(cohort / q), "cohort": cohort}


def measure(cfg: Any, *, devices: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    """Round-1 shared deltas (flat, before clipping and noise) and training seconds of ``devices``
    users drawn at random (``seed``) from ``cfg``'s population, each trained as in a run."""
    import torch
    from rich.progress import track

    from fedpgen.client.device import Device
    from fedpgen.shared.population import ensure_population, state_dir

    users = ensure_population(cfg)
    if devices > len(users):
        raise ValueError(f"--devices {devices}: the population has {len(users)} users")
    shutil.rmtree(Path(cfg.run_dir) / "devices", ignore_errors=True)  # every device trains its first round afresh
    chosen = np.random.default_rng(seed).choice(len(users), size=devices, replace=False)
    deltas, seconds = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads_per_client)  # as a simulated device trains (client/app.py)
    try:
        for index in track(sorted(int(i) for i in chosen), description="training one round per device"):
            device = Device(cfg, user_dir=users[index], state_dir=state_dir(cfg, users[index]), client_index=index)
            delta, _, metrics = device.fit(list(device.init_send), server_round=1)
            deltas.append(np.concatenate([d.astype(np.float64).ravel() for d in delta]))
            seconds.append(float(metrics["train-seconds"]))
    finally:
        torch.set_num_threads(threads)  # the caller's setting back (a test process, a notebook)
    return deltas, seconds


def measuring_config(values: dict[str, Any], out: Path) -> tuple[Any, Any]:
    """The config the devices train under here: the run's schedule, no DP of either kind (the
    delta before clipping and noise is what is measured), its own scratch run folder."""
    from fedpgen.shared.config import RunConfig

    cfg = RunConfig.from_mapping(values)
    if cfg.user_dp == "off" and "user-clip" not in values:
        print(f"note: the config has no user-level DP; its default user-clip S = {cfg.user_clip:g} is assumed")
    return cfg, RunConfig.from_mapping({**values, "dp": "off", "user-dp": "off", "run-dir": str(out / "run")})


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A markdown table's lines."""
    return [f"| {' | '.join(head)} |", "|" + "---|" * len(head), *(f"| {' | '.join(r)} |" for r in rows)]


def render(stats: dict[str, float], rows: list[dict[str, Any]], needed: list[dict[str, Any]],
           train_seconds: float, clips: list[dict[str, Any]] | None = None) -> str:
    """The report as markdown: the devices' agreement, the table per cohort, the one per clip, the
    populations needed."""
    lines = [f"{stats['devices']} devices, one round each from the base: {stats['numbers']:,} numbers sent; "
             f"median delta norm {stats['median-norm']:.3f}, clipped rms {stats['rms']:.3f}; mean pairwise cosine "
             f"{stats['cosine']:.3f}; common part {stats['common']:.3f} ± {stats['common-se']:.3f} (jackknife se); "
             f"median training {train_seconds:.1f} s per device and round here", ""]
    mark = {True: " (config)", False: ""}
    lines += table(("ε", "population", "devices per round", "q", "z", "noise on the mean", "signal / noise"),
                   [(f"{r['epsilon']:g}", f"{r['population']:,}", f"{r['cohort']:g}{mark[r['config']]}",
                     f"{r['sample-rate']:.3g}", f"{r['z']:.3f}", f"{r['noise']:.3f}", f"**{r['ratio']:.2f}**")
                    for r in rows])
    if clips:
        lines += ["", f"At the config's cohort ({clips[0]['cohort']:g} per round), by `user-clip` S:", ""]
        lines += table(("ε", "S", "devices clipped", "common part", "noise on the mean", "signal / noise"),
                       [(f"{r['epsilon']:g}", f"{r['clip']:g}{mark[r['config']]}", f"{r['clipped']:.0%}",
                         f"{r['common']:.3f}", f"{r['noise']:.3f}", f"**{r['ratio']:.2f}**") for r in clips])
    lines += ["", "For signal / noise = 1 at the config's sampling rate:", ""]
    for n in needed:
        if n["population"] is None:
            lines.append(f"- ε = {n['epsilon']:g}: no population (the devices share nothing measurable)")
            continue
        work = n["cohort"] * train_seconds
        work_text = f"{work:.0f} device-seconds" if work < 120 else f"{work / 60:.0f} device-minutes"
        lines.append(f"- ε = {n['epsilon']:g} (z = {n['z']:.3f} at q = {n['sample-rate']:.3g}): {n['population']:,} "
                     f"users, {n['cohort']:.0f} devices per round (≈ {work_text} of training per round here)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from fedpgen.shared.config import load_override_file
    from fedpgen.shared.locking import exclusive

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="override file, e.g. simulations/image_cohort.toml")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--devices", type=int, default=16, help="devices to train one round each (≥ 3)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS), help="user-level targets")
    parser.add_argument("--seed", type=int, default=0, help="which devices are drawn")
    parser.add_argument("--out", type=Path, help="default runs/cohort_plan/<config>")
    args = parser.parse_args(argv)
    if args.devices < 3:
        parser.error("--devices must be >= 3: the common part is measured between different devices")
    if any(not (e > 0 and math.isfinite(e)) for e in args.epsilons):
        parser.error("--epsilons must be finite and > 0 (without DP there is no noise to plan for)")
    if any("=" not in s for s in args.sets):
        parser.error(f"--set takes key=value, got: {', '.join(s for s in args.sets if '=' not in s)}")
    values: dict[str, Any] = dict(load_override_file(args.config)) if args.config else {}
    values.update(s.split("=", 1) for s in args.sets)
    out = args.out or Path("runs/cohort_plan") / (args.config.stem if args.config else "text")
    cfg, measuring = measuring_config(values, out)
    with exclusive(out, what="cohort plan folder"):  # a second plan into it would wipe this one's devices
        deltas, seconds = measure(measuring, devices=args.devices, seed=args.seed)
        stats = agreement(deltas, cfg.user_clip)
        rows = plan(cfg, stats, epsilons=tuple(args.epsilons), fractions=FRACTIONS)
        needed = [needed_population(cfg, stats, epsilon=e) for e in args.epsilons]
        clips = by_clip(cfg, deltas, epsilons=tuple(args.epsilons))
        text = render(stats, rows, needed, statistics.median(seconds), clips)
        print(text)
        result = {"agreement": stats, "train-seconds": seconds, "rows": rows, "needed": needed, "clips": clips,
                  "settings": {"config": values, "devices": args.devices, "seed": args.seed}}
        (out / "cohort_plan.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        (out / "cohort_plan.md").write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
