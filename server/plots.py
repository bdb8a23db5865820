"""PNG plots of a run folder: metrics over rounds and per-client personalization."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from server.results import read_clients, read_jsonl  # noqa: E402


def plot_run(run_dir: Path) -> list[Path]:
    """Write ``rounds.png`` and ``personalization.png``; return the paths written."""
    run_dir = Path(run_dir)
    written = []
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    if rounds:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        xs = [r["round"] for r in rounds]
        for key in ("train-loss", "val-loss-before", "val-loss-after"):
            if all(key in r for r in rounds):
                ax1.plot(xs, [r[key] for r in rounds], marker="o", label=key)
        ax1.set(xlabel="round", ylabel="loss (weighted mean over clients)", title="Training")
        ax1.legend()
        ax2.plot(xs, [r["bytes-up-mean"] / 1024 for r in rounds], marker="o")
        ax2.set(xlabel="round", ylabel="KiB uploaded per client", title="Upload per client")
        fig.tight_layout()
        fig.savefig(run_dir / "rounds.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "rounds.png")
    clients = read_clients(run_dir)
    if clients:
        fig, ax = plt.subplots(figsize=(max(6, len(clients) * 0.35), 4))
        variants = ["base", "shared", "personal", "local"]
        width = 0.2
        for i, v in enumerate(variants):
            ax.bar([c + (i - 1.5) * width for c in range(len(clients))], [r[f"{v}-ppl"] for r in clients],
                   width=width, label=v)
        ax.set(xlabel="client", ylabel="held-out perplexity (lower is better)", title="Personalization")
        lo = min(r[f"{v}-ppl"] for r in clients for v in variants)
        hi = max(r[f"{v}-ppl"] for r in clients for v in variants)
        ax.set_ylim(lo * 0.95, hi * 1.02)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "personalization.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "personalization.png")
    return written
