"""The end-of-run summary: personalization gain (shared+personal vs shared-only),
federation gain (shared+personal vs local-only) and ε, per client and aggregated."""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedpgen.server.results import read_clients, read_config, read_jsonl
from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.user_folder import list_user_dirs
from fedpgen.shared.tasks import TASKS, TaskInfo, get_task
from fedpgen.shared.wire import (
    BUDGET_EXHAUSTED,
    NO_USABLE_DATA,
    REFUSALS,
    SKIP_REASONS,
    VARIANTS,
)

log = logging.getLogger(__name__)


def epsilon_by_client(run_dir: Path) -> dict[int, float]:
    """Each client's cumulative record-level ε, from the last ledger event it reported."""
    out: dict[int, float] = {}
    for row in read_jsonl(Path(run_dir) / "client_rounds.jsonl"):
        if "dp-epsilon" in row:
            out[int(row["client-index"])] = float(row["dp-epsilon"])
    return out


def user_level_epsilon(rounds: list[dict[str, Any]], cfg: RunConfig) -> float | None:
    """The user-level ε the server's accountant reported after the newest round (0 before any
    round), or ``None`` when the run has no user-level DP (``user-dp = off``)."""
    if cfg.user_dp == "off":
        return None
    spent = [float(r["user-epsilon"]) for r in rounds if "user-epsilon" in r]
    return spent[-1] if spent else 0.0


def user_epsilon_vs_server(run_dir: Path, rounds: list[dict[str, Any]], cfg: RunConfig) -> tuple[float, int] | None:
    """``(ε, rounds)`` of the user the server saw most, against the server itself: it drew the
    cohorts, so each training reply it received (``client_rounds.jsonl``) is a Gaussian mechanism
    without amplification (``server_view_multiplier``); ``None`` without user-level DP. Gaussian
    mechanisms of multipliers z_i compose exactly into one (``gaussians_epsilon``)."""
    if cfg.user_dp == "off":
        return None
    # torch: not in the launcher before it is needed
    from fedpgen.shared.privacy.user_level import gaussians_epsilon, server_view_by_node

    seen = server_view_by_node(read_jsonl(Path(run_dir) / "client_rounds.jsonl"), rounds, mode=cfg.user_dp,
                               secure_aggregation=cfg.secure_aggregation,
                               noise_multiplier=cfg.user_noise_multiplier, dropouts=cfg.user_noise_dropouts)
    if not seen:
        return 0.0, 0
    worst = max(seen.values(), key=lambda zs: math.inf if min(zs) <= 0 else sum(z**-2 for z in zs))
    return gaussians_epsilon(worst, delta=cfg.dp_delta, accountant=cfg.dp_accountant), len(worst)


def user_epsilon_vs_server_bound(cfg: RunConfig) -> float | None:
    """The ε against the server that holds for every user before any cohort is drawn: at most
    ``dp-max-participations`` rounds each (enforced by each device), else ``num-server-rounds``
    (``epsilon_vs_server_bound``); ``None`` without user-level DP."""
    if cfg.user_dp == "off":
        return None
    from fedpgen.shared.privacy.user_level import epsilon_vs_server_bound

    return epsilon_vs_server_bound(mode=cfg.user_dp, secure_aggregation=cfg.secure_aggregation,
                                   noise_multiplier=cfg.user_noise_multiplier,
                                   participations=cfg.planned_participations, delta=cfg.dp_delta,
                                   accountant=cfg.dp_accountant)


def epsilon_columns(summary: Mapping[str, Any]) -> list[str]:
    """The ε columns of a per-user table: ``record ε`` (the device's ledger) when the devices ran
    DP-SGD, ``user ε`` under user-level DP; a bare ``ε`` (∞) when neither protects anything.
    A user-level run without DP-SGD thus never shows its devices' record-level ∞ as the user's ε."""
    columns = ["record ε"] * bool(summary.get("record-dp")) + ["user ε"] * (summary.get("user-epsilon") is not None)
    return columns or ["ε"]


def epsilon_cells(summary: Mapping[str, Any], record: float | None) -> list[float | None]:
    """One user's values for :func:`epsilon_columns`: its device's record-level ε (``None``: its
    device reported none), and the run's user-level ε, the same for every user."""
    return [summary["user-epsilon"] if column == "user ε" else record for column in epsilon_columns(summary)]


