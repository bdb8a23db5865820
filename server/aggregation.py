"""Aggregation of shared deltas, in one place: the round's mean delta, then a server optimizer step.

The server only ever needs the weighted *sum* of deltas (what secure aggregation yields);
nothing here keeps an individual delta. Four ways to the mean (:func:`aggregate`): the plain
weighted mean; SecAgg+'s unmasked aggregate (bounds checked: ``server/bounds.py``); and
DP-FedAvg at user level, the noise added by the server (central) or by the devices'
shares (distributed), each with or without SecAgg+.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpgen.server.bounds import check_secure_aggregate
from fedpgen.shared.privacy.user_level import check_noise_survivors, user_level_mean


class RoundFailedError(RuntimeError):
    """A round produced no valid aggregate: the run stops instead of keeping the old base."""


def aggregate(deltas: list[list[np.ndarray]], weights: list[float], *, declared: list[int], cfg: Any,
              sampled: int, denominator: float, rng: np.random.Generator) -> tuple[list[np.ndarray], bool]:
    """``(the round's mean delta, whether it was a user-level DP round)`` of accepted updates.

    Under SecAgg+ every delta is the same unmasked aggregate (``declared``: the weights the
    devices declared, for its bounds check; ``OutOfBoundsError`` if it fails). Under
    user-level DP the devices sent weight 1 and the mean has the fixed ``denominator`` (the
    expected cohort q·N, not the ``sampled`` count a Poisson draw gave); the server adds
    N(0, (z·S)²) when central; when distributed, fewer contributors than the ``sampled``
    devices sized their shares for raise ``TooFewNoiseShares``.
    """
    central = cfg.user_noise_multiplier * cfg.user_clip if cfg.user_dp == "central" else 0.0
    if cfg.user_dp == "distributed":  # the devices' shares carry the noise: enough of them must be in the sum
        check_noise_survivors(len(deltas), num_sampled=sampled, dropouts=cfg.user_noise_dropouts)
    if cfg.secure_aggregation:
        check_secure_aggregate(deltas[0], weights=declared, clipping_range=cfg.secagg_clipping_range,
                               quantization_range=cfg.secagg_quantization, max_weight=cfg.secagg_max_weight)
        if any(not all(np.array_equal(a, b) for a, b in zip(d, deltas[0], strict=True)) for d in deltas[1:]):
            raise RoundFailedError("secure aggregation returned differing aggregates")
        mean = [d.astype(np.float64) for d in deltas[0]]
        if cfg.user_dp == "off":
            return mean, False
        return user_level_mean([[d * len(deltas) for d in mean]], num_sampled=denominator, central_std=central,
                               rng=rng), True
    if cfg.user_dp == "off":
        return weighted_mean(deltas, weights), False
    return user_level_mean(deltas, num_sampled=denominator, central_std=central, rng=rng), True


def weighted_mean(deltas: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """Σ w_i Δ_i / Σ w_i, per array."""
    if not deltas:
        raise ValueError("weighted_mean of no deltas")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {total}")
    return [sum(w * d[i].astype(np.float64) for d, w in zip(deltas, weights, strict=True)) / total
            for i in range(len(deltas[0]))]


class FedAvg:
    """θ ← θ + η·mean Δ (η = 1: plain FedAvg of the clients' new weights)."""

    def __init__(self, *, lr: float) -> None:
        self.lr = lr

    def step(self, theta: list[np.ndarray], mean_delta: list[np.ndarray]) -> list[np.ndarray]:
        return [(t + self.lr * d).astype(t.dtype) for t, d in zip(theta, mean_delta, strict=True)]

    def state(self) -> dict[str, list[np.ndarray]]:
        return {}

    def load_state(self, state: dict[str, list[np.ndarray]]) -> None:
        del state


class FedAdam:
    """FedAdam (Reddi et al., 2021): Adam on the pseudo-gradient −mean Δ."""

    def __init__(self, *, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def step(self, theta: list[np.ndarray], mean_delta: list[np.ndarray]) -> list[np.ndarray]:
        if not self.m:
            self.m = [np.zeros_like(d) for d in mean_delta]
            self.v = [np.zeros_like(d) for d in mean_delta]
        self.m = [self.beta1 * m + (1 - self.beta1) * d for m, d in zip(self.m, mean_delta, strict=True)]
        self.v = [self.beta2 * v + (1 - self.beta2) * d * d for v, d in zip(self.v, mean_delta, strict=True)]
        return [(t + self.lr * m / (np.sqrt(v) + self.tau)).astype(t.dtype)
                for t, m, v in zip(theta, self.m, self.v, strict=True)]

    def state(self) -> dict[str, list[np.ndarray]]:
        return {"m": self.m, "v": self.v} if self.m else {}

    def load_state(self, state: dict[str, list[np.ndarray]]) -> None:
        self.m, self.v = list(state.get("m", [])), list(state.get("v", []))


SERVER_OPTIMIZERS = {"fedavg": FedAvg, "fedadam": FedAdam}


def make_server_optimizer(name: str, *, lr: float) -> FedAvg | FedAdam:
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {name!r}; valid: {', '.join(sorted(SERVER_OPTIMIZERS))}")
    return SERVER_OPTIMIZERS[name](lr=lr)
