"""``<run-dir>/report.html``: one self-contained page per run, opened in headless Chromium; the
plots label users by name and rounds by whole numbers."""

from __future__ import annotations

import html
import io
import json
import math
import os
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from PIL import Image, ImageStat
from rich.console import Console

from fedpgen.server.plots import (
    MAX_NAMED_USERS,
    _tick_text,
    personalization_figure,
    privacy_figure,
    rounds_figure,
)
from fedpgen.server.report import REPORT, write_report
from fedpgen.server.results import RunRecorder
from fedpgen.server.summary import print_summary
from fedpgen.shared.config import RunConfig

HOSTILE = ["<img src=x onerror=alert(1)>", 'Tom & "Jerry"', "cost$5"]
# The demo's kind of population (folder names are user names), 20+ of them, and names that would
# break a page or a plot if they went in unescaped.
NAMES = sorted([f"{play}--{who}" for play, who in [
    ("hamlet", "Ham"), ("hamlet", "King"), ("hamlet", "Pol"), ("julius_caesar", "ANTONY"),
    ("julius_caesar", "BRUTUS"), ("lear", "Edg"), ("lear", "Glou"), ("lear", "Kent"), ("lear", "Lear"),
    ("macbeth", "MACBETH"), ("merchant_of_venice", "PORTIA"), ("othello", "IAGO"), ("othello", "OTHELLO"),
    ("romeo_and_juliet", "Juliet"), ("romeo_and_juliet", "Romeo"), ("tempest", "PROSPERO"),
    ("twelfth_night", "VIOLA"), ("as_you_like_it", "ROSALIND"), ("richard_iii", "GLOUCESTER"),
]] + HOSTILE)
ROUNDS = 3


def user_epsilon(rnd: int) -> float:
    """The user-level ε the server's accountant reports after round ``rnd`` in :func:`make_run`'s runs."""
    return 2.5 * rnd / ROUNDS


def make_run(tmp_path: Path, names: list[str] = NAMES, *, deployed: bool = False,
             **overrides: Any) -> tuple[Path, list[dict[str, Any]]]:
    """A finished text run written by the run's own writer (``RunRecorder``), as ``fedpgen simulate``
    leaves it: a ``users/`` folder per name, rounds, every device's ledger events, final metrics.
    ``deployed``: as a deployment's server leaves it (no user folders, client index -1, node ids).

    Returns the run folder and the ledger rows (``client_rounds.jsonl``)."""
    run = tmp_path / "run"
    cfg = RunConfig.from_mapping({"run-dir": str(run), "data": "synthetic", "num-users": len(names),
                                  "num-server-rounds": ROUNDS, "dp": "epsilon", "dp-epsilon": 8.0,
                                  "dp-delta": 1e-5, "secure-aggregation": True, **overrides})
    for name in [] if deployed else names:
        (run / "users" / name).mkdir(parents=True)
    rec = RunRecorder(run, cfg)
    rng = random.Random(0)
    ledger = []
    for rnd in range(1, ROUNDS + 1):
        for i in range(len(names)):
            row = {"round": rnd, "client-index": -1 if deployed else i, "node-id": 1000 + i, "bytes-down": 67584,
                   "num-examples": 100 + i, "train-seconds": 8.4}
            if cfg.record_dp:
                row |= {"dp-accountant": "prv", "dp-attempt": 1, "dp-clip": 1.0, "dp-delta": 1e-5,
                        "dp-epsilon": 8.0 * rnd / ROUNDS - rng.uniform(0.0, 0.01), "dp-sample-rate": 0.05,
                        "dp-sigma": rng.uniform(0.5, 0.8), "dp-steps": 15}
            elif cfg.user_dp != "off":  # what a device without DP-SGD writes in its ledger: no record-level ε
                row |= {"dp-accountant": "none", "dp-attempt": 1, "dp-clip": 0.0, "dp-delta": 1e-5,
                        "dp-epsilon": math.inf, "dp-sample-rate": 0.0, "dp-sigma": 0.0, "dp-steps": 0}
            rec.client_round(row)
            ledger.append(row)
        rec.round({"round": rnd, "clients": len(names), "failures": 0, "rejected": 0, "seconds": 40.0 + rnd,
                   "delta-norm": 0.44, "bytes-down-mean": 67584.0, "secure-aggregation": cfg.secure_aggregation,
                   "epsilon-max": 8.0 * rnd / ROUNDS,
                   **({"user-epsilon": user_epsilon(rnd)} if cfg.user_dp != "off" else {})})
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / f"round_{rnd:04d}.safetensors").touch()
    rec.final_clients([{"client-index": -1 if deployed else i, "node-id": 1000 + i, "num-heldout": 30 + i,
                        **{f"{v}-ppl": 7.0 - d - rng.uniform(0.0, 0.3) for v, d in
                           (("base", 0.0), ("shared", 0.2), ("personal", 0.5), ("local", 0.3))},
                        **{f"{v}-acc": 0.44 + d for v, d in
                           (("base", 0.0), ("shared", 0.01), ("personal", 0.02), ("local", 0.015))}}
                       for i in range(len(names))])
    return run, ledger