def user_names(run_dir: Path) -> dict[int, str]:
    """Each simulated user's name (its folder's name) by client index, as ``fedpgen simulate`` numbered them.

    The population is listed again: ``<run-dir>/users`` for a built-in one, ``data-dir`` for
    ``data = "dir"``. Empty when that folder is gone (a deployment has no client indices).
    """
    cfg = read_config(run_dir)
    folder = Path(cfg.data_dir).expanduser() if cfg.data == "dir" else Path(run_dir) / "users"
    try:
        return {i: p.name for i, p in enumerate(list_user_dirs(folder))}
    except (FileNotFoundError, ValueError) as exc:
        log.info("user names unknown (%s): users are labelled by index", exc)
        return {}


def user_label(index: int, names: Mapping[int, str], row: Mapping[str, Any] | None = None) -> str:
    """How a user is shown: its name, else its node id (deployment), else ``user <index>``."""
    if index in names:
        return names[index]
    if index < 0 and row is not None and row.get("node-id") not in (None, ""):
        return f"node {row['node-id']}"
    return f"user {index}"


def evaluated_variants(clients: list[dict[str, Any]], primary: str) -> list[str]:
    """The variants every client's final evaluation reported (four-way, or the device's own three)."""
    return [v for v in VARIANTS if clients and all(isinstance(c.get(f"{v}-{primary}"), (int, float))
                                                   for c in clients)]


def final_round(run_dir: Path) -> int:
    """The round of the newest checkpoint: how far the shared base really got (0: not at all)."""
    names = (p.name for p in (Path(run_dir) / "checkpoints").glob("round_*.safetensors"))
    return max((int(n[len("round_"):-len(".safetensors")]) for n in names), default=0)


def ended_short(final: int, planned: int, rounds: list[dict[str, Any]]) -> str:
    """Why the shared base stopped before its planned rounds, or ``""`` if it did not."""
    if final >= planned:
        return ""
    why = next((r["stopped"] for r in reversed(rounds) if r.get("stopped")), "")
    return (f"training stopped early: the shared base reached round {final} of {planned}"
            + (f" ({why})" if why else ""))


def privacy_lines(run_dir: Path, rounds: list[dict[str, Any]], *, cfg: RunConfig) -> list[str]:
    """What this run protects, said plainly."""
    eps = sorted(epsilon_by_client(run_dir).values())
    if cfg.record_dp and eps:
        lines = [(f"record-level DP (DP-SGD, {cfg.dp_accountant.upper()} accountant, δ={cfg.dp_delta:g}, "
                  f"C={cfg.dp_clip}): ε per user min {eps[0]:.2f} / median {statistics.median(eps):.2f} / "
                  f"max {eps[-1]:.2f} (budget {cfg.dp_epsilon:g})")]
    elif cfg.user_dp != "off":  # a user-level guarantee covers each of the user's records with the same ε
        lines = ["no DP-SGD on the devices (dp = off or σ = 0): records are protected by the user-level "
                 "guarantee below only"]
    else:
        lines = ["NOT PRIVATE at record level: no DP-SGD (dp = off or σ = 0)"]
    user_eps = user_level_epsilon(rounds, cfg)
    if user_eps is not None:
        poisson = all("sampled" in r for r in rounds if "user-epsilon" in r)  # rows since Poisson cohorts
        lines.append(f"user-level DP ({cfg.user_dp} DP-FedAvg, S={cfg.user_clip}, "
                     f"z={cfg.user_noise_multiplier}, Poisson-sampled cohorts): ε = {user_eps:.2f} per user "
                     "against anyone who sees the shared bases but not who was sampled" if poisson else
                     f"user-level DP ({cfg.user_dp} DP-FedAvg, S={cfg.user_clip}, z={cfg.user_noise_multiplier}): "
                     f"ε = {user_eps:.2f} per user as accounted, which holds for Poisson-sampled cohorts only; this "
                     "run drew fixed-size cohorts (before Poisson sampling), for which the bound is the accountant's "
                     "at sensitivity 2·S (docs/privacy.md)")
        vs_server, times = user_epsilon_vs_server(run_dir, rounds, cfg) or (math.inf, 0)
        lines.append(f"against the server, which draws the cohorts (no amplification by sampling): ε = "
                     f"{vs_server:.2f} for the user it saw most ({times} rounds)"
                     + (": it sees the deltas before it adds the noise" if cfg.user_dp == "central" else ""))
        if cfg.dp_max_participations:
            bound = user_epsilon_vs_server_bound(cfg) or math.inf
            lines.append(f"at most {cfg.planned_participations} rounds per user (dp-max-participations, each device "
                         "refuses past it): " + (f"against the server ε ≤ {bound:.2f} for every user, however often "
                                                 "it draws one" if math.isfinite(bound) else "no bound against the "
                                                 "server follows (it needs distributed noise under SecAgg+)"))
    if cfg.secure_aggregation:
        cap = f" capped at {cfg.secagg_max_shares}" if cfg.secagg_num_shares <= 1 and cfg.secagg_max_shares else ""
        lines.append(f"secure aggregation (Flower SecAgg+, num-shares {cfg.secagg_num_shares:g}{cap}, threshold "
                     f"{cfg.secagg_threshold:g}): the server unmasked only the weighted sum of deltas. Still seen in "
                     "plaintext: each device's number of examples, its dp-* ledger fields, counts, timings and "
                     "final evaluation metrics. Assumes an honest-but-curious server; Flower seeds its masks from "
                     "32 bits of the shared secret (docs/wire.md)")
    else:
        lines.append("NO secure aggregation (secure-aggregation = false): the server sees each device's "
                     "(DP-noised) shared delta")
    exhausted = max((r.get(BUDGET_EXHAUSTED, 0) for r in rounds), default=0)
    if exhausted:
        lines.append(f"{exhausted} devices refused to train once their ε budget was spent")
    lines += [r["stopped"] for r in rounds if r.get("stopped")]
    lines += [f"round {r['round']} REFUSED (shared base unchanged, no checkpoint): {r['out-of-bounds']}"
              for r in rounds if r.get("out-of-bounds")]
    retried = sorted({int(r["round"]) for r in read_jsonl(Path(run_dir) / "client_rounds.jsonl")
                      if int(r.get("dp-attempt", 1)) > 1})
    if retried:
        lines.append(f"rounds {retried} were run again after an interruption; devices that had already spent "
                     "them were charged again (their ledgers record the retry)")
    return lines


