"""The audit's outputs: ``<run-dir>/audit/audit.json`` (for machines), ``report.html`` (one
self-contained page with embedded PNGs, to hand on) and a terminal table."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedpgen.audit.runner import AuditResult  # noqa: E402

THREATS = {
    "accounting": "Claims vs arithmetic: every ε in the ledgers, the server's rows and the summary is recomputed "
                  "from its (σ, q, steps, δ) with Opacus PRV, Google dp-accounting PLD and RDP (an upper bound).",
    "whitebox": "The strongest observer of one device: it sees every noised DP-SGD step and plants gradient "
                "(Dirac) canaries, each included with probability 1/2 (Steinke, Nasr & Jagielski 2023). A "
                "measured lower bound above the claimed ε means the mechanism adds less noise than it accounts.",
    "membership": "Does a user's record belong to what trained the shared base? Members = users' training records, "
                  "non-members = their held-out records, scored by four observers: anyone with the final shared "
                  "model (loss threshold; RMIA with the pre-federation base as reference model), a server with "
                  "SecAgg+ (each round's aggregate), a server without it (each device's own update). Checked against "
                  "TPR ≤ e^ε·FPR + δ with confidence limits on both rates.",
    "canaries": "Canaries planted in users' documents before the run (fedpgen plant-canaries): the exposure of "
                "secrets repeated 1×, 10×, 100× under the final shared model (Carlini et al. 2019), and a black-box "
                "one-run lower bound on ε per observer from canaries each planted with probability 1/2.",
    "wire": "What crossed the wire: every recorded message checked against shared/wire.py and scanned for the "
            "devices' raw context.",
}


def as_json(result: AuditResult) -> dict[str, Any]:
    return {
        "run-dir": str(result.run_dir),
        "passed": not result.failed,
        "failed-checks": sorted({c.name for c in result.failed}),
        "counts": dict(Counter(c.status for c in result.checks)),
        "checks": [dataclasses.asdict(c) for c in result.checks],
        "whitebox": [{**dataclasses.asdict(w), "lower-bound": w.lower_bound, "passed": w.passed}
                     for w in result.whitebox],
        "wire": result.wire,
        "membership": [{k: v for k, v in dataclasses.asdict(m).items() if k not in ("fpr", "tpr")}
                       for m in result.membership],
        "exposure": [dataclasses.asdict(e) for e in result.exposure],
        "one-run": result.one_run,
    }


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _whitebox_plot(result: AuditResult) -> str | None:
    if not result.whitebox:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"σ={w.noise_multiplier:.2f}\nT={w.steps}" for w in result.whitebox]
    x = range(len(labels))
    ax.bar([i - 0.25 for i in x], [w.lower_bound for w in result.whitebox], 0.25, label="measured lower bound")
    ax.bar(list(x), [min(w.claimed_epsilon, 50) for w in result.whitebox], 0.25, label="claimed ε")
    ax.bar([i + 0.25 for i in x], [w.max_provable for w in result.whitebox], 0.25, label="max provable")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("ε")
    ax.legend(fontsize=8)
    ax.set_title("white-box one-run audit (95% confidence)")
    return _png(fig)


def _epsilon_plot(result: AuditResult) -> str | None:
    points = [(c.values["claimed"], c.values["pld"]) for c in result.checks
              if c.name == "ledger event: ε recomputed" and "pld" in c.values]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=12)
    top = max(max(p) for p in points) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.set_xlabel("ε claimed by the ledger")
    ax.set_ylabel("ε recomputed (dp-accounting PLD)")
    ax.set_title("every ledger event")
    return _png(fig)


def _roc_plot(result: AuditResult) -> str | None:
    if not result.membership:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    for m in result.membership:
        ax.plot([max(f, 1e-4) for f in m.fpr], [max(t, 1e-4) for t in m.tpr],
                label=f"{m.view.split(':')[-1].strip()[:38]} (AUC {m.auc:.3f})")
    ax.plot([1e-4, 1], [1e-4, 1], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference, per observer")
    ax.legend(fontsize=7)
    return _png(fig)


def _html_table(title: str, headers: list[str], rows: list[list[object]]) -> list[str]:
    """One titled HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
    return [f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>", *body, "</table>"]


def _attack_tables(result: AuditResult) -> list[str]:
    """Membership per observer, one-run bounds per observer, canary exposure per repetition."""
    parts: list[str] = []
    if result.membership:
        parts += _html_table(
            "Membership inference per observer",
            ["observer", "members", "non-members", "AUC [95%]", "TPR@0.1% FPR [95%]", "TPR@1% FPR [95%]"],
            [[m.view, m.members, m.nonmembers, f"{m.auc:.3f} [{m.auc_ci[0]:.3f}, {m.auc_ci[1]:.3f}]",
              *(f"{m.tpr_at[f][0]:.4f} [{m.tpr_at[f][1]:.4f}, {m.tpr_at[f][2]:.4f}]" for f in (0.001, 0.01))]
             for m in result.membership])
    if result.one_run:
        parts += _html_table(
            "Black-box one-run audit per observer (planted canaries, 95% confidence)",
            ["observer", "canaries", "right / guesses", "ε lower bound", "max provable", "claimed ε"],
            [[o["view"], o["canaries"], f"{o['correct']} / {o['guesses']}", f"{o['lower-bound']:.2f}",
              f"{o['max-provable']:.2f}", f"{o['claimed']:.2f}"] for o in result.one_run])
    if result.exposure:
        parts += _html_table(
            "Canary exposure under the final shared model (Secret Sharer; at most log2 10^6 = 19.9)",
            ["repetitions", "exposure (skew-normal fit)", "exposure (empirical, capped)", "candidates"],
            [[e.repetitions, f"{e.exposure_fit:.2f}", f"{e.exposure_empirical:.2f}", e.candidates]
             for e in result.exposure])
    return parts


def write_report(result: AuditResult) -> Path:
    """Write ``audit.json`` and ``report.html`` under ``<run-dir>/audit/``; return the folder."""
    out = result.run_dir / "audit"
    out.mkdir(parents=True, exist_ok=True)
    data = as_json(result)
    (out / "audit.json").write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    verdict = "PASSED" if data["passed"] else f"FAILED: {', '.join(data['failed-checks'])}"
    parts = [f"<h1>Privacy audit of {html.escape(str(result.run_dir))}</h1>",
             f"<p class={'ok' if data['passed'] else 'bad'}><b>{html.escape(verdict)}</b> — "
             f"{html.escape(str(data['counts']))}</p>", "<h2>Threat models</h2><ul>"]
    parts += [f"<li><b>{k}</b>: {html.escape(v)}</li>" for k, v in THREATS.items()]
    parts.append("</ul>")
    for title, png in (("Accounting", _epsilon_plot(result)), ("White-box audit", _whitebox_plot(result)),
                       ("Membership inference", _roc_plot(result))):
        if png:
            parts.append(f"<h2>{title}</h2><img src='data:image/png;base64,{png}'/>")
    parts += _attack_tables(result)
    rows = [r for r in result.wire.get("bytes-per-round", []) if r.get("side") == "server"] \
        or result.wire.get("bytes-per-round", [])
    if rows:  # what crossed the wire, as the server's transcript saw it (else the devices')
        parts.append("<h2>Bytes on the wire per round</h2><table><tr><th>side</th><th>round</th><th>direction</th>"
                     "<th>message</th><th>stage</th><th>messages</th><th>bytes</th></tr>")
        parts += [f"<tr><td>{html.escape(str(r.get('side')))}</td><td>{r.get('round')}</td>"
                  f"<td>{html.escape(str(r.get('direction')))}</td><td>{html.escape(str(r.get('message_type')))}</td>"
                  f"<td>{html.escape(str(r.get('stage') or ''))}</td><td>{r.get('messages')}</td>"
                  f"<td>{r.get('bytes')}</td></tr>" for r in rows]
        parts.append("</table>")
    parts.append("<h2>Checks</h2><table><tr><th>check</th><th>subject</th><th>status</th><th>detail</th></tr>")
    for c in sorted(result.checks, key=lambda c: (c.status != "fail", c.status != "not-checked", c.name)):
        parts.append(f"<tr class={c.status.replace('-', '')}><td>{html.escape(c.name)}</td>"
                     f"<td>{html.escape(c.subject)}</td><td>{c.status}</td><td>{html.escape(c.detail)}</td></tr>")
    parts.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px} .fail td{background:#fdd} .notchecked td{background:#ffd}"
             ".ok{color:#070} .bad{color:#a00}")
    (out / "report.html").write_text(f"<!doctype html><meta charset=utf-8><title>FedPGen audit</title>"
                                     f"<style>{style}</style>{''.join(parts)}", encoding="utf-8")
    return out


