"""User-level DP (DP-FedAvg, McMahan et al. 2018): the unit is a user's whole context.

Each device clips its delta to norm S. Gaussian noise of std z·S on the *sum* is added
either by the server after aggregation (central: trusts the server with the noise) or as
shares N(0, z²S²/t) by the k devices the round drew (distributed), t of which must reach the
sum (t = k unless ``user-noise-dropouts`` tolerates dropouts: :func:`noise_survivors`). The
cohort is a Poisson draw, each device with probability q = n / N (``server/strategy.py``,
``poisson_cohort``), and the mean uses the fixed denominator n, its expected size, so one user
changes it by at most S/n. Accounted over rounds at q, separately from record-level ε.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedpgen.shared.privacy.accounting import History, calibrate_sigma, compose, epsilon


def clip_delta(delta: list[np.ndarray], bound: float) -> list[np.ndarray]:
    """Scale ``delta`` to global L2 norm ≤ ``bound``."""
    norm = math.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in delta))
    scale = min(1.0, bound / (norm + 1e-12))
    return [(d * scale).astype(d.dtype) for d in delta]


def add_noise_share(delta: list[np.ndarray], *, std: float, num_clients: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Add this device's share N(0, std²/n) of the noise on the sum (distributed DP)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    share = std / math.sqrt(num_clients)
    return [(d + rng.normal(0.0, share, size=d.shape)).astype(d.dtype) for d in delta]


def noise_survivors(num_sampled: int, dropouts: float) -> int:
    """t = n − ⌊dropouts·n⌋ (at least 1): how many of the n sampled devices' noise shares must
    reach the sum. Each share is N(0, z²S²/t), so k ≥ t shares sum to noise of std z·S·√(k/t) ≥ z·S;
    a round with k < t would carry less than the accounted noise and is refused, never applied
    (``server/aggregation.py``, and before unmasking under SecAgg+: ``server/secure_aggregation.py``)."""
    if num_sampled < 1:
        raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
    return max(1, num_sampled - math.floor(dropouts * num_sampled + 1e-9))


class TooFewNoiseShares(ValueError):
    """A distributed user-level round in which fewer devices contributed than their noise needs."""


def check_noise_survivors(contributed: int, *, num_sampled: int, dropouts: float) -> None:
    """Raise :class:`TooFewNoiseShares` unless ``contributed`` devices carry the calibrated noise."""
    need = noise_survivors(num_sampled, dropouts)
    if contributed < need:
        raise TooFewNoiseShares(
            f"{contributed} of {num_sampled} sampled devices contributed; their noise shares were sized for at "
            f"least {need} (user-noise-dropouts = {dropouts:g}), so the sum carries noise of std "
            f"{math.sqrt(contributed / need):.2f}·z·S, below the accounted z·S. Raise user-noise-dropouts to "
            "tolerate more dropouts (each share grows as 1/√t)")


def user_level_mean(deltas: list[list[np.ndarray]], *, num_sampled: float, central_std: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """(Σ clipped Δ_i + N(0, central_std²)) / n, with n the expected cohort (not the drawn one)."""
    total = [sum(d[i].astype(np.float64) for d in deltas) for i in range(len(deltas[0]))]
    if central_std > 0:
        total = [t + rng.normal(0.0, central_std, size=t.shape) for t in total]
    return [t / num_sampled for t in total]


def user_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float, accountant: str) -> float:
    """ε of ``rounds`` DP-FedAvg rounds with client sampling ``sample_rate``."""
    return user_epsilon_of_rounds(noise_multiplier=noise_multiplier, sample_rates=[sample_rate] * rounds, delta=delta,
                                  accountant=accountant)


def user_epsilon_of_rounds(*, noise_multiplier: float, sample_rates: list[float], delta: float,
                           accountant: str) -> float:
    """ε of DP-FedAvg rounds at multiplier z, each at its own client sampling rate: q moves
    when devices refuse or reach their cap (q = n / the devices that can be sampled)."""
    history: History = []
    for q in sample_rates:
        history = compose(history, sigma=noise_multiplier, sample_rate=q, steps=1)
    return epsilon(history, delta=delta, accountant=accountant)


def expected_cohort(*, population: int, fraction: float, min_clients: int) -> float:
    """n, the expected size of the Poisson cohort the server draws under user-level DP:
    ``fraction-fit · N`` of the N devices it can sample (registered, less those that refused or
    reached their participation cap), at least ``min-fit-clients``. Not rounded up: q = n / N
    stays at ``fraction-fit`` as devices leave, the rate the noise was calibrated for (⌈f·N⌉/N
    drifted above it, and the ε a run spent with it; docs/privacy.md). The mean divides by n."""
    return max(float(min_clients), fraction * population)


def cohort_sample_rate(*, population: int, fraction: float, min_clients: int) -> float:
    """q = n / N for the cohort the server samples each round (:func:`expected_cohort`):
    ``fraction-fit``, or ``min-fit-clients / N`` where that is larger (``server/strategy.py``,
    ``configure_fit``)."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    n = expected_cohort(population=population, fraction=fraction, min_clients=min_clients)
    if n > population:
        raise ValueError(f"a cohort of {n:g} devices cannot be sampled from {population}")
    return n / population