def _gain(task: TaskInfo, shared: float, personal: float) -> float:
    """How much better ``personal`` is than ``shared``: a ratio for lower-is-better metrics
    (perplexity), a difference for rates that may be 0 (HR@10)."""
    return personal - shared if task.higher_is_better else shared / personal


def _fmt_gain(task: TaskInfo, gain: float) -> str:
    return f"{gain:+.3f}" if task.higher_is_better else f"{gain:.3f}x"


def summarize(run_dir: Path) -> dict[str, Any]:
    """Aggregate figures of a finished run (also written to ``summary.json``)."""
    clients = read_clients(run_dir)
    rounds = [r for r in read_jsonl(Path(run_dir) / "rounds.jsonl") if "bytes-down-mean" in r]
    if not clients:
        raise RuntimeError(f"{run_dir}: no per-client results (clients.csv)")
    cfg = read_config(run_dir)
    task = TASKS[cfg.task]
    p = task.primary

    def med(key: str) -> float:
        return statistics.median(float(c[key]) for c in clients)

    variants = evaluated_variants(clients, p)
    local = "local" in variants  # a device-only evaluation (client/evaluation.py) trains no local baseline

    all_rounds = read_jsonl(Path(run_dir) / "rounds.jsonl")
    final, planned = final_round(run_dir), cfg.num_server_rounds
    summary = {
        "task": task.name,
        "primary-metric": p,
        "higher-is-better": task.higher_is_better,
        "clients": len(clients),
        "rounds": len(rounds),
        "final-round": final,
        "planned-rounds": planned,
        "ended-short": ended_short(final, planned, all_rounds),
        "out-of-bounds-rounds": sorted({int(r["round"]) for r in all_rounds if r.get("out-of-bounds")}),
        "variants": variants,
        **{f"median-{m}": {v: med(f"{v}-{m}") for v in variants} for m in task.metric_names
           if all(f"{v}-{m}" in c for c in clients for v in variants)},
        "personal-beats-shared": sum(task.better(c[f"personal-{p}"], c[f"shared-{p}"]) for c in clients),
        "personal-beats-local": sum(task.better(c[f"personal-{p}"], c[f"local-{p}"]) for c in clients)
        if local else None,
        "median-personalization-gain": statistics.median(_gain(task, c[f"shared-{p}"], c[f"personal-{p}"])
                                                         for c in clients),
        "median-federation-gain": statistics.median(_gain(task, c[f"local-{p}"], c[f"personal-{p}"])
                                                    for c in clients) if local else None,
        "skipped": {r: n for r in SKIP_REASONS if (n := sum(int(c.get(f"skipped-{r}") or 0) for c in clients))},
        "refused": {r: max((int(row.get(r, 0)) for row in all_rounds), default=0) for r in REFUSALS},
        "mean-bytes-down-per-client-round": statistics.mean(r["bytes-down-mean"] for r in rounds) if rounds else 0.0,
        "epsilon-by-client": epsilon_by_client(run_dir),  # record-level: ∞ on devices without DP-SGD
        "record-dp": cfg.record_dp,
        "user-epsilon": user_level_epsilon(all_rounds, cfg),  # covers all of a user's data at once
        "user-epsilon-vs-server": (user_epsilon_vs_server(run_dir, all_rounds, cfg) or (None,))[0],
        "user-epsilon-vs-server-bound": user_epsilon_vs_server_bound(cfg),  # every user, by the participation cap
        "delta": cfg.dp_delta,
        "privacy": privacy_lines(run_dir, all_rounds, cfg=cfg),
        "instrument": get_task(cfg.task).instrument(),
    }
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(run_dir: Path, names: dict[int, str] | None = None, console: Console | None = None) -> dict:
    """Write ``summary.json``, print the results table, then write the plots and ``report.html``."""
    console = console or Console()
    summary = summarize(run_dir)
    names = user_names(run_dir) if names is None else names
    render_summary(run_dir, summary, names=names, console=console)
    from fedpgen.server.report import write_report  # it imports this module

    console.print(f"report: {write_report(run_dir, summary=summary, names=names)}", highlight=False)
    return summary


