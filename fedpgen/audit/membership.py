"""Membership inference: does a record of some user belong to what trained the shared base?

Members: each user's training records; non-members: the same users' held-out records (never
trained on; the device's own deterministic split). The observers and their scores (final
model, calibrated; aggregate; per-device update) are ``fedpgen/audit/views.py``'s.
Reported: AUC (Mann–Whitney) with a bootstrap 95% interval, TPR at 0.1% and 1% FPR with Clopper–Pearson 95% intervals, and the ROC curve.

Check against the claim: (ε, δ)-DP for each record bounds any test by TPR ≤ e^ε·FPR + δ;
at every point of the curve the TPR's lower 95% limit must stay below e^ε times the FPR's
upper 95% limit, plus δ (pointwise limits: a screen for gross violations, weaker than the
one-run audit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from scipy import stats

FPRS = (0.001, 0.01)


@dataclasses.dataclass(frozen=True)
class MembershipResult:
    view: str
    members: int
    nonmembers: int
    auc: float
    auc_ci: tuple[float, float]
    tpr_at: dict[float, tuple[float, float, float]]  # fpr -> (tpr, low, high)
    fpr: list[float]
    tpr: list[float]
    worst_excess: float  # max over the curve of TPR_low - (e^ε·FPR + δ); > 0 refutes the claim


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return low, high


def roc(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of "member if score ≥ t" over every threshold t, from (0, 0) to (1, 1).

    Only thresholds an attacker can set: records with equal scores (a record and its copy,
    one trained on and one held out) are on the same side of every threshold, so a tie group
    adds one point, never a member before a non-member."""
    scores = np.concatenate([members, nonmembers])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.cumsum(truth[order]), np.cumsum(1 - truth[order])
    ends = np.flatnonzero(np.append(np.diff(scores[order]) != 0, True))  # the last record of each tie group
    return (np.concatenate([[0.0], fp[ends] / max(len(nonmembers), 1)]),
            np.concatenate([[0.0], tp[ends] / max(len(members), 1)]))


def analyse(members: np.ndarray, nonmembers: np.ndarray, *, epsilon: float, delta: float, view: str,
            seed: int = 0) -> MembershipResult:
    """AUC, TPR at low FPR and the DP-bound check for scores (higher: more likely a member)."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError(f"membership inference needs members and non-members, got {len(members)} and "
                         f"{len(nonmembers)}")
    auc = float(stats.mannwhitneyu(members, nonmembers).statistic) / (len(members) * len(nonmembers))
    rng = np.random.default_rng(seed)
    boot = [float(stats.mannwhitneyu(rng.choice(members, len(members)), rng.choice(nonmembers, len(nonmembers)))
                  .statistic) / (len(members) * len(nonmembers)) for _ in range(200)]
    fpr, tpr = roc(members, nonmembers)
    tpr_at = {}
    for target in FPRS:
        i = int(np.searchsorted(fpr, target, side="right")) - 1  # the last point with FPR ≤ target
        k = int(round(tpr[i] * len(members)))
        tpr_at[target] = (float(tpr[i]), *clopper_pearson(k, len(members)))
    # Both rates are estimates: the claim is refuted only where the TPR's lower limit exceeds
    # e^ε times the FPR's upper limit (+ δ). Pointwise 95% limits, not corrected over the curve.
    fpr_high = np.array([clopper_pearson(int(round(f * len(nonmembers))), len(nonmembers))[1] for f in fpr])
    bound = np.minimum(1.0, np.exp(min(epsilon, 700.0)) * fpr_high + delta)
    lows = np.array([clopper_pearson(int(round(t * len(members))), len(members))[0] for t in tpr])
    return MembershipResult(view=view, members=len(members), nonmembers=len(nonmembers), auc=auc,
                            auc_ci=(float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
                            tpr_at=tpr_at, fpr=fpr.tolist(), tpr=tpr.tolist(),
                            worst_excess=float((lows - bound).max()))


@torch.no_grad()
def record_losses(model: torch.nn.Module, task: Any, records: torch.Tensor, chunk: int = 64) -> np.ndarray:
    """Per-record loss, deterministic (a stochastic loss draws from a fixed seed in a forked RNG)."""
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = [task.per_record_loss(model, records[i : i + chunk]).float() for i in range(0, records.shape[0], chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def view_attack(observer: Any, view: str, *, epsilon: float, delta: float) -> MembershipResult:
    """Members: every user's training records; non-members: their held-out records, scored by
    one view of :class:`fedpgen.audit.views.Observer` (only users the view says anything about)."""
    from fedpgen.audit.views import VIEWS
    from fedpgen.shared.tasks import NoUsableDataError

    members, nonmembers = [], []
    for user in observer.participants(view):
        try:
            data = observer.user_data(user)
        except NoUsableDataError:
            continue
        members.append(observer.score(view, user, data.train, "train"))
        nonmembers.append(observer.score(view, user, data.heldout, "heldout"))
    if not members:
        raise ValueError(f"{view}: no user's records to attack")
    return analyse(np.concatenate(members), np.concatenate(nonmembers), epsilon=epsilon, delta=delta,
                   view=VIEWS[view])
