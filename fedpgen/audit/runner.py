"""``fedpgen audit RUN_DIR``: run the chosen audits on a run folder (and the device state-dirs
given) and collect their checks. Writing the report is ``report.py``'s job."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from fedpgen.audit.accounting import (Check, audit_device, audit_noise_shares, audit_server_view, audit_summary,
                                      audit_summary_user_level, audit_user_level, audit_user_level_vs_server,
                                      load_json)
from fedpgen.audit.canaries import Exposure
from fedpgen.audit.membership import MembershipResult
from fedpgen.audit.whitebox import WhiteboxResult, audit_mechanism

log = logging.getLogger(__name__)

ATTACKS = ("accounting", "whitebox", "wire", "membership", "canaries")


@dataclasses.dataclass
class AuditResult:
    run_dir: Path
    checks: list[Check] = dataclasses.field(default_factory=list)
    whitebox: list[WhiteboxResult] = dataclasses.field(default_factory=list)
    wire: dict[str, Any] = dataclasses.field(default_factory=dict)
    membership: list[MembershipResult] = dataclasses.field(default_factory=list)
    exposure: list[Exposure] = dataclasses.field(default_factory=list)
    one_run: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # black-box one-run bounds per view

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from fedpgen.server.results import read_jsonl

    return read_jsonl(path)


def _client_indices(run_dir: Path, cfg: dict[str, Any]) -> dict[str, int]:
    """Simulation: user folder name -> partition id (the sorted order ``fedpgen simulate`` uses)."""
    from fedpgen.shared.data.user_folder import list_user_dirs

    folder = Path(cfg["data-dir"]).expanduser() if cfg.get("data") == "dir" else run_dir / "users"
    try:
        return {p.name: i for i, p in enumerate(list_user_dirs(folder))}
    except (FileNotFoundError, ValueError):
        return {}


def audit_run(run_dir: Path, *, devices: list[Path] | None = None, key_file: Path | None = None,
              attacks: tuple[str, ...] = ATTACKS, canaries: int = 1000, users_dir: Path | None = None) -> AuditResult:
    """Audit ``run_dir`` (a simulation's or a deployment server's run folder).

    ``devices``: state-dirs to audit (default: ``<run-dir>/devices/*`` of a simulation);
    ``users_dir``: the users' device folders, for the wire audit's raw-context scan (default:
    the simulation's population).
    """
    run_dir = Path(run_dir)
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        raise ValueError(f"unknown audit {sorted(unknown)}; valid: {', '.join(ATTACKS)}")
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    cfg = load_json(run_dir / "config.json")
    result = AuditResult(run_dir=run_dir)
    rows = _read_jsonl(run_dir / "client_rounds.jsonl")
    if devices is None:
        devices = sorted(p for p in (run_dir / "devices").glob("*") if p.is_dir()) if (run_dir / "devices").is_dir() \
            else []
    if "accounting" in attacks:
        result.checks += _accounting(run_dir, cfg, rows, devices, key_file)
    if "whitebox" in attacks:
        result.whitebox = _whitebox(cfg, rows, devices, key_file, canaries)
        for wb in result.whitebox:
            result.checks.append(Check(
                "white-box lower bound within the claim", f"σ={wb.noise_multiplier:.3f} q={wb.sample_rate:.3g} "
                f"T={wb.steps}", "pass" if wb.passed else "fail",
                f"measured ε ≥ {wb.lower_bound:.2f} (95%), claimed {wb.claimed_epsilon:.2f}, "
                f"{wb.guesses.correct}/{wb.guesses.r} guesses right, {wb.guesses.m} canaries "
                f"(at most {wb.max_provable:.2f} provable)"))
        if not result.whitebox:
            result.checks.append(Check("white-box lower bound within the claim", "run", "not-checked",
                                       "the run is not private at record level (no DP-SGD to audit)"))
    if "wire" in attacks:
        result.wire, wire_checks = _wire(run_dir, cfg, devices, key_file, users_dir)
        result.checks += wire_checks
    if "membership" in attacks or "canaries" in attacks:
        result.checks += _attacks(run_dir, cfg, result, attacks)
    return result


def _attacks(run_dir: Path, cfg_dict: dict[str, Any], result: AuditResult, attacks: tuple[str, ...]) -> list[Check]:
    """Membership inference under every view, and the planted canaries (exposure, one-run bounds)."""
    from fedpgen.audit import canaries
    from fedpgen.audit.views import VIEWS, Observer
    from fedpgen.shared.config import RunConfig

    mia_name, canary_name = "membership inference within the DP bound", "one-run lower bound within the claim"
    cfg = RunConfig.from_mapping(cfg_dict)
    checks, planted = [], None
    if "canaries" in attacks:
        try:
            planted = canaries.load(run_dir)
            why = "no canaries were planted before this run (fedpgen plant-canaries)"
        except ValueError as exc:
            why = str(exc)
        if planted is not None and cfg.task != "text":
            planted, why = None, f"canaries are planted in documents: the text task only (this run: {cfg.task})"
        if planted is None:
            checks.append(Check(canary_name, "run", "not-checked", why))
    wanted = ([mia_name] if "membership" in attacks else []) + ([canary_name] if planted is not None else [])
    if not wanted:
        return checks
    try:
        observer = Observer(run_dir, cfg)
    except (FileNotFoundError, ValueError) as exc:  # no checkpoint, no users' folders
        return checks + [Check(name, "run", "not-checked", str(exc)) for name in wanted]
    eps = float(cfg.dp_epsilon) if cfg.record_dp else float("inf")
    for view, label in VIEWS.items():
        reason = observer.available(view)
        if reason:
            checks += [Check(name, label, "not-checked", reason) for name in wanted]
            continue
        if "membership" in attacks:
            checks.append(_membership_check(observer, view, label, eps, cfg.dp_delta, result))
        if planted is not None:
            checks.append(_one_run_check(observer, planted, view, label, eps, cfg.dp_delta, result))
    if planted is not None:
        result.exposure = canaries.measure_exposure(planted, observer.final_losses)
    return checks


def _membership_check(observer: Any, view: str, label: str, eps: float, delta: float, result: AuditResult) -> Check:
    from fedpgen.audit.membership import view_attack

    name = "membership inference within the DP bound"
    try:
        mia = view_attack(observer, view, epsilon=eps, delta=delta)
    except ValueError as exc:
        return Check(name, label, "not-checked", str(exc))
    result.membership.append(mia)
    low, high = mia.tpr_at[0.001][1:], mia.tpr_at[0.01][1:]
    return Check(name, label, "pass" if mia.worst_excess <= 0 else "fail",
                 f"{mia.members} members / {mia.nonmembers} non-members, AUC {mia.auc:.3f} "
                 f"[{mia.auc_ci[0]:.3f}, {mia.auc_ci[1]:.3f}], TPR@0.1% FPR {mia.tpr_at[0.001][0]:.4f} "
                 f"[{low[0]:.4f}, {low[1]:.4f}], TPR@1% FPR {mia.tpr_at[0.01][0]:.4f} [{high[0]:.4f}, {high[1]:.4f}]",
                 {"auc": mia.auc, "tpr@0.001": mia.tpr_at[0.001][0], "tpr@0.01": mia.tpr_at[0.01][0]})


def _one_run_check(observer: Any, planted: Any, view: str, label: str, eps: float, delta: float,
                   result: AuditResult) -> Check:
    """Steinke et al.'s one-run audit, black box: each one-run canary scored by the view."""
    import numpy as np

    from fedpgen.audit.canaries import canary_text
    from fedpgen.audit.one_run import best_guesses, max_provable

    items = planted.of("one-run")
    if len(items) < 2:
        return Check("one-run lower bound within the claim", label, "not-checked", "fewer than 2 one-run canaries")
    scores = np.zeros(len(items))
    by_user: dict[str, list[int]] = {}
    for i, c in enumerate(items):
        by_user.setdefault(c.user, []).append(i)
    for user, idx in by_user.items():
        recs = observer.canary_records(user, [canary_text(items[i].secret) for i in idx])
        scores[idx] = observer.score(view, user, recs, "one-run-canaries")
    included = np.array([c.included for c in items])
    g = best_guesses(scores, included, delta=delta)
    ceiling = max_provable(m=g.m, r=g.r, delta=delta)
    result.one_run.append({"view": label, "canaries": g.m, "guesses": g.r, "correct": g.correct,
                           "lower-bound": g.epsilon, "claimed": eps, "max-provable": ceiling})
    return Check("one-run lower bound within the claim", label, "pass" if g.epsilon <= eps else "fail",
                 f"measured ε ≥ {g.epsilon:.2f} (95%), claimed {eps:.2f}: {g.correct}/{g.r} guesses right on "
                 f"{g.m} planted-or-not canaries (at most {ceiling:.2f} provable)",
                 {"lower-bound": g.epsilon, "claimed": eps})


def _accounting(run_dir: Path, cfg: dict[str, Any], rows: list[dict[str, Any]], devices: list[Path],
                key_file: Path | None) -> list[Check]:
    checks: list[Check] = []
    index = _client_indices(run_dir, cfg)
    ledger_eps: dict[int, list[float]] = {}
    for state in devices:
        client = index.get(state.name)
        mine = [r for r in rows if r.get("client-index") == client] if client is not None else None
        checks += audit_device(state, cfg=cfg, key_file=key_file, server_rows=mine)
        if client is not None:
            try:
                from fedpgen.shared.privacy.ledger import PrivacyLedger
                from fedpgen.shared.store import device_sealer

                ledger = PrivacyLedger(state, device_sealer(state, key_file, create=False))
                # what each reply said on the wire: the record-level ε (∞ under user-level DP only)
                ledger_eps[client] = [e.epsilon for e in ledger.events("record")] or [math.inf]
            except Exception:  # already reported by audit_device (tampered, no key)
                pass
    if not devices:
        checks.append(Check("device ledgers", "run", "not-checked",
                            "no device state-dirs given (--devices): auditing what the server saw only"))
    checks += audit_server_view(rows, cfg=cfg)
    rounds = _read_jsonl(run_dir / "rounds.jsonl")
    checks += audit_user_level(rounds, cfg=cfg)
    checks += audit_noise_shares(rounds, cfg=cfg)
    if (run_dir / "summary.json").is_file():
        summary = load_json(run_dir / "summary.json")
        checks += audit_summary_user_level(summary, rounds, cfg=cfg)
        checks += audit_user_level_vs_server(summary, rounds, rows, cfg=cfg)
        if ledger_eps:
            checks += audit_summary(summary, ledger_eps)
    return checks


def _plans(cfg: dict[str, Any], rows: list[dict[str, Any]], devices: list[Path],
           key_file: Path | None) -> set[tuple[float, float, float, int]]:
    """Distinct (σ, C, q, total DP steps) the devices ran: from their ledgers, else the server's rows."""
    from fedpgen.shared.privacy.ledger import PrivacyLedger
    from fedpgen.shared.store import device_sealer

    plans = set()
    for state in devices:
        try:
            events = [e for e in PrivacyLedger(state, device_sealer(state, key_file, create=False)).events("record")
                      if e.private]
        except Exception:  # reported by the accounting audit
            continue
        if events:
            plans.add((events[0].noise_multiplier, events[0].clip, events[0].sample_rate, sum(e.steps for e in events)))
    if not plans:
        steps: dict[Any, list[dict[str, Any]]] = {}
        for r in rows:
            if float(r.get("dp-sigma", 0)) > 0:
                steps.setdefault(r.get("client-index", r.get("node-id")), []).append(r)
        for crows in steps.values():
            r0 = crows[0]
            plans.add((float(r0["dp-sigma"]), float(r0["dp-clip"]), float(r0["dp-sample-rate"]),
                       sum(int(r["dp-steps"]) for r in crows)))
    return plans


def _whitebox(cfg: dict[str, Any], rows: list[dict[str, Any]], devices: list[Path], key_file: Path | None,
              canaries: int) -> list[WhiteboxResult]:
    plans = sorted(_plans(cfg, rows, devices, key_file))
    if len(plans) > 3:  # devices with as many records share a plan; audit the extremes and the middle
        plans = [plans[0], plans[len(plans) // 2], plans[-1]]
    return [audit_mechanism(noise_multiplier=s, clip=c, sample_rate=q, steps=t, delta=float(cfg["dp-delta"]),
                            canaries=canaries, accountant=str(cfg["dp-accountant"]))
            for s, c, q, t in plans]


def _wire(run_dir: Path, cfg: dict[str, Any], devices: list[Path], key_file: Path | None,
          users_dir: Path | None) -> tuple[dict[str, Any], list[Check]]:
    try:
        from fedpgen.audit import wire_scan
    except ImportError:
        return {}, [Check("wire transcript", "run", "not-checked", "the wire audit is not available")]
    return wire_scan.audit_wire(run_dir, cfg=cfg, devices=devices, key_file=key_file, users_dir=users_dir)
