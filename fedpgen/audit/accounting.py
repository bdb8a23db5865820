"""Accounting audit: recompute every ε a run claims, from the raw (σ, q, steps, δ), with
accountants independent of the one that wrote the claim, and check the ledgers' invariants.

Sources, each optional (what is missing is reported as not checked, never guessed):
device state-dirs (the sealed ledger and plan; needs the device key), the server's
``client_rounds.jsonl`` (the ``dp-*`` wire fields it received), ``rounds.jsonl``
(user-level ε) and ``summary.json``.

Tolerances, and why: a recomputation with the *same* accountant on the same history is
deterministic, so it must match to 1e-6 (relative); Google's ``dp-accounting`` PLD and
Opacus' PRV are both near-exact numerical accountants for the Poisson-subsampled Gaussian
whose discretizations differ (measured 1.84 vs 1.83 at q=0.01, σ=1, 1000 steps), so they
must agree within 3% + 0.02; RDP is an upper bound, so it may not fall below PRV by more
than 1%.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import dp_accounting

from fedpgen.shared.privacy.accounting import History, compose, epsilon
from fedpgen.shared.privacy.user_level import noise_survivors, server_view_by_node

SAME, PLD_REL, PLD_ABS, RDP_SLACK = 1e-6, 0.03, 0.02, 0.01


@dataclasses.dataclass(frozen=True)
class Check:
    """One audited claim: ``status`` is pass | fail | not-checked."""

    name: str
    subject: str
    status: str
    detail: str
    values: dict[str, float] = dataclasses.field(default_factory=dict)  # the figures behind it, for plots


def pld_epsilon(history: History, *, delta: float) -> float:
    """ε of ``history`` by Google's ``dp-accounting`` PLD accountant (independent of Opacus)."""
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(acc.get_epsilon(delta))


def _close(a: float, b: float, rel: float, abs_: float = 0.0) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= abs_ + rel * max(abs(a), abs(b))


def recompute(history: History, *, delta: float, accountant: str, claimed: float, subject: str,
              what: str) -> list[Check]:
    """Three accountants on one history against one claimed ε."""
    same = epsilon(history, delta=delta, accountant=accountant)
    prv = epsilon(history, delta=delta, accountant="prv")
    rdp = epsilon(history, delta=delta, accountant="rdp")
    pld = pld_epsilon(history, delta=delta)
    figures = f"claimed {claimed:.4f}; {accountant} {same:.4f}, PRV {prv:.4f}, PLD {pld:.4f}, RDP {rdp:.4f}"
    values = {"claimed": claimed, "same": same, "prv": prv, "pld": pld, "rdp": rdp}
    return [
        Check(f"{what}: ε recomputed", subject, "pass" if _close(same, claimed, SAME) else "fail", figures, values),
        Check(f"{what}: PRV vs PLD", subject, "pass" if _close(prv, pld, PLD_REL, PLD_ABS) else "fail", figures,
              values),
        Check(f"{what}: RDP bounds PRV", subject, "pass" if rdp >= prv * (1 - RDP_SLACK) else "fail", figures,
              values),
    ]


def _history_of(events: list[Any]) -> list[History]:
    """The cumulative history after each event."""
    out, history = [], []
    for e in events:
        if e.private:
            history = compose(history, sigma=e.noise_multiplier, sample_rate=e.sample_rate, steps=e.steps)
        out.append(list(history))
    return out