def print_table(result: AuditResult, console: Console) -> None:
    """One row per check name: how many passed, failed, were not checked; failures spelled out."""
    table = Table(title=f"Privacy audit of {result.run_dir}")
    for col in ("check", "pass", "fail", "not checked"):
        table.add_column(col, justify="left" if col == "check" else "right")
    names = list(dict.fromkeys(c.name for c in result.checks))
    for name in names:
        n = Counter(c.status for c in result.checks if c.name == name)
        table.add_row(name, str(n["pass"]), f"[bold red]{n['fail']}" if n["fail"] else "0", str(n["not-checked"]))
    console.print(table)
    for m in result.membership:
        console.print(f"membership, {m.view}: AUC {m.auc:.3f}, TPR@0.1% FPR {m.tpr_at[0.001][0]:.4f}", highlight=False)
    for o in result.one_run:
        console.print(f"one-run, {o['view']}: ε ≥ {o['lower-bound']:.2f} (claimed {o['claimed']:.2f}, "
                      f"{o['correct']}/{o['guesses']} right)", highlight=False)
    for e in result.exposure:
        console.print(f"canary exposure at {e.repetitions}×: {e.exposure_fit:.2f} (empirical {e.exposure_empirical:.2f})",
                      highlight=False)
    for c in result.failed:
        console.print(f"[bold red]FAIL[/] {c.name} ({c.subject}): {c.detail}", markup=True, highlight=False)
    for c in (c for c in result.checks if c.status == "not-checked"):
        console.print(f"[yellow]not checked[/] {c.name} ({c.subject}): {c.detail}", highlight=False)
