"""``<run-dir>/report.html``: one self-contained page per run, to open or hand on.

Header, privacy statement, results, users by name, rounds, the resolved config and the plots
(embedded PNGs). Inline CSS, no scripts, no external resources; every string that comes
from the run folder (user names, config values, paths) is HTML-escaped. The same approach as
the audit's page (``fedpgen/audit/report.py``); ``docs/report.md`` describes the sections.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpgen.server.plots import VARIANT_TITLES, epsilon_by_user, plot_run, user_key
from fedpgen.server.results import read_clients, read_config, read_jsonl
from fedpgen.server.summary import (
    _fmt_gain,
    _gain,
    epsilon_cells,
    epsilon_columns,
    summarize,
    user_label,
    user_level_epsilon,
    user_names,
)
from fedpgen.shared.config import RunConfig
from fedpgen.shared.tasks import TASKS

log = logging.getLogger(__name__)

REPORT = "report.html"
MAX_USER_ROWS = 1000
"""The per-user table lists at most this many users (all of them are in ``clients.csv``)."""

RECORD_UNITS = {
    "text": "a {seq_len}-byte window of one of the user's documents",
    "behavior": "{seq_len} consecutive events of the user's log",
    "image": "one photo",
}

_ROUND_COLUMNS = ("round", "clients", "failures", "rejected", "seconds", "train-loss", "val-loss-before",
                  "val-loss-after", "delta-norm", "epsilon-max", "user-epsilon", "bytes-down-mean")

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1180px;margin:0 auto;
padding:16px 24px;color:#1d2329;background:#fff;font-size:14px;line-height:1.4}
h1{font-size:24px;margin:4px 0 2px} h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #dde1e6;
padding-bottom:3px} .path{color:#5b6570;font-family:monospace;font-size:12px;word-break:break-all}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none} nav{margin:8px 0 4px;font-size:13px}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0} .fact{border:1px solid #dde1e6;border-radius:6px;
padding:5px 10px;background:#f7f8fa} .fact b{display:block;font-size:11px;color:#5b6570;font-weight:600;
text-transform:uppercase;letter-spacing:.03em}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0} th,td{border:1px solid #d5d9de;padding:3px 8px}
th{background:#eef1f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#f8f9fb} td.best{font-weight:700;color:#0b6b2f}
.scroll{overflow-x:auto} ul.privacy{list-style:none;padding:0;margin:6px 0} ul.privacy li{margin:5px 0;
padding:7px 10px;border-radius:6px;border-left:5px solid} li.ok{background:#e8f6ec;border-color:#1e8a43}
li.bad{background:#fdecec;border-color:#c62828;font-weight:600} li.info{background:#eef3fb;border-color:#4a78b5}
.banner{padding:12px 16px;border-radius:6px;font-size:17px;font-weight:700;margin:10px 0}
.banner.bad{background:#c62828;color:#fff} .banner.warn{background:#fff4d6;color:#7a4b00;border:1px solid #e0b44c}
details{margin:6px 0} summary{cursor:pointer;color:#1f5fa8} img{max-width:100%;height:auto;
border:1px solid #eef1f4;margin:6px 0} .note{color:#5b6570;font-size:12px} footer{margin-top:30px;
color:#5b6570;font-size:11.5px;border-top:1px solid #dde1e6;padding-top:6px}
"""


def _e(value: object) -> str:
    """``value`` as HTML text: every ``<``, ``>``, ``&`` and quote escaped."""
    return html.escape(str(value), quote=True)