def audit_device(state_dir: Path, *, cfg: dict[str, Any], key_file: Path | None = None,
                 server_rows: list[dict[str, Any]] | None = None) -> list[Check]:
    """Every check on one device's sealed state; ``server_rows``: its rows of ``client_rounds.jsonl``."""
    from fedpgen.shared.privacy.ledger import PrivacyLedger, participations
    from fedpgen.shared.sealing import TamperedStateError
    from fedpgen.shared.store import DeviceStore, device_sealer

    subject = Path(state_dir).name
    try:
        sealer = device_sealer(Path(state_dir), key_file, create=False)
        ledger = PrivacyLedger(Path(state_dir), sealer)
        events = ledger.events()
        plan, meta = ledger.plan(), DeviceStore(Path(state_dir), sealer).load_meta()
        user_plan = ledger.user_plan()
    except FileNotFoundError as exc:
        return [Check("ledger chain", subject, "not-checked", f"no device key: {exc}")]
    except TamperedStateError as exc:
        return [Check("ledger chain", subject, "fail", str(exc))]
    checks = [Check("ledger chain", subject, "pass", f"{len(events)} events, chain and count verified")]
    if not events:
        return checks
    budget = float(cfg["dp-epsilon"])
    record = [e for e in events if e.unit == "record"]
    private = [e for e in record if e.private]
    for unit, what in (("record", "ledger event"), ("user", "user-level ledger event (vs server)")):
        mine = [e for e in events if e.unit == unit]  # each unit composes on its own (PrivacyLedger.history)
        for event, history in zip(mine, _history_of(mine), strict=True):
            if event.private:
                checks += recompute(history, delta=event.delta, accountant=event.accountant, claimed=event.epsilon,
                                    subject=f"{subject} round {event.round}#{event.attempt}", what=what)
    trained_in = participations(events)
    plans = {(e.noise_multiplier, e.clip, e.sample_rate) for e in private}
    stored = (plan.get("noise_multiplier"), float(cfg["dp-clip"]), plan.get("sample_rate")) if plan else None
    fixed = len(plans) <= 1 and (not private or stored is None or plans == {stored})
    checks.append(Check("plan fixed (σ, C, q)", subject, "pass" if fixed else "fail",
                        f"events used {sorted(plans)}; stored plan {stored}"))
    over = [e for e in private if e.epsilon > budget * (1 + 1e-6)] if cfg.get("dp") == "epsilon" else []
    checks.append(Check("never past the budget", subject, "fail" if over else "pass",
                        f"budget {budget:g}; events over it: {[(e.round, e.epsilon) for e in over]}"))
    cap = int(plan.get("participations", 0)) if plan else int(user_plan.get("dp-max-participations", 0))
    if cap:  # the record-level plan's, else the user-level one's (shared/privacy/plan.py)
        checks.append(Check("never past the participation cap", subject, "pass" if trained_in <= cap else "fail",
                            f"{trained_in} participations (ledger events), planned for at most {cap}"))
    trained = int(meta.get("rounds_trained", trained_in))
    checks.append(Check("every training round has an event", subject, "pass" if trained == trained_in else "fail",
                        f"{trained} rounds trained, {trained_in} participations in the ledger"))
    if server_rows is None:
        checks.append(Check("ledger vs server rows", subject, "not-checked",
                            "no mapping from this state-dir to the server's rows (deployment: client-index -1)"))
        return checks
    by_round: dict[tuple[int, str], list[Any]] = defaultdict(list)
    for e in events:
        by_round[e.round, e.unit].append(e)
    bad = []
    for row in server_rows:
        if "dp-epsilon" not in row:
            continue
        attempt = int(row.get("dp-attempt", 1))
        match = [e for e in by_round.get((int(row["round"]), "record"), []) if e.attempt == attempt]
        user = [e for e in by_round.get((int(row["round"]), "user"), []) if e.attempt == attempt]
        if not match and user and math.isinf(float(row["dp-epsilon"])):
            continue  # user-level DP only: no record-level event, the wire says so (σ = 0, ε = ∞)
        if not match or not _close(match[0].epsilon, float(row["dp-epsilon"]), SAME):
            bad.append((row["round"], attempt, row["dp-epsilon"], match[0].epsilon if match else None))
    checks.append(Check("ledger vs server rows", subject, "fail" if bad else "pass",
                        f"{len(server_rows)} rows; disagreeing (round, attempt, server ε, ledger ε): {bad}"))
    return checks