class Dom(HTMLParser):
    """What a parsed page holds: table rows by table id, cell texts, elements by tag, image sources."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, list[list[str]]] = {}
        self.tags: dict[str, int] = {}
        self.srcs: list[str] = []
        self._table: str | None = None
        self._body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or ""
        elif tag == "tbody":
            self._body = True
        elif tag == "tr" and self._table is not None and self._body:
            self.rows.setdefault(self._table, []).append([])
        elif tag == "td" and self._table is not None and self._body:
            self._cell = []
        elif tag == "img":
            self.srcs.append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table, self._body = None, False
        elif tag == "td" and self._cell is not None and self._table is not None:
            self.rows[self._table][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> Dom:
    dom = Dom()
    dom.feed(page)
    return dom


def chromium() -> str:
    """The headless browser; a missing one fails the test (it never passes unchecked)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("FEDPGEN_SKIP_BROWSER") == "1":
        pytest.skip("FEDPGEN_SKIP_BROWSER=1 and no Chromium: report.html not opened in a browser")
    pytest.fail("headless Chromium not found: install it (Debian/Ubuntu: apt-get install -y chromium), "
                "or set FEDPGEN_SKIP_BROWSER=1 to skip the browser check")


def browse(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stderr[-2000:]}"
    return done


def test_the_run_report_is_one_self_contained_page_a_browser_renders(tmp_path: Path) -> None:
    # Prepare: a finished demo-like run, summarized as `fedpgen simulate` and `fedpgen summary` do
    run, ledger = make_run(tmp_path)
    out = io.StringIO()
    summary = print_summary(run, console=Console(file=out, width=200))
    # Execute
    page = (run / REPORT).read_text(encoding="utf-8")
    # Assert: written where the summary is, and said so
    assert f"report: {run / REPORT}" in out.getvalue()
    # every user by name, escaped: a name is text, never markup
    for name in NAMES:
        assert f">{html.escape(name)}<" in page
    assert "<img src=x" not in page
    # the privacy statement's numbers are the devices' ledgers' (and the summary's)
    last = {}
    for row in ledger:
        last[row["client-index"]] = row["dp-epsilon"]
    assert sorted(last.values()) == sorted(summary["epsilon-by-client"].values())
    lo, hi = min(last.values()), max(last.values())
    assert f"ε spent {lo:.2f}–{hi:.2f}" in page and "δ = 1e-05" in page and "PRV accountant" in page
    assert "SecAgg+ on: the server saw only the sum" in page and "NOT PRIVATE" not in page
    assert summary["user-epsilon"] is None  # no user-level DP in this run
    # self-contained: no scripts, no external resources, the three plots embedded
    assert "http:" not in page and "https:" not in page and "<script" not in page and "<link" not in page
    assert "url(" not in page and "@import" not in page
    dom = parse(page)
    assert len(dom.srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in dom.srcs)

    # Execute: open it in headless Chromium
    shot = tmp_path / "report.png"
    browse(run / REPORT, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    rendered = parse(browse(run / REPORT, tmp_path / "profile", "--dump-dom").stdout)
    # Assert: a screenshot that is not blank
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2000)
    assert ImageStat.Stat(image).stddev[0] > 20, "the screenshot is (nearly) blank"
    assert len(image.getcolors(maxcolors=1 << 16) or []) > 50
    # the browser parsed every table: one row per user, round, median metric and setting
    assert [r[0] for r in rendered.rows["users"]] == NAMES
    assert [r[-1] for r in rendered.rows["users"]] == [f"{last[i]:.2f}" for i in range(len(NAMES))]
    assert [r[0] for r in rendered.rows["rounds"]] == [str(r) for r in range(1, ROUNDS + 1)]
    assert [r[0] for r in rendered.rows["results"]] == ["ppl (primary)", "acc"]
    assert len(rendered.rows["config"]) == len(RunConfig.from_mapping({}).to_toml_dict())
    assert rendered.tags.get("script", 0) == 0 and rendered.tags["img"] == 3