def _cell(value: object) -> str:
    """One table cell: numbers right-aligned, everything escaped."""
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        return f"<td class=n>{value:,.0f}</td>" if abs(value) >= 1000 else f"<td class=n>{value:.4g}</td>"
    if isinstance(value, int):
        return f"<td class=n>{value}</td>"
    return f"<td>{_e('' if value is None else value)}</td>"


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[object]],
           *, raw: Iterable[Sequence[str]] = ()) -> str:
    """A table with ``id=table_id``; ``rows`` are escaped values, ``raw`` rows ready-made ``<td>`` cells."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = ["<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows]
    body += ["<tr>" + "".join(row) + "</tr>" for row in raw]
    return (f"<div class=scroll><table id={_e(table_id)}><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _num(value: float, digits: int = 3) -> str:
    return f"<td class=n>{value:.{digits}f}</td>"


def _when(path: Path) -> str:
    """A file's modification time, local, to the second; ``""`` when it does not exist."""
    if not path.is_file():
        return ""
    return datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(sep=" ", timespec="seconds")


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def _range(values: Sequence[float], fmt: str) -> str:
    """``a–b`` of sorted ``values`` (one value when they agree)."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _record_level(run_dir: Path, cfg: RunConfig) -> list[tuple[str, str]]:
    """The record-level sentences: the devices' ledgers' ε, δ, σ, C and accountant, or NOT PRIVATE."""
    ledger = [r for r in read_jsonl(Path(run_dir) / "client_rounds.jsonl") if "dp-epsilon" in r]
    eps = sorted(epsilon_by_user(run_dir).values())
    lines: list[tuple[str, str]] = []
    if cfg.record_dp and eps and max(eps) < float("inf"):
        deltas = sorted({float(r["dp-delta"]) for r in ledger if "dp-delta" in r}) or [cfg.dp_delta]
        accountants = sorted({str(r["dp-accountant"]) for r in ledger if "dp-accountant" in r}) or [cfg.dp_accountant]
        clips = sorted({float(r["dp-clip"]) for r in ledger if "dp-clip" in r}) or [cfg.dp_clip]
        sigmas = [float(r["dp-sigma"]) for r in ledger if "dp-sigma" in r]
        unit = RECORD_UNITS.get(cfg.task, "one training record").format(seq_len=cfg.seq_len)
        lines.append(("ok", (
            f"Record-level (ε, δ)-DP per user via DP-SGD: ε spent {_range(eps, '.2f')} "
            f"(median {statistics.median(eps):.2f}, budget {cfg.dp_epsilon:g}), "
            f"δ = {', '.join(f'{d:g}' for d in deltas)}, {'/'.join(a.upper() for a in accountants)} accountant, "
            f"per-record clip C = {', '.join(f'{c:g}' for c in clips)}"
            + (f", noise multiplier σ = {_range(sigmas, '.3g')}" if sigmas else "")
            + f". One record is {unit}; the figures are the devices' own ledgers' ({len(eps)} users).")))
        over = [e for e in eps if e > cfg.dp_epsilon * (1 + 1e-9)]
        if over:
            lines.append(("bad", f"{len(over)} users spent more than the budget of {cfg.dp_epsilon:g} "
                                 + f"(up to ε = {max(over):.2f})"))
    elif cfg.record_dp:
        lines.append(("bad", "NOT PRIVATE at record level as far as this folder shows: DP-SGD was configured "
                             + "but no device reported a finite ε"))
    elif cfg.user_dp != "off":  # user-level DP-FedAvg noises the sum: it covers each record with the same ε
        lines.append(("info", f"No DP-SGD on the devices (dp = {cfg.dp}): a record is protected only by the "
                              + "user-level guarantee below, which covers all of a user's records at once"))
    else:
        lines.append(("bad", f"NOT PRIVATE at record level: no DP-SGD (dp = {cfg.dp}"
                             + (", σ = 0" if cfg.dp == "sigma" else "") + "): the shared deltas carry no noise"))
    return lines


def _audit_verdict(run_dir: Path) -> list[tuple[str, str]]:
    """``fedpgen audit``'s verdict, when the folder has been audited."""
    lines: list[tuple[str, str]] = []
    audit = Path(run_dir) / "audit" / "audit.json"
    if audit.is_file():
        try:
            data = json.loads(audit.read_text(encoding="utf-8"))
            failed = ", ".join(str(f) for f in data.get("failed-checks", []))
            verdict = "PASSED" if data.get("passed") else f"FAILED: {failed}"
            lines.append(("ok" if data.get("passed") else "bad",
                          f"Privacy audit (fedpgen audit, audit/report.html): {verdict}"))
        except (ValueError, AttributeError) as exc:
            lines.append(("bad", f"audit/audit.json unreadable: {exc}"))
    return lines