def audit_server_view(rows: list[dict[str, Any]], *, cfg: dict[str, Any]) -> list[Check]:
    """What the server saw: recompute each device's ε from the ``dp-*`` fields it received."""
    checks: list[Check] = []
    by_client: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "dp-epsilon" in row and "dp-sigma" in row:
            key = row.get("client-index", -1) if row.get("client-index", -1) != -1 else f"node {row.get('node-id')}"
            by_client[key].append(row)
    if not by_client:
        return [Check("server view: dp-* fields", "server", "not-checked", "no dp-* fields in client_rounds.jsonl")]
    for client, crows in sorted(by_client.items(), key=lambda kv: str(kv[0])):
        if any(float(r["dp-sigma"]) <= 0 for r in crows):  # a round without noise: NOT PRIVATE, ε = ∞
            claims = {float(r["dp-epsilon"]) for r in crows if float(r["dp-sigma"]) <= 0}
            checks.append(Check("server view: not private", f"client {client}",
                                "pass" if claims == {math.inf} else "fail",
                                f"rounds without noise claim ε {sorted(claims)} (must be ∞)"))
            continue
        history: History = []
        for row in sorted(crows, key=lambda r: (int(r["round"]), int(r.get("dp-attempt", 1)))):
            if float(row["dp-sigma"]) > 0:
                history = compose(history, sigma=float(row["dp-sigma"]), sample_rate=float(row["dp-sample-rate"]),
                                  steps=int(row["dp-steps"]))
        last = max(crows, key=lambda r: (int(r["round"]), int(r.get("dp-attempt", 1))))
        # Rows the server never got (a reply lost after training) make the server's view short:
        # the recomputation then falls below the claim, which is reported, not hidden.
        checks += recompute(history, delta=float(last["dp-delta"]), accountant=str(last["dp-accountant"]),
                            claimed=float(last["dp-epsilon"]), subject=f"client {client}", what="server view")
    return checks


def audit_user_level(rounds: list[dict[str, Any]], *, cfg: dict[str, Any]) -> list[Check]:
    """User-level (DP-FedAvg) ε per round, recomputed from each round's own client sample rate."""
    if cfg.get("user-dp", "off") == "off":
        return []
    rows = [r for r in rounds if "user-epsilon" in r]
    if not rows or any("client-sample-rate" not in r for r in rows):
        return [Check("user-level ε", "server", "not-checked", "rounds.jsonl lacks user-epsilon or the sample rates")]
    z = float(cfg["user-noise-multiplier"])
    history: History = []
    checks = []
    for row in sorted(rows, key=lambda r: int(r["round"])):
        history = compose(history, sigma=z, sample_rate=float(row["client-sample-rate"]), steps=1)
        checks += recompute(history, delta=float(cfg["dp-delta"]), accountant=str(cfg["dp-accountant"]),
                            claimed=float(row["user-epsilon"]), subject=f"round {row['round']}", what="user-level")
    return checks


def audit_noise_shares(rounds: list[dict[str, Any]], *, cfg: dict[str, Any]) -> list[Check]:
    """Distributed user-level DP: every applied round summed at least the t noise shares its
    devices sized theirs for (``noise_survivors``), else its noise was below the z·S accounted.
    A round whose Poisson draw was empty (``sampled`` 0) took the server's noise alone."""
    if cfg.get("user-dp", "off") != "distributed":
        return []
    rows = [r for r in rounds if "user-epsilon" in r and r.get("sampled") != 0]
    if any("sampled" not in r or "clients" not in r for r in rows):
        return [Check("distributed noise shares", "server", "not-checked",
                      "rounds.jsonl predates its sampled field: how many devices shared the noise is unknown")]
    dropouts = float(cfg.get("user-noise-dropouts", 0.0))
    short = {int(r["round"]): (int(r["clients"]), int(r["sampled"]), noise_survivors(int(r["sampled"]), dropouts))
             for r in rows if int(r["clients"]) < noise_survivors(int(r["sampled"]), dropouts)}
    if not short:
        return [Check("distributed noise shares", "server", "pass",
                      f"{len(rows)} rounds, each summed at least the noise shares its devices sized theirs for "
                      f"(user-noise-dropouts = {dropouts:g})")]
    return [Check("distributed noise shares", "server", "fail",
                  "; ".join(f"round {r}: {k} of {n} sampled devices, shares sized for {t}: noise std "
                            f"{math.sqrt(k / t):.2f}·z·S, below the accounted z·S"
                            for r, (k, n, t) in sorted(short.items())),
                  values={str(r): k / t for r, (k, _, t) in short.items()})]

