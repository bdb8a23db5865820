"""Pure privacy math: ε of a composition history, σ for a target ε. No state here.

A history is Opacus' accountant state: a list of ``(noise_multiplier, sample_rate, steps)``
for Poisson-subsampled Gaussian steps. Accounting is valid only with Poisson sampling.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("prv", "rdp")
History = list[tuple[float, float, int]]


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; valid: {', '.join(ACCOUNTANTS)}")
    return name


def epsilon(history: History, *, delta: float, accountant: str) -> float:
    """ε(δ) of the whole history; 0 for an empty one, ∞ if any step had no noise."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), delta, check_accountant(accountant))


# PRV costs about half a second per call; these are pure functions of their arguments, and
# devices with as many records share (σ, q, steps): a simulation worker computes each once.
@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)  # a copy: never alias the caller's list
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q) = log(0) at q = 1 (no sampling), harmlessly
        return float(acc.get_epsilon(delta=delta))


def compose(history: History, *, sigma: float, sample_rate: float, steps: int) -> History:
    """A new history with ``steps`` more steps appended (the input is not modified)."""
    out = [tuple(h) for h in history]
    if steps > 0:
        if out and out[-1][0] == sigma and out[-1][1] == sample_rate:
            out[-1] = (sigma, sample_rate, out[-1][2] + steps)
        else:
            out.append((sigma, sample_rate, steps))
    return [(float(s), float(q), int(n)) for s, q, n in out]


@functools.lru_cache(maxsize=256)
def calibrate_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Smallest σ (to Opacus' tolerance) whose ``steps`` steps at ``sample_rate`` spend ≤ ``target_epsilon``.

    Costs seconds with PRV: a device computes it once for the whole run and stores it.
    """
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV's log(0) at q = 1: as in _epsilon
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant=check_accountant(accountant),
                                          epsilon_tolerance=0.01))


def poisson_sample_rate(num_records: int, batch_size: int) -> float:
    """Opacus' sample rate for a loader of ``batch_size`` over ``num_records``: 1 / number of batches."""
    return 1.0 / math.ceil(num_records / batch_size)
