"""Issue 12, findings 2 and 3: whatever one device sends, its influence on the shared base is
bounded and the ServerApp never crashes; a round whose aggregate is out of bounds is refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedpgen.server import checkpoint
from fedpgen.server.bounds import OutOfBoundsError, check_secure_aggregate, quantized_weight
from fedpgen.server.results import RunRecorder
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.wire import keys_digest

from conftest import Proxy, secagg_mean

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")
SHAPES = [(2, 3), (3,)]
C, Q, MAX_WEIGHT, MODULUS = 0.05, 2**22, 1000.0, 2**32


def reply(arrays: list[np.ndarray], n: object, **metrics: object) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,  # type: ignore[arg-type]
                  metrics={"keys-digest": keys_digest(NAMES), **metrics})


def honest(value: float = 0.01) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def make_strategy(make_cfg, tmp_path: Path, **overrides: object) -> SharedDeltaStrategy:
    cfg = make_cfg(min_fit_clients=2, secagg_clip=C, run_dir=str(tmp_path / "run"), **overrides)
    theta = [np.zeros(s, np.float32) for s in SHAPES]
    return SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=theta, completed=0, opt_state={},
                               recorder=RunRecorder(tmp_path / "run", cfg))


def test_finding2_one_device_cannot_take_over_the_base_without_secagg(make_cfg, tmp_path: Path) -> None:
    # Prepare: two honest devices; an attacker with a delta of norm ~1e12 and weight 10^12
    strategy = make_strategy(make_cfg, tmp_path, secure_aggregation=False)
    attack = [np.full(s, 1e12 / np.sqrt(9), np.float32) for s in SHAPES]
    results = [(Proxy(0), reply(honest(), 20)), (Proxy(1), reply(honest(), 20)), (Proxy(2), reply(attack, 10**12))]
    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    new = parameters_to_ndarrays(params)
    # Assert: clipped to ±C and weighed at most max-weight: (20·0.01 + 20·0.01 + 1000·C) / 1040
    expected = (20 * 0.01 + 20 * 0.01 + MAX_WEIGHT * C) / (40 + MAX_WEIGHT)
    for a in new:
        np.testing.assert_allclose(a, expected, rtol=1e-5)
        assert float(np.abs(a).max()) <= C


@pytest.mark.parametrize("dtype", [np.int64, np.complex64, np.float16, np.float64])
def test_finding2_deltas_of_another_dtype_are_rejected(make_cfg, tmp_path: Path, dtype: type) -> None:
    strategy = make_strategy(make_cfg, tmp_path, secure_aggregation=False)
    bad = [np.full(s, 1e300 if dtype is np.float64 else 3, dtype) for s in SHAPES]
    results = [(Proxy(0), reply(honest(0.02), 5)), (Proxy(1), reply(honest(0.02), 5)), (Proxy(2), reply(bad, 5))]
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    for a in parameters_to_ndarrays(params):
        np.testing.assert_allclose(a, 0.02, rtol=1e-6)  # only the two honest updates
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rows[-1]["rejected"] == 1


def test_finding2_a_non_finite_checkpoint_is_never_written_nor_resumed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not finite"):
        checkpoint.save(tmp_path, server_round=1, config_hash="h", names=NAMES,
                        theta=[np.full((2, 3), np.inf, np.float32), np.zeros(3, np.float32)], opt_state={})
    assert not list(tmp_path.glob("*.safetensors"))
    # An older, poisoned checkpoint on disk is refused at resume rather than reloaded
    from safetensors.numpy import save as st_save
    poisoned = {f"theta/{NAMES[0]}": np.full((2, 3), np.inf, np.float32), f"theta/{NAMES[1]}": np.zeros(3, np.float32)}
    (tmp_path / "round_0001.safetensors").write_bytes(
        st_save(poisoned, metadata={"round": "1", "config-hash": "h", "names": json.dumps(list(NAMES))}))
    with pytest.raises(ValueError, match="not finite"):
        checkpoint.latest(tmp_path, config_hash="h", names=NAMES)


@pytest.mark.parametrize("metrics", [
    {"dp-epsilon": "8.0"},                      # a string where a number belongs
    {"train-loss": "low"},
    {"client-index": b"\x00\x01"},              # bytes
    {"dp-accountant": "x" * 10_000_000},        # 10 MB string
    {"dp-epsilon": -1.0},                       # out of range
    {"skipped-unreadable-file": True},          # a bool is not a count
    {"dp-steps": 2.5},
])
def test_finding3_hostile_metrics_are_a_rejected_reply_never_a_crash(make_cfg, tmp_path: Path,
                                                                    metrics: dict) -> None:
    strategy = make_strategy(make_cfg, tmp_path, secure_aggregation=False)
    results = [(Proxy(0), reply(honest(), 5)), (Proxy(1), reply(honest(), 5)), (Proxy(2), reply(honest(), 5, **metrics))]
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert params is not None
    written = (tmp_path / "run" / "client_rounds.jsonl").read_text()
    assert written.count('"node-id"') == 2 and len(written) < 10_000  # the hostile reply wrote nothing
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rows[-1]["rejected"] == 1


# SecAgg+'s unmasked aggregate of (deltas, weights[, tamper]) at this file's bounds
secagg_round = functools.partial(secagg_mean, clipping_range=C, quantization_range=Q, max_weight=MAX_WEIGHT,
                                 modulus=MODULUS)


def test_finding2_secagg_bounds_accept_honest_and_refuse_a_weight_and_element_attack() -> None:
    rng = np.random.default_rng(0)
    weights = [30, 55, 12, 80]
    deltas = [[rng.uniform(-C / 2, C / 2, s) for s in SHAPES] for _ in weights]
    bounds = dict(clipping_range=C, quantization_range=Q, max_weight=MAX_WEIGHT)
    check_secure_aggregate(secagg_round(deltas, weights), weights=weights, **bounds)  # honest: accepted
    honest_levels = sum(quantized_weight(w, max_weight=MAX_WEIGHT, quantization_range=Q) for w in weights[:3])
    # The reviewed attack: the weight level brings the total to 1, the elements at the maximum
    take_over = (3, [np.array([(1 - honest_levels) % MODULUS - quantized_weight(80, max_weight=MAX_WEIGHT,
                                                                                  quantization_range=Q)])]
                 + [np.full(s, Q) for s in SHAPES])
    with pytest.raises(OutOfBoundsError, match="bound"):
        mean = secagg_round(deltas, weights, tamper=take_over)
        assert max(float(np.abs(a).max()) for a in mean) > 1e5  # what it would have written
        check_secure_aggregate(mean, weights=weights, **bounds)
    # Subtler: a weight 50x larger than declared, so its zero delta drowns the honest ones
    drown = (3, [np.array([49 * Q])] + [np.zeros(s, np.int64) for s in SHAPES])
    with pytest.raises(OutOfBoundsError, match="inconsistent with the declared weights"):
        check_secure_aggregate(secagg_round(deltas, weights, tamper=drown), weights=weights, **bounds)


def test_finding2_an_out_of_bounds_secagg_round_is_refused_without_a_checkpoint(make_cfg, tmp_path: Path) -> None:
    # Prepare: the SecAgg+ path, every reply carrying the same (poisoned) unmasked aggregate
    strategy = make_strategy(make_cfg, tmp_path, secure_aggregation=True, secagg_max_weight=MAX_WEIGHT,
                             secagg_quantization=Q)
    rng = np.random.default_rng(1)
    weights = [30, 55, 12]
    deltas = [[rng.uniform(-C / 2, C / 2, s) for s in SHAPES] for _ in weights]
    level = quantized_weight(12, max_weight=MAX_WEIGHT, quantization_range=Q)
    poisoned = secagg_round(deltas, weights, tamper=(2, [np.array([-level + 1])] + [np.full(s, Q) for s in SHAPES]))
    results = [(Proxy(i), reply(poisoned, w)) for i, w in enumerate(weights)]
    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    # Assert: base unchanged, no checkpoint, the round named as refused; the next round proceeds
    for a in parameters_to_ndarrays(params):
        assert not a.any()
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and "out of bounds" in rows[-1]["out-of-bounds"]
    assert strategy.refused_rounds == [1]
    clean = secagg_round(deltas, weights)
    params, _ = strategy.aggregate_fit(2, [(Proxy(i), reply(clean, w)) for i, w in enumerate(weights)], [])
    assert (tmp_path / "run" / "checkpoints" / "round_0002.safetensors").is_file()