def calibrate_user_noise(*, target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                         accountant: str) -> float:
    """Smallest noise multiplier z whose ``rounds`` rounds at client sampling ``sample_rate``
    spend at most ``target_epsilon`` per user (the accountant of :func:`user_epsilon`).
    What to set as ``user-noise-multiplier`` for a user-level budget; the server still
    accounts and reports the ε of the rounds it actually ran."""
    return calibrate_sigma(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=rounds,
                           accountant=accountant)


def server_view_multiplier(*, mode: str, secure_aggregation: bool, noise_multiplier: float, survivors: int) -> float:
    """The noise multiplier of one participation as the server sees it. The server draws the
    cohorts, so it knows who took part: no amplification by sampling holds against it, and each
    participation is a Gaussian mechanism of its own. Central: it sees the clipped deltas (or,
    under SecAgg+, their sum) before it adds the noise (0: no protection). Distributed under
    SecAgg+: the sum with at least the calibrated noise (z). Distributed without SecAgg+: each
    delta with its own share, std z·S/√t (z/√t)."""
    if mode == "central":
        return 0.0
    if secure_aggregation:
        return noise_multiplier
    return noise_multiplier / math.sqrt(max(1, survivors))


def epsilon_vs_server_bound(*, mode: str, secure_aggregation: bool, noise_multiplier: float, participations: int,
                            delta: float, accountant: str) -> float:
    """ε against the server of any user who takes part in at most ``participations`` rounds
    (``dp-max-participations``, enforced by each device): that many Gaussian mechanisms at the
    multiplier the server sees (:func:`server_view_multiplier`), which compose exactly into one
    at z/√participations. ∞ where no bound holds before the cohorts are drawn: central noise (the
    server sees the deltas), or distributed noise without SecAgg+ (z/√t, t the cohort's survivors)."""
    if mode == "central" or not secure_aggregation:
        return math.inf
    return gaussians_epsilon([noise_multiplier] * participations, delta=delta, accountant=accountant)


def gaussians_epsilon(multipliers: list[float], *, delta: float, accountant: str) -> float:
    """ε of Gaussian mechanisms without sampling (what the server saw of one user), which
    compose exactly into one of multiplier (Σ 1/z_i²)^(-1/2); ∞ if one carried no noise."""
    if not multipliers:
        return 0.0
    if min(multipliers) <= 0:
        return math.inf
    return epsilon([(sum(z**-2 for z in multipliers) ** -0.5, 1.0, 1)], delta=delta, accountant=accountant)


def server_view_by_node(replies: list[dict[str, Any]], rounds: list[dict[str, Any]], *, mode: str,
                        secure_aggregation: bool, noise_multiplier: float, dropouts: float) -> dict[Any, list[float]]:
    """Per node, the multiplier (:func:`server_view_multiplier`) of each training reply the server
    received (rows of ``client_rounds.jsonl``), the share size from each round's ``sampled``
    (``rounds.jsonl``). A round written before that field leaves a no-SecAgg+ share size unknown:
    no noise is credited for it (0). Read by the summary and, with another accountant, the audit."""
    sampled = {int(r["round"]): int(r["sampled"]) for r in rounds if "sampled" in r}
    seen: dict[Any, list[float]] = {}
    for row in replies:
        n = sampled.get(int(row["round"]), 0)
        z = server_view_multiplier(mode=mode, secure_aggregation=secure_aggregation, noise_multiplier=noise_multiplier,
                                   survivors=noise_survivors(n, dropouts) if n else 1)
        seen.setdefault(row.get("node-id"), []).append(z if n or secure_aggregation or mode == "central" else 0.0)
    return seen

