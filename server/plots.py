"""PNG plots of a run folder: metrics over rounds, privacy spent and personalization per user.

Users are labelled by name (their folder's name, ``user_names``), rounds with integer ticks.
Up to ``MAX_NAMED_USERS`` users get one named row each; a larger population is drawn as a
distribution (its names are in ``report.html`` and ``clients.csv``).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedpgen.server.results import read_clients, read_config, read_jsonl
from fedpgen.server.summary import evaluated_variants, user_label, user_names
from fedpgen.shared.tasks import TASKS

MAX_NAMED_USERS = 60
"""Above this many users the per-user plots show distributions instead of one named row each."""

VARIANT_TITLES = {"base": "base", "shared": "shared", "personal": "shared+personal", "local": "local-only"}
_MARKERS = {"base": "s", "shared": "o", "personal": "D", "local": "^"}


def user_key(row: Mapping[str, Any]) -> int | str:
    """Who a row of the run's files is about: its client index, or its node id where it has none (deployment)."""
    index = int(row.get("client-index", -1))
    return index if index >= 0 else f"node {row.get('node-id')}"


def epsilon_by_user(run_dir: Path) -> dict[int | str, float]:
    """Each user's cumulative record-level ε, from the last ledger event it reported (by ``user_key``)."""
    return {user_key(r): float(r["dp-epsilon"]) for r in read_jsonl(Path(run_dir) / "client_rounds.jsonl")
            if "dp-epsilon" in r}


def _label(key: int | str, names: Mapping[int, str]) -> str:
    return key if isinstance(key, str) else user_label(key, names)


def _tick_text(name: str, width: int = 28) -> str:
    """A user name as a tick label: shortened, and with ``$`` escaped (no mathtext)."""
    short = name if len(name) <= width else name[: width - 1] + "…"
    return short.replace("$", r"\$")


def _integer_rounds(ax: Axes) -> None:
    """Round axes carry whole rounds only (never 'round 1.5')."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def rounds_figure(run_dir: Path) -> Figure | None:
    """Losses (or the aggregated delta's norm under DP) and wall time per round; ``None`` without rounds."""
    rounds = [r for r in read_jsonl(Path(run_dir) / "rounds.jsonl") if "bytes-down-mean" in r]
    if not rounds:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["round"] for r in rounds]
    keys = [k for k in ("train-loss", "val-loss-before", "val-loss-after") if all(k in r for r in rounds)]
    for key in keys:
        ax1.plot(xs, [r[key] for r in rounds], marker="o", label=key)
    if keys:
        ax1.set(xlabel="round", ylabel="loss (weighted mean over users)", title="Training (no DP)")
        ax1.legend()
    else:  # DP runs send no losses: show the norm of the delta the server aggregated instead
        ax1.plot(xs, [r["delta-norm"] for r in rounds], marker="o")
        ax1.set(xlabel="round", ylabel="norm of the aggregated delta", title="Training (DP: no losses sent)")
    ax2.plot(xs, [r["seconds"] for r in rounds], marker="o")
    ax2.set(xlabel="round", ylabel="seconds", title="Round wall time")
    for ax in (ax1, ax2):
        _integer_rounds(ax)
    fig.tight_layout()
    return fig


def privacy_figure(run_dir: Path, names: Mapping[int, str] | None = None) -> Figure | None:
    """Record-level ε per user: over rounds (left) and spent at the end, by user name (right);
    under user-level DP also the server's user-level ε over rounds (the same for every user),
    alone when the devices ran no DP-SGD.

    ``None`` when nothing reported a finite ε (no DP, or no ledger events and no rounds)."""
    rows = [r for r in read_jsonl(Path(run_dir) / "client_rounds.jsonl") if "dp-epsilon" in r]
    user = sorted((int(r["round"]), float(r["user-epsilon"])) for r in read_jsonl(Path(run_dir) / "rounds.jsonl")
                  if "user-epsilon" in r)
    record = bool(rows) and all(r["dp-epsilon"] != float("inf") for r in rows)
    if not record and not user:
        return None
    if record:
        fig = _record_level_figure(run_dir, rows, names)
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.set(xlabel="round", ylabel="ε (cumulative)", title="Privacy spent over rounds (no DP-SGD on devices)")
        _integer_rounds(ax)
    if user:
        over = fig.axes[0]
        over.plot([u[0] for u in user], [u[1] for u in user], marker="s", color="tab:purple",
                  label="user-level ε (every user; server's accountant)")
        over.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _record_level_figure(run_dir: Path, rows: list[dict[str, Any]], names: Mapping[int, str] | None) -> Figure:
    """:func:`privacy_figure`'s record-level panels, from the devices' ledger rows."""
    names = dict(names if names is not None else user_names(run_dir))
    budget = read_config(run_dir).dp_epsilon
    by_user: dict[int | str, list[tuple[int, float]]] = {}
    for r in rows:
        by_user.setdefault(user_key(r), []).append((int(r["round"]), float(r["dp-epsilon"])))
    users = sorted(by_user, key=lambda k: (isinstance(k, str), k))
    n = len(users)
    height = max(4.0, 0.18 * n + 1.5) if n <= MAX_NAMED_USERS else 4.5
    fig, (over, final) = plt.subplots(1, 2, figsize=(12, height), gridspec_kw={"width_ratios": [3, 2]})
    rounds = sorted({rnd for points in by_user.values() for rnd, _ in points})
    if n <= 8:
        for i in users:
            points = sorted(by_user[i])
            over.plot([p[0] for p in points], [p[1] for p in points], marker=".",
                      label=_tick_text(_label(i, names)))
        over.legend(fontsize=8)
    else:  # many users: their spread per round, not a tangle of lines
        per_round = {rnd: [e for pts in by_user.values() for r2, e in pts if r2 == rnd] for rnd in rounds}
        over.fill_between(rounds, [min(per_round[r]) for r in rounds], [max(per_round[r]) for r in rounds],
                          alpha=0.3, label=f"min–max over {n} users")
        over.plot(rounds, [statistics.median(per_round[r]) for r in rounds], marker="o", label="median")
        over.legend(fontsize=8)
    over.axhline(budget, color="grey", ls="--", lw=0.8)
    over.set(xlabel="round", ylabel="record-level ε spent (cumulative)", title="Privacy spent over rounds")
    _integer_rounds(over)
    final_eps = epsilon_by_user(run_dir)
    spent = [final_eps[i] for i in users]
    if n <= MAX_NAMED_USERS:
        ys = range(n)
        final.barh(list(ys), spent, color="tab:green")
        final.set_yticks(list(ys), [_tick_text(_label(i, names)) for i in users], fontsize=8)
        final.invert_yaxis()  # first user on top, as in the report's table
        final.set(xlabel="ε spent", title=f"ε per user (budget {budget:g})")
    else:
        final.hist(spent, bins=30, color="tab:green")
        final.set(xlabel="ε spent", ylabel="users", title=f"ε of {n} users (budget {budget:g})")
    final.axvline(budget, color="grey", ls="--", lw=0.8)
    return fig