def privacy_statement(run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What this run protects and what it does not, as ``(kind, sentence)`` with kind ``ok``, ``bad`` or ``info``.

    Record-level figures come from the devices' ledger events the server received
    (``client_rounds.jsonl``: ε, δ, σ, C, accountant), each user's ε its newest event's.

    Parameters
    ----------
    run_dir
        The run folder.
    cfg
        Its resolved configuration.
    summary
        Its ``summary.json``.

    Returns
    -------
    list[tuple[str, str]]
        Plain sentences, the most important first.
    """
    lines = _record_level(run_dir, cfg)
    user_eps = user_level_epsilon(read_jsonl(Path(run_dir) / "rounds.jsonl"), cfg)
    if user_eps is not None:
        lines.append(("ok", f"User-level DP ({cfg.user_dp} DP-FedAvg, clip S = {cfg.user_clip:g}, noise "
                            + f"multiplier z = {cfg.user_noise_multiplier:g}): ε = "
                            + f"{user_eps:.2f} per user, δ = {cfg.dp_delta:g}: "
                            + "protects everything a user holds at once"))
    else:
        lines.append(("info", "No user-level DP (user-dp = off): a user's data is protected record by record, "
                              + "not as a whole"))
    if cfg.secure_aggregation:
        lines.append(("ok", "SecAgg+ on: the server saw only the sum of the devices' deltas, never one "
                            + "device's own (each device's example count, dp-* ledger fields, timings and final "
                            + "metrics are plaintext)"))
    else:
        lines.append(("bad", "SecAgg+ off: the server saw each device's own (DP-noised) delta"))
    lines += [("bad" if "REFUSED" in line else "info", line) for line in summary.get("privacy", [])[1:]
              if not line.startswith(("user-level DP", "secure aggregation", "NO secure aggregation"))]
    lines += _audit_verdict(run_dir)
    return lines


def _header(run_dir: Path, cfg: RunConfig, summary: Mapping[str, Any], rounds: list[dict[str, Any]]) -> str:
    seconds = sum(float(r.get("seconds", 0.0)) for r in rounds if "bytes-down-mean" in r)
    started, finished = Path(run_dir) / "config.json", Path(run_dir) / "clients.csv"
    facts = [("task", cfg.task), ("data", cfg.data if cfg.data != "dir" else f"dir: {cfg.data_dir}"),
             ("preset", cfg.preset),
             ("rounds", f"{summary.get('final-round', summary.get('rounds'))} of {summary.get('planned-rounds')}"),
             ("users evaluated", summary.get("clients")),
             ("secure aggregation", "on" if cfg.secure_aggregation else "off"),
             ("finished", _when(finished) or "unknown")]
    if started.is_file() and finished.is_file() and finished.stat().st_mtime >= started.stat().st_mtime:
        facts.append(("wall time", _duration(finished.stat().st_mtime - started.stat().st_mtime)))
    if seconds:
        facts.append(("time in rounds", _duration(seconds)))
    parts = [f"<h1>FedPGen run: {_e(Path(run_dir).resolve().name)}</h1>",
             f"<div class=path>{_e(Path(run_dir).resolve())}</div>",
             "<div class=facts>" + "".join(f"<div class=fact><b>{_e(k)}</b>{_e(v)}</div>" for k, v in facts)
             + "</div>"]
    if summary.get("ended-short"):
        parts.append(f"<div class='banner warn'>{_e(summary['ended-short'])}</div>")
    return "".join(parts)


def _results(summary: Mapping[str, Any]) -> str:
    task = TASKS[summary["task"]]
    variants = list(summary["variants"])
    rows = []
    for metric in task.metric_names:
        medians = summary.get(f"median-{metric}")
        if not medians:
            continue
        cells = [f"<td>{_e(metric)}{' (primary)' if metric == task.primary else ''}</td>"]
        best = None
        if metric == task.primary:
            best = (max if task.higher_is_better else min)(variants, key=lambda v: medians[v])
        cells += [f"<td class='n{' best' if v == best else ''}'>{medians[v]:.3f}</td>" for v in variants]
        rows.append(cells)
    medians_table = _table("results", ["median over users", *(VARIANT_TITLES.get(v, v) for v in variants)], [],
                           raw=rows)
    n = summary["clients"]
    facts: list[tuple[str, str]] = [
        ("shared+personal beats shared-only", f"{summary['personal-beats-shared']} / {n} users"),
        ("median personalization gain (shared → shared+personal)",
         _fmt_gain(task, summary["median-personalization-gain"])),
    ]
    if summary.get("personal-beats-local") is not None:
        facts += [("shared+personal beats local-only", f"{summary['personal-beats-local']} / {n} users"),
                  ("median federation gain (local-only → shared+personal)",
                   _fmt_gain(task, summary["median-federation-gain"]))]
    else:
        facts.append(("local-only baseline", "none (device-only evaluation)"))
    facts += [("bad inputs skipped on devices", ", ".join(f"{k} {v}" for k, v in summary.get("skipped", {}).items())
               or "none"),
              ("devices that refused", ", ".join(f"{k} {v}" for k, v in summary.get("refused", {}).items() if v)
               or "none"),
              ("shared base sent per device per round",
               f"{summary.get('mean-bytes-down-per-client-round', 0.0) / 1024:.1f} KiB")]
    facts += [(f"{name} (measures the metrics)", json.dumps(quality) if isinstance(quality, dict) else str(quality))
              for name, quality in summary.get("instrument", {}).items()]
    direction = "higher" if task.higher_is_better else "lower"
    return (f"<p>{_e(task.primary_label)}: {direction} is better; the best variant is in bold. "
            "Gains are " + ("differences" if task.higher_is_better else "ratios (x)") + ".</p>"
            + medians_table + _table("outcomes", ["outcome", "value"], facts))


EPSILON_NOTES = {"record ε": "record ε: the record-level ε the user's device spent (its ledger)",
                 "user ε": "user ε: the user-level ε, which covers all of a user's data at once (the server's "
                           "accountant)",
                 "ε": "ε: no DP protects this run"}


def _users(run_dir: Path, summary: Mapping[str, Any], names: Mapping[int, str]) -> str:
    task = TASKS[summary["task"]]
    p, variants = task.primary, list(summary["variants"])
    local = "local" in variants
    eps = epsilon_by_user(run_dir)
    clients = sorted(read_clients(run_dir), key=lambda c: c.get("client-index", -1))
    headers = ["user", "held-out records", *(VARIANT_TITLES.get(v, v) for v in variants), "pers. gain",
               *(("fed. gain",) if local else ()), *epsilon_columns(summary)]
    rows = []
    for c in clients[:MAX_USER_ROWS]:
        index = int(c.get("client-index", -1))
        values = {v: float(c[f"{v}-{p}"]) for v in variants}
        best = (max if task.higher_is_better else min)(variants, key=lambda v: values[v])
        cells = [f"<td>{_e(user_label(index, names, c))}</td>", _cell(c.get("num-heldout", ""))]
        cells += [f"<td class='n{' best' if v == best else ''}'>{values[v]:.3f}</td>" for v in variants]
        cells.append(f"<td class=n>{_e(_fmt_gain(task, _gain(task, values['shared'], values['personal'])))}</td>")
        if local:
            cells.append(f"<td class=n>{_e(_fmt_gain(task, _gain(task, values['local'], values['personal'])))}</td>")
        cells += [_num(e, 2) if e is not None else "<td class=n>–</td>"
                  for e in epsilon_cells(summary, eps.get(user_key(c)))]
        rows.append(cells)
    note = (f"<p class=note>The first {MAX_USER_ROWS} of {len(clients)} users; all of them are in clients.csv.</p>"
            if len(clients) > MAX_USER_ROWS else "")
    return (f"<p>Per user, the {_e(task.primary_label)} of each variant, the best in bold"
            + "".join(f"; {_e(EPSILON_NOTES[column])}" for column in epsilon_columns(summary)) + ".</p>"
            + _table("users", headers, [], raw=rows) + note)


def _rounds(rounds: list[dict[str, Any]]) -> str:
    if not rounds:
        return "<p>No rounds recorded.</p>"
    keys = {k for r in rounds for k in r}
    columns = [k for k in _ROUND_COLUMNS if k in keys] + sorted(keys - set(_ROUND_COLUMNS))
    return _table("rounds", columns, [[r.get(k) for k in columns] for r in rounds])


def _config(run_dir: Path) -> str:
    values = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    return (f"<details><summary>Resolved configuration ({len(values)} settings, config.json)</summary>"
            + _table("config", ["setting", "value"], sorted(values.items())) + "</details>")


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def build_report(run_dir: Path, *, summary: Mapping[str, Any], names: Mapping[int, str],
                 plots: Mapping[str, bytes]) -> str:
    """The report page of ``run_dir`` as one HTML string.

    Parameters
    ----------
    run_dir
        The run folder (``config.json``, ``clients.csv``, ``rounds.jsonl``, ``client_rounds.jsonl``).
    summary
        Its summary (``summarize``).
    names
        User name per client index.
    plots
        PNG bytes by file name (``personalization.png``, ``privacy.png``, ``rounds.png``), embedded.

    Returns
    -------
    str
        A self-contained page: inline CSS, embedded images, no scripts, no external resources.
    """
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    rounds = read_jsonl(run_dir / "rounds.jsonl")
    statement = privacy_statement(run_dir, cfg, summary)
    sections = [("privacy", "Privacy"), ("results", "Results"), ("users", "Users"), ("rounds", "Rounds"),
                ("config", "Configuration")]
    parts = [_header(run_dir, cfg, summary, rounds),
             "<nav>" + "".join(f"<a href='#s-{k}'>{t}</a>" for k, t in sections) + "</nav>"]
    if statement and statement[0][1].startswith("NOT PRIVATE"):
        parts.append(f"<div class='banner bad'>{_e(statement[0][1])}</div>")
    parts.append("<h2 id=s-privacy>Privacy</h2><ul class=privacy>"
                 + "".join(f"<li class={kind}>{_e(text)}</li>" for kind, text in statement) + "</ul>")
    if "privacy.png" in plots:
        shown = ["record-level ε spent per user"] * cfg.record_dp + ["user-level ε over rounds, the same for "
                                                                     "every user"] * (cfg.user_dp != "off")
        parts.append(_img(plots["privacy.png"], " and ".join(shown)))
    parts.append("<h2 id=s-results>Results</h2>" + _results(summary))
    if "personalization.png" in plots:
        parts.append(_img(plots["personalization.png"], "primary metric per user and variant"))
    parts.append("<h2 id=s-users>Users</h2>" + _users(run_dir, summary, names))
    samples = sorted((run_dir / "reports").glob("*.png")) if (run_dir / "reports").is_dir() else []
    if samples:
        parts.append("<p class=note>Sample grids (not embedded): "
                     + ", ".join(f"<a href='reports/{_e(p.name)}'>{_e(p.stem)}</a>" for p in samples) + "</p>")
    parts.append("<h2 id=s-rounds>Rounds</h2>" + _rounds(rounds))
    if "rounds.png" in plots:
        parts.append(_img(plots["rounds.png"], "training and wall time per round"))
    parts.append("<h2 id=s-config>Configuration</h2>" + _config(run_dir))
    now = datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    parts.append(f"<footer>Written by fedpgen at {_e(now)} from config.json, summary.json, clients.csv, "
                 "rounds.jsonl and client_rounds.jsonl of this folder.</footer>")
    title = f"FedPGen run {run_dir.resolve().name}"
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dir: Path, *, summary: Mapping[str, Any] | None = None,
                 names: Mapping[int, str] | None = None) -> Path:
    """Render the plots and write ``<run-dir>/report.html``; return its path.

    Parameters
    ----------
    run_dir
        A finished run folder.
    summary
        Its summary; by default ``summarize(run_dir)`` (which also writes ``summary.json``).
    names
        User name per client index; by default the population's folder names (``user_names``).

    Returns
    -------
    Path
        ``<run-dir>/report.html``.
    """
    run_dir = Path(run_dir)
    summary = summarize(run_dir) if summary is None else summary
    names = user_names(run_dir) if names is None else names
    plots = {p.name: p.read_bytes() for p in plot_run(run_dir, names)}
    page = build_report(run_dir, summary=summary, names=names, plots=plots)
    out = run_dir / REPORT
    tmp = out.with_name(f".{REPORT}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a page
    log.debug("wrote %s (%d KiB)", out, len(page) // 1024)
    return out
