"""The one-run empirical ε lower bound (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy
auditing with one (1) training run", Theorem 3 / Algorithm 2). Pure math, no state.

``m`` canaries are each included in training independently with probability 1/2. After
training, the auditor scores every canary, guesses "included" for the ``k_plus`` highest
scores and "excluded" for the ``k_minus`` lowest, and abstains on the rest. Under
(ε, δ)-DP, the number of correct guesses among the ``r = k_plus + k_minus`` is stochastically
dominated by Binomial(r, e^ε / (1 + e^ε)) up to a δ term; ``epsilon_lower_bound`` is the
largest ε that the observed ``v`` correct guesses reject at confidence ``1 − p``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] under (ε, δ)-DP with m canaries (the paper's Theorem 3)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε >= 0 and δ in [0, 1], got ε={epsilon}, δ={delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = total = 0.0  # total = P[v > Binomial(r, q) >= v - i]
    for i in range(1, v + 1):
        total += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, total / i)
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected with ``confidence`` by ``v`` correct of ``r`` guesses (0 if none)."""
    p = 1.0 - confidence
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0  # p_value(lo) < p <= p_value(hi)
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < p:
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < p else (lo, mid)
    return lo


def max_provable(*, m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The bound a perfect attack (all r guesses right) would show with these many canaries."""
    return epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=confidence)


@dataclasses.dataclass(frozen=True)
class Guesses:
    m: int
    r: int
    correct: int
    epsilon: float  # the lower bound at the given confidence
    k_plus: int
    k_minus: int


def best_guesses(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95,
                 k_values: tuple[int, ...] = ()) -> Guesses:
    """Guess "in" for the ``k`` highest and "out" for the ``k`` lowest scores, for each ``k`` in
    ``k_values`` (default: a few fractions of m); keep the k with the highest bound.

    Choosing k after seeing the outcome costs confidence: the bound is computed at
    ``1 − (1 − confidence) / len(k_values)`` (Bonferroni), so the result holds at ``confidence``.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = int(scores.shape[0])
    if m == 0 or included.shape != scores.shape:
        raise ValueError(f"scores ({scores.shape}) and inclusion ({included.shape}) must be non-empty and alike")
    ks = k_values or tuple(sorted({max(1, int(m * f)) for f in (0.01, 0.02, 0.05, 0.1, 0.2)}))
    per_k = 1.0 - (1.0 - confidence) / len(ks)
    order = np.argsort(-scores, kind="stable")
    best: Guesses | None = None
    for k in ks:
        k = min(k, m // 2)
        top, bottom = order[:k], order[m - k:]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        eps = epsilon_lower_bound(m=m, r=2 * k, v=correct, delta=delta, confidence=per_k)
        if best is None or eps > best.epsilon:
            best = Guesses(m=m, r=2 * k, correct=correct, epsilon=eps, k_plus=k, k_minus=k)
    assert best is not None
    return best