def render_summary(run_dir: Path, summary: dict[str, Any], *, names: Mapping[int, str], console: Console) -> None:
    """Print the results table and the privacy statement of ``summary`` (:func:`summarize`)."""
    task = TASKS[summary["task"]]
    p = task.primary
    direction = "higher" if task.higher_is_better else "lower"
    label = task.primary_label[:1].upper() + task.primary_label[1:]
    table = Table(title=f"{label} per client, {direction} is better ({run_dir})")
    eps = summary["epsilon-by-client"]
    variants, local = summary["variants"], "local" in summary["variants"]
    titles = {"base": "base", "shared": "shared", "personal": "shared+personal", "local": "local-only"}
    for col in ("client", *(titles[v] for v in variants), "pers. gain", *(("fed. gain",) if local else ()),
                *epsilon_columns(summary)):
        table.add_column(col, justify="right" if col != "client" else "left")
    for c in sorted(read_clients(run_dir), key=lambda r: r["client-index"]):
        name = user_label(int(c["client-index"]), names, c)
        fed = (_fmt_gain(task, _gain(task, c[f"local-{p}"], c[f"personal-{p}"])),) if local else ()
        table.add_row(name, *(f"{c[f'{v}-{p}']:.3f}" for v in variants),
                      _fmt_gain(task, _gain(task, c[f"shared-{p}"], c[f"personal-{p}"])), *fed,
                      *(f"{e:.2f}" for e in epsilon_cells(summary, eps.get(int(c["client-index"]), math.inf))))
    m = summary[f"median-{p}"]
    table.add_row("[bold]median", *(f"{m[v]:.3f}" for v in variants),
                  _fmt_gain(task, summary["median-personalization-gain"]),
                  *((_fmt_gain(task, summary["median-federation-gain"]),) if local else ()),
                  *(f"{e:.2f}" for e in epsilon_cells(summary, statistics.median(eps.values()) if eps else math.inf)))
    console.print(table)
    others = [m for m in task.metric_names if m != p and f"median-{m}" in summary]
    for metric in others:
        med = summary[f"median-{metric}"]
        console.print(f"median {metric}: " + ", ".join(f"{v} {med[v]:.3f}" for v in variants))
    for name, quality in summary["instrument"].items():
        console.print(f"{name} (measures the metrics): " + (", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
            if isinstance(quality, dict) else str(quality)))
    n = summary["clients"]
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    versus_local = (f"beats local-only for {summary['personal-beats-local']}/{n}" if local else
                    "no local-only baseline (device-only evaluation)")
    console.print(f"shared+personal beats shared-only for {summary['personal-beats-shared']}/{n} clients, "
                  f"{versus_local}; "
                  f"bad inputs skipped on devices: {skipped}; "
                  f"{summary['mean-bytes-down-per-client-round'] / 1024:.1f} KiB shared base sent to each device "
                  "per round.")
    if summary["refused"].get(NO_USABLE_DATA):
        console.print(f"[bold yellow]{summary['refused'][NO_USABLE_DATA]} devices had no usable data "
                      "(empty or unusable logs/documents) and refused to take part")
    for line in summary["privacy"]:
        style = "bold red" if line.startswith(("NOT PRIVATE", "NO secure")) or "REFUSED" in line else "bold green"
        console.print(f"[{style}]{line}")
    if summary["ended-short"]:
        console.print(f"[bold red]{summary['ended-short']}")
