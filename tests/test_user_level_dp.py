"""User-level DP (DP-FedAvg): clipping to S, noise on the sum, fixed denominator, its own ε."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from server.results import RunRecorder
from server.strategy import SharedDeltaStrategy
from shared.privacy.accounting import epsilon
from shared.privacy.user_level import add_noise_share, clip_delta, user_epsilon, user_level_mean
from shared.wire import keys_digest


def test_clip_delta_bounds_the_global_norm_and_keeps_small_ones() -> None:
    big = [np.full((3, 4), 2.0, np.float32), np.full(5, -1.0, np.float32)]
    clipped = clip_delta(big, 0.5)
    assert np.sqrt(sum(float((c**2).sum()) for c in clipped)) == pytest.approx(0.5, rel=1e-5)
    scale = float(clipped[0].flat[0] / big[0].flat[0])  # one scale for all arrays: the direction is kept
    for c, b in zip(clipped, big):
        np.testing.assert_allclose(c, b * scale, rtol=1e-6)
    small = [np.full(4, 0.01, np.float32)]
    np.testing.assert_array_equal(clip_delta(small, 0.5)[0], small[0])


def test_distributed_noise_shares_sum_to_the_central_noise() -> None:
    rng = np.random.default_rng(0)
    n, std = 16, 0.3
    total = sum(add_noise_share([np.zeros(20_000)], std=std, num_clients=n, rng=rng)[0] for _ in range(n))
    assert float(np.std(total)) == pytest.approx(std, rel=0.03)


def test_user_level_mean_uses_the_fixed_denominator() -> None:
    deltas = [[np.array([1.0, 2.0])], [np.array([3.0, 0.0])]]
    got = user_level_mean(deltas, num_sampled=4, central_std=0.0, rng=np.random.default_rng())
    np.testing.assert_allclose(got[0], [1.0, 0.5])


def test_user_epsilon_is_the_subsampled_gaussian_over_rounds() -> None:
    assert user_epsilon(noise_multiplier=1.0, sample_rate=0.1, rounds=0, delta=1e-5, accountant="rdp") == 0.0
    assert user_epsilon(noise_multiplier=1.0, sample_rate=0.1, rounds=50, delta=1e-5, accountant="rdp") == \
        epsilon([(1.0, 0.1, 50)], delta=1e-5, accountant="rdp")


def test_central_user_level_dp_in_the_strategy(make_cfg, tmp_path: Path) -> None:
    names = ("a.lora_A.shared.weight",)
    cfg = make_cfg(user_dp="central", user_noise_multiplier=0.0, user_clip=1.0, secure_aggregation=False,
                   min_fit_clients=2, num_server_rounds=5)
    strategy = SharedDeltaStrategy(cfg=cfg, names=names, theta=[np.zeros(2, np.float32)], completed=0,
                                   opt_state={}, recorder=RunRecorder(tmp_path / "run", cfg))

    class Proxy:
        def __init__(self, node_id: int) -> None:
            self.node_id = node_id

    strategy._sampled, strategy._population = 2, 10  # as configure_fit would set: 2 of 10 devices sampled
    results = [(Proxy(i), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([d]), 1,
                                 {"keys-digest": keys_digest(names)}))
               for i, d in enumerate([np.array([0.6, 0.0], np.float32), np.array([0.0, 0.8], np.float32)])]
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.3, 0.4], rtol=1e-6)
    row = [line for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()][-1]
    assert '"user-epsilon": Infinity' in row  # z = 0: no noise, no user-level guarantee, said as ε = ∞