def personalization_figure(run_dir: Path, names: Mapping[int, str] | None = None) -> Figure | None:
    """The primary metric of every evaluated variant, one row per user (by name); ``None`` without clients."""
    clients = sorted(read_clients(run_dir), key=lambda c: c.get("client-index", -1))
    if not clients:
        return None
    task = TASKS[read_config(run_dir).task]
    names = dict(names if names is not None else user_names(run_dir))
    variants = evaluated_variants(clients, task.primary)
    if not variants:
        return None
    metric = f"{task.primary_label} ({'higher' if task.higher_is_better else 'lower'} is better)"
    n = len(clients)
    if n <= MAX_NAMED_USERS:
        fig, ax = plt.subplots(figsize=(10, max(3.5, 0.3 * n + 1.6)))
        ys = list(range(n))
        for c, y in zip(clients, ys, strict=True):  # a thin line spans each user's variants
            values = [float(c[f"{v}-{task.primary}"]) for v in variants]
            ax.plot([min(values), max(values)], [y, y], color="lightgrey", lw=1, zorder=1)
        for v in variants:
            ax.scatter([float(c[f"{v}-{task.primary}"]) for c in clients], ys, marker=_MARKERS.get(v, "o"),
                       s=28, label=VARIANT_TITLES.get(v, v), zorder=2)
        ax.set_yticks(ys, [_tick_text(user_label(int(c.get("client-index", -1)), names, c)) for c in clients],
                      fontsize=8)
        ax.set_ylim(n - 0.5, -0.5)  # first user on top
        ax.grid(axis="x", alpha=0.3)
        ax.set(xlabel=metric, title=f"Personalization: {task.primary_label} per user")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:  # many users: each variant's values, users ranked by shared+personal
        fig, ax = plt.subplots(figsize=(10, 4.5))
        key = "personal" if "personal" in variants else variants[-1]
        order = sorted(clients, key=lambda c: float(c[f"{key}-{task.primary}"]),
                       reverse=task.higher_is_better)
        xs = list(range(1, n + 1))
        for v in variants:
            ax.plot(xs, [float(c[f"{v}-{task.primary}"]) for c in order], lw=1, label=VARIANT_TITLES.get(v, v))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel=f"user, ranked by {VARIANT_TITLES.get(key, key)} (names: report.html)", ylabel=metric,
               title=f"Personalization: {task.primary_label} of {n} users")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_run(run_dir: Path, names: Mapping[int, str] | None = None) -> list[Path]:
    """Write ``rounds.png``, ``privacy.png`` and ``personalization.png`` where there is data for them.

    Parameters
    ----------
    run_dir
        The run folder.
    names
        User name per client index; by default the population's folder names (``user_names``).

    Returns
    -------
    list[Path]
        The files written.
    """
    run_dir = Path(run_dir)
    if names is None and any((run_dir / f).is_file() for f in ("clients.csv", "client_rounds.jsonl")):
        names = user_names(run_dir)
    figures: dict[str, Any] = {"rounds.png": rounds_figure(run_dir),
                               "privacy.png": privacy_figure(run_dir, names),
                               "personalization.png": personalization_figure(run_dir, names)}
    written = []
    for filename, fig in figures.items():
        if fig is not None:
            fig.savefig(run_dir / filename, dpi=100)
            plt.close(fig)
            written.append(run_dir / filename)
    return written
