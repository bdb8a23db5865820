"""PNG plots of a run folder: metrics over rounds and per-client personalization."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpgen.server.results import read_clients, read_config, read_jsonl  # noqa: E402
from fedpgen.server.summary import evaluated_variants  # noqa: E402
from fedpgen.shared.tasks import TASKS  # noqa: E402


def plot_run(run_dir: Path) -> list[Path]:
    """Write ``rounds.png`` and ``personalization.png``; return the paths written."""
    run_dir = Path(run_dir)
    written = []
    rounds = [r for r in read_jsonl(run_dir / "rounds.jsonl") if "bytes-down-mean" in r]
    if rounds:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["round"] for r in rounds]
        keys = [k for k in ("train-loss", "val-loss-before", "val-loss-after") if all(k in r for r in rounds)]
        for key in keys:
            ax1.plot(xs, [r[key] for r in rounds], marker="o", label=key)
        if keys:
            ax1.set(xlabel="round", ylabel="loss (weighted mean over clients)", title="Training (no DP)")
            ax1.legend()
        else:  # DP runs send no losses: show the mean delta norm the server aggregated instead
            ax1.plot(xs, [r["delta-norm"] for r in rounds], marker="o")
            ax1.set(xlabel="round", ylabel="norm of the aggregated delta", title="Training (DP: no losses sent)")
        ax2.plot(xs, [r["seconds"] for r in rounds], marker="o")
        ax2.set(xlabel="round", ylabel="seconds", title="Round wall time")
        fig.tight_layout()
        fig.savefig(run_dir / "rounds.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "rounds.png")
    eps_rows = [r for r in read_jsonl(run_dir / "client_rounds.jsonl") if "dp-epsilon" in r]
    if eps_rows and all(r["dp-epsilon"] < float("inf") for r in eps_rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        by_client: dict[int, list[tuple[int, float]]] = {}
        for r in eps_rows:
            by_client.setdefault(int(r["client-index"]), []).append((r["round"], r["dp-epsilon"]))
        for points in by_client.values():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", alpha=0.6)
        ax.set(xlabel="round", ylabel="record-level ε spent (cumulative)", title="Privacy spent per user")
        fig.tight_layout()
        fig.savefig(run_dir / "privacy.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "privacy.png")
    clients = read_clients(run_dir)
    if clients:
        task = TASKS[read_config(run_dir).task]
        fig, ax = plt.subplots(figsize=(max(6, len(clients) * 0.35), 4))
        width = 0.2
        metric = f"{task.primary_label} ({'higher' if task.higher_is_better else 'lower'} is better)"
        variants = evaluated_variants(clients, task.primary)
        for i, v in enumerate(variants):
            ax.bar([c + (i - (len(variants) - 1) / 2) * width for c in range(len(clients))],
                   [r[f"{v}-{task.primary}"] for r in clients], width=width, label=v)
        ax.set(xlabel="client", ylabel=metric, title="Personalization")
        lo = min(r[f"{v}-{task.primary}"] for r in clients for v in variants)
        hi = max(r[f"{v}-{task.primary}"] for r in clients for v in variants)
        ax.set_ylim(0.0 if task.higher_is_better else lo * 0.95, max(hi * 1.02, lo + 1e-6))
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "personalization.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "personalization.png")
    return written