def audit_summary_user_level(summary: dict[str, Any], rounds: list[dict[str, Any]], *,
                             cfg: dict[str, Any]) -> list[Check]:
    """The summary's user-level ε must be the server's accountant's after its last round (each
    round's figure is recomputed by :func:`audit_user_level`): a summary may not understate it."""
    if cfg.get("user-dp", "off") == "off":
        return []
    if "user-epsilon" not in summary:
        return [Check("summary vs user-level accountant", "summary.json", "not-checked",
                      "summary.json predates its user-epsilon field: write it again with `fedpgen summary RUN_DIR`")]
    rows = [r for r in rounds if "user-epsilon" in r]
    last = float(max(rows, key=lambda r: int(r["round"]))["user-epsilon"]) if rows else 0.0
    claimed = summary["user-epsilon"]
    ok = claimed is not None and _close(float(claimed), last, SAME)
    return [Check("summary vs user-level accountant", "summary.json", "pass" if ok else "fail",
                  f"summary's user-level ε {claimed}; the server's after round "
                  f"{max((int(r['round']) for r in rows), default=0)}: {last:.4f}")]


def audit_user_level_vs_server(summary: dict[str, Any], rounds: list[dict[str, Any]], rows: list[dict[str, Any]], *,
                               cfg: dict[str, Any]) -> list[Check]:
    """The summary's user-level ε against the server (which drew the cohorts: no amplification)
    may not understate the PLD ε of the user the server received most replies from, each reply
    a Gaussian mechanism: multiplier z (distributed, SecAgg+), z/√t (distributed, no SecAgg+;
    t the survivors its share was sized for), no noise at all (central)."""
    mode = cfg.get("user-dp", "off")
    if mode == "off":
        return []
    if "user-epsilon-vs-server" not in summary:
        return [Check("user-level ε against the server", "summary.json", "not-checked",
                      "summary.json predates the field: write it again with `fedpgen summary RUN_DIR`")]
    seen = server_view_by_node(rows, rounds, mode=mode, secure_aggregation=bool(cfg.get("secure-aggregation", True)),
                               noise_multiplier=float(cfg["user-noise-multiplier"]),
                               dropouts=float(cfg.get("user-noise-dropouts", 0.0)))
    worst, who = 0.0, None
    for node, multipliers in seen.items():
        eps = math.inf if min(multipliers) <= 0 else _pld_of_gaussians(tuple(sorted(multipliers)),
                                                                      delta=float(cfg["dp-delta"]))
        if eps > worst:
            worst, who = eps, node
    claimed = summary["user-epsilon-vs-server"]
    claimed_f = math.inf if claimed is None else float(claimed)
    ok = claimed is not None and (math.isinf(worst) and math.isinf(claimed_f)
                                  or claimed_f >= worst * (1 - PLD_REL) - PLD_ABS)
    return [Check("user-level ε against the server", "summary.json", "pass" if ok else "fail",
                  f"claimed {claimed}; PLD of the user the server saw most (node {who}, "
                  f"{len(seen.get(who, []))} replies): {worst:.4f}", {"claimed": claimed_f, "pld": worst})]


@functools.lru_cache(maxsize=256)
def _pld_of_gaussians(multipliers: tuple[float, ...], *, delta: float) -> float:
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for m in multipliers:
        acc.compose(dp_accounting.GaussianDpEvent(m))
    return float(acc.get_epsilon(delta))

def audit_summary(summary: dict[str, Any], ledger_eps: dict[int, list[float]]) -> list[Check]:
    """The summary's ε per client must be one its ledger recorded (the last the server received)."""
    claimed = {int(k): float(v) for k, v in summary.get("epsilon-by-client", {}).items()}
    bad = [(c, eps) for c, eps in claimed.items()
           if c in ledger_eps and not any(_close(eps, e, SAME) for e in ledger_eps[c])]
    return [Check("summary vs ledgers", "summary.json", "fail" if bad else "pass",
                  f"{len(claimed)} clients; summary ε found in no ledger event: {bad}")]


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
