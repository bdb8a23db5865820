"""Aggregation is right: the new shared base is the hand-computed weighted mean; bad updates are rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedpgen.server.aggregation import FedAdam, weighted_mean
from fedpgen.server.results import RunRecorder
from fedpgen.server.strategy import RoundFailedError, SharedDeltaStrategy
from fedpgen.shared.wire import keys_digest

from conftest import Proxy

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")


def fit_res(arrays: list[np.ndarray], n: int, **metrics: object) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,
                  metrics={"keys-digest": keys_digest(NAMES), **metrics})


@pytest.fixture
def strategy(make_cfg, tmp_path: Path) -> SharedDeltaStrategy:
    # the plain path (individual deltas), with a clipping range wide enough for these hand-made deltas
    cfg = make_cfg(min_fit_clients=2, secure_aggregation=False, secagg_clip=10.0)
    theta = [np.ones((2, 3), np.float32), np.zeros((3,), np.float32)]
    return SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=theta, completed=0, opt_state={},
                               recorder=RunRecorder(tmp_path / "run", cfg))


def test_weighted_mean_matches_hand_computation() -> None:
    d1, d2, d3 = [np.array([1.0, 2.0])], [np.array([3.0, -2.0])], [np.array([0.0, 8.0])]
    got = weighted_mean([d1, d2, d3], [1.0, 3.0, 4.0])
    np.testing.assert_allclose(got[0], [(1 + 9 + 0) / 8, (2 - 6 + 32) / 8])


def test_new_shared_base_is_theta_plus_weighted_mean_delta(strategy: SharedDeltaStrategy) -> None:
    rng = np.random.default_rng(0)
    deltas = [[rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
              for _ in range(3)]
    weights = [10, 30, 60]
    results = [(Proxy(i), fit_res(d, w)) for i, (d, w) in enumerate(zip(deltas, weights))]
    params, _ = strategy.aggregate_fit(1, results, [])
    new = parameters_to_ndarrays(params)
    for i in range(2):
        expected = [np.ones((2, 3)), np.zeros(3)][i] + (0.1 * deltas[0][i] + 0.3 * deltas[1][i] + 0.6 * deltas[2][i])
        np.testing.assert_allclose(new[i], expected, rtol=1e-6, atol=1e-6)
    assert (Path(strategy.cfg.run_dir) / "checkpoints" / "round_0001.safetensors").is_file()


@pytest.mark.parametrize(
    "bad",
    [
        fit_res([np.zeros((2, 3), np.float32)], 5),  # missing array
        fit_res([np.zeros((3, 2), np.float32), np.zeros(3, np.float32)], 5),  # wrong shape
        fit_res([np.full((2, 3), np.nan, np.float32), np.zeros(3, np.float32)], 5),  # non-finite
        fit_res([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)], 5, text="hello"),  # off-schema metric
        fit_res([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)], 0),  # no examples
    ],
)
def test_malformed_updates_are_rejected(strategy: SharedDeltaStrategy, bad: FitRes) -> None:
    good = [(Proxy(i), fit_res([np.full((2, 3), 2.0, np.float32), np.ones(3, np.float32)], 1)) for i in range(2)]
    params, _ = strategy.aggregate_fit(1, [*good, (Proxy(9), bad)], [])
    new = parameters_to_ndarrays(params)
    np.testing.assert_allclose(new[0], np.full((2, 3), 3.0))  # only the two good updates count


def test_a_round_without_enough_valid_updates_fails_loudly(strategy: SharedDeltaStrategy) -> None:
    one = [(Proxy(0), fit_res([np.ones((2, 3), np.float32), np.ones(3, np.float32)], 1))]
    with pytest.raises(RoundFailedError, match="1 valid updates"):
        strategy.aggregate_fit(1, one, [RuntimeError("client crashed")])
    with pytest.raises(RoundFailedError):
        strategy.aggregate_fit(1, [], [])


def test_fedadam_step_matches_hand_computation() -> None:
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    theta = [np.array([1.0])]
    out = opt.step(theta, [np.array([0.5])])
    m, v = 0.1 * 0.5, 0.01 * 0.25
    np.testing.assert_allclose(out[0], 1.0 + 0.1 * m / (np.sqrt(v) + 1e-3))
    restored = FedAdam(lr=0.1)
    restored.load_state(opt.state())
    np.testing.assert_allclose(restored.step(out, [np.array([0.2])]), opt.step(out, [np.array([0.2])]))
