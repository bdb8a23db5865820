"""The end-of-run summary: personalization gain (shared+personal vs shared-only) and
federation gain (shared+personal vs local-only), per client and aggregated."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from server.results import read_clients, read_jsonl


def summarize(run_dir: Path) -> dict[str, Any]:
    """Aggregate figures of a finished run (also written to ``summary.json``)."""
    clients = read_clients(run_dir)
    rounds = read_jsonl(Path(run_dir) / "rounds.jsonl")
    if not clients:
        raise RuntimeError(f"{run_dir}: no per-client results (clients.csv)")

    def med(key: str) -> float:
        return statistics.median(float(c[key]) for c in clients)

    summary = {
        "clients": len(clients),
        "rounds": len(rounds),
        "median-ppl": {v: med(f"{v}-ppl") for v in ("base", "shared", "personal", "local")},
        "median-acc": {v: med(f"{v}-acc") for v in ("base", "shared", "personal", "local")},
        "personal-beats-shared": sum(c["personal-ppl"] < c["shared-ppl"] for c in clients),
        "personal-beats-local": sum(c["personal-ppl"] < c["local-ppl"] for c in clients),
        "median-personalization-gain": statistics.median(c["shared-ppl"] / c["personal-ppl"] for c in clients),
        "median-federation-gain": statistics.median(c["local-ppl"] / c["personal-ppl"] for c in clients),
        "skipped-files": sum(int(c.get("skipped-files", 0)) for c in clients),
        "mean-bytes-up-per-client-round": statistics.mean(r["bytes-up-mean"] for r in rounds) if rounds else 0.0,
        "privacy": "NOT PRIVATE: no differential privacy, no secure aggregation (plain shared deltas)",
    }
    (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def print_summary(run_dir: Path, names: dict[int, str] | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    summary = summarize(run_dir)
    table = Table(title=f"Held-out perplexity per client ({run_dir})")
    for col in ("client", "base", "shared", "shared+personal", "local-only", "pers. gain", "fed. gain"):
        table.add_column(col, justify="right" if col != "client" else "left")
    for c in sorted(read_clients(run_dir), key=lambda r: r["client-index"]):
        name = (names or {}).get(int(c["client-index"]), str(c["client-index"]))
        table.add_row(name, f"{c['base-ppl']:.3f}", f"{c['shared-ppl']:.3f}", f"{c['personal-ppl']:.3f}",
                      f"{c['local-ppl']:.3f}", f"{c['shared-ppl'] / c['personal-ppl']:.3f}x",
                      f"{c['local-ppl'] / c['personal-ppl']:.3f}x")
    m = summary["median-ppl"]
    table.add_row("[bold]median", f"{m['base']:.3f}", f"{m['shared']:.3f}", f"{m['personal']:.3f}",
                  f"{m['local']:.3f}", f"{summary['median-personalization-gain']:.3f}x",
                  f"{summary['median-federation-gain']:.3f}x")
    console.print(table)
    n = summary["clients"]
    console.print(f"shared+personal beats shared-only for {summary['personal-beats-shared']}/{n} clients, "
                  f"beats local-only for {summary['personal-beats-local']}/{n}; "
                  f"{summary['skipped-files']} unreadable files skipped; "
                  f"{summary['mean-bytes-up-per-client-round'] / 1024:.1f} KiB uploaded per client per round.")
    console.print(f"[bold red]{summary['privacy']}")
    return summary