def test_a_name_that_is_a_script_stays_text(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path, names=["a", "b"])
    # Execute: names given by the caller, as `fedpgen simulate` does
    page = write_report(run, names={0: "<script>alert(1)</script>", 1: "b"}).read_text(encoding="utf-8")
    # Assert
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert parse(page).rows["users"][0][0] == "<script>alert(1)</script>"


def test_plots_label_users_by_name_and_rounds_by_whole_numbers(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path)
    names = dict(enumerate(NAMES))
    # Execute
    figures = {"rounds": rounds_figure(run), "privacy": privacy_figure(run, names),
               "personalization": personalization_figure(run, names)}
    try:
        for fig in figures.values():
            assert fig is not None
            fig.canvas.draw()
        # Assert: every round axis has whole-number ticks (3 rounds: matplotlib alone ticks 1.5, 2.5)
        round_axes = [*figures["rounds"].axes, figures["privacy"].axes[0]]
        for ax in round_axes:
            assert ax.get_xlabel() == "round"
            ticks = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if t.get_text()]
            assert ticks and all(float(t).is_integer() and "." not in t for t in ticks), ticks
        # users are rows labelled by name (first user on top), '$' shown, not read as mathtext
        for fig in (figures["personalization"], figures["privacy"]):
            ax = fig.axes[-1] if fig is figures["privacy"] else fig.axes[0]
            assert [t.get_text() for t in ax.get_yticklabels()] == [_tick_text(n) for n in NAMES]
        assert _tick_text("cost$5") == r"cost\$5"
    finally:
        for fig in figures.values():
            if fig is not None:
                plt.close(fig)


def test_many_users_are_plotted_as_a_distribution_and_all_listed(tmp_path: Path) -> None:
    # Prepare
    names = [f"user-{i:03d}" for i in range(MAX_NAMED_USERS + 5)]
    run, _ = make_run(tmp_path, names=names)
    # Execute
    fig = personalization_figure(run, dict(enumerate(names)))
    page = write_report(run).read_text(encoding="utf-8")
    # Assert: no unreadable wall of names; whole users on the x axis; the table has them all
    assert fig is not None
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not [t.get_text() for t in ax.get_yticklabels() if t.get_text().startswith("user-")]
    assert all(float(t.get_text().replace("\u2212", "-")).is_integer() for t in ax.get_xticklabels() if t.get_text())
    plt.close(fig)
    assert [r[0] for r in parse(page).rows["users"]] == names


def test_a_run_without_dp_or_secagg_says_so_loudly(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path, names=["a", "b", "c"], dp="off", **{"secure-aggregation": False})
    # Execute
    page = write_report(run).read_text(encoding="utf-8")
    # Assert
    assert "<div class='banner bad'>NOT PRIVATE at record level" in page
    assert html.escape("SecAgg+ off: the server saw each device's own") in page
    assert privacy_figure(run) is None and not (run / "privacy.png").exists()
    assert len(parse(page).srcs) == 2


def test_user_level_dp_without_dp_sgd_is_not_called_not_private(tmp_path: Path) -> None:
    # Prepare: no DP-SGD, but user-level DP-FedAvg with noise shares under SecAgg+
    run, _ = make_run(tmp_path, names=["a", "b", "c"], dp="off", **{"user-dp": "distributed"})
    # Execute
    page = write_report(run).read_text(encoding="utf-8")
    # Assert: no false alarm, and the guarantee that does hold is named
    assert "NOT PRIVATE" not in page and "carry no noise" not in page
    assert "User-level DP (distributed DP-FedAvg" in page and "protected only by the user-level guarantee" in page


@pytest.mark.parametrize("dp", ["off", "epsilon"])
def test_a_user_level_run_gives_each_user_the_user_level_epsilon_not_the_records_infinity(tmp_path: Path,
                                                                                         dp: str) -> None:
    # Prepare: user-level DP-FedAvg on the server, with or without DP-SGD on the devices (without it,
    # every device's ledger says ε = inf for its records)
    run, ledger = make_run(tmp_path, names=["a", "b", "c"], dp=dp, **{"user-dp": "distributed"})
    assert dp == "epsilon" or all(row["dp-epsilon"] == math.inf for row in ledger)
    out = io.StringIO()
    # Execute
    summary = print_summary(run, console=Console(file=out, width=200))
    # Assert: summary.json names the user-level ε beside the record-level one
    want = f"{user_epsilon(ROUNDS):.2f}"
    assert json.loads((run / "summary.json").read_text())["user-epsilon"] == pytest.approx(user_epsilon(ROUNDS))
    # the terminal table and the page's users table give each user the user-level ε in its own column;
    # the record-level column is there only when the devices ran DP-SGD
    page = (run / REPORT).read_text(encoding="utf-8")
    rows = parse(page).rows["users"]
    assert [r[-1] for r in rows] == [want] * 3
    table = [line for line in out.getvalue().splitlines() if line.strip().startswith("│ a ")]
    assert len(table) == 1 and table[0].rstrip(" │").endswith(want)
    if dp == "off":
        assert "<th>user ε</th>" in page and "record ε" not in page and "inf" not in table[0]
    else:
        assert [r[-2] for r in rows] == [f"{row['dp-epsilon']:.2f}" for row in ledger[-3:]]
        assert "<th>record ε</th><th>user ε</th>" in page
    # privacy.png plots the user-level ε over the rounds (beside the record-level ε when both are on)
    fig = privacy_figure(run)
    assert fig is not None and (run / "privacy.png").is_file()
    assert "user-level ε over rounds, the same for every user' src=" in page
    (line,) = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label().startswith("user-level ε")]
    assert list(line.get_xdata()) == list(range(1, ROUNDS + 1))
    assert list(line.get_ydata()) == pytest.approx([user_epsilon(r) for r in range(1, ROUNDS + 1)])
    plt.close(fig)


def test_a_deployments_users_are_its_nodes(tmp_path: Path) -> None:
    # Prepare: no names and no client indices, only node ids
    run, ledger = make_run(tmp_path, names=["a", "b", "c"], deployed=True)
    # Execute
    rows = parse(write_report(run).read_text(encoding="utf-8")).rows["users"]
    # Assert: one row per node, each with its own ε
    assert [r[0] for r in rows] == ["node 1000", "node 1001", "node 1002"]
    assert [r[-1] for r in rows] == [f"{row['dp-epsilon']:.2f}" for row in ledger[-3:]]
