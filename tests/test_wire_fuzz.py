"""Fuzz the server's wire validation (issue 12): whatever a device sends, the server rejects it
with a ``ValueError`` or accepts it within bounds — never a crash, never a non-finite base.

Examples per test (Hypothesis ``max_examples``): metrics 300, arrays 200, whole replies
through the strategy 150, SecAgg+ masked replies 150; about 10 s in all on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from flwr.common import (Code, ConfigRecord, FitRes, Parameters, Status,
                         ndarray_to_bytes, parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpgen.server.results import RunRecorder
from fedpgen.server.secure_aggregation import check_masked_reply
from fedpgen.server.strategy import RoundFailedError, SharedDeltaStrategy
from fedpgen.shared.config import RunConfig
from fedpgen.shared.wire import FIT_SCHEMA, check_metrics, check_update, keys_digest

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")
SHAPES = [(2, 3), (3,)]
def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=40))
keys = st.one_of(st.sampled_from(sorted(FIT_SCHEMA)), st.text(max_size=20))
metric_dicts = st.dictionaries(keys, scalars, max_size=6)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.complex64, np.uint8, np.bool_])


@st.composite
def arrays(draw: st.DrawFn) -> list[np.ndarray]:
    shapes = draw(st.one_of(st.just(SHAPES), st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple),
                                                         max_size=3)))
    out = []
    for shape in shapes:
        dtype = draw(dtypes)
        fill = draw(st.floats(allow_nan=True, allow_infinity=True, width=32)) if np.issubdtype(dtype, np.floating) \
            else draw(st.integers(0, 100))
        with np.errstate(over="ignore", invalid="ignore"):  # inf or nan cast to an int dtype: any value will do
            out.append(np.full(shape, fill).astype(dtype))
    return out


@fuzz(300)
@given(metric_dicts)
def test_metric_validation_accepts_only_typed_in_range_values(metrics: dict) -> None:
    try:
        check_metrics(metrics, FIT_SCHEMA)
    except ValueError:
        return
    for key, value in metrics.items():  # accepted: every value has its declared type and range
        field = FIT_SCHEMA[key]
        assert not isinstance(value, bool) and isinstance(value, field.kind if field.kind is not float else (int, float))
        if isinstance(value, float) and math.isnan(value):
            assert field.nan
        elif field.kind is not str:
            assert field.lo <= value <= field.hi


@fuzz(200)
@given(arrays())
def test_update_validation_accepts_only_the_schema_arrays(arrs: list[np.ndarray]) -> None:
    try:
        check_update(arrs, SHAPES, {}, schema=FIT_SCHEMA, dtypes=[np.dtype(np.float32)] * 2)
    except ValueError:
        return
    assert [a.shape for a in arrs] == SHAPES and all(a.dtype == np.float32 and np.isfinite(a).all() for a in arrs)


@fuzz(150)
@given(st.lists(st.tuples(arrays(), st.one_of(st.integers(-5, 10**13), st.floats(), st.text(max_size=3)),
                          metric_dicts), min_size=1, max_size=4))
def test_the_strategy_never_crashes_and_never_leaves_the_bounds(tmp_path_factory, replies: list) -> None:
    run = tmp_path_factory.mktemp("run")
    cfg = RunConfig.from_mapping({"secure-aggregation": False, "min-fit-clients": 1, "run-dir": str(run),
                                  "secagg-clip": 0.05})
    theta = [np.zeros(s, np.float32) for s in SHAPES]
    strategy = SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=theta, completed=0, opt_state={},
                                   recorder=RunRecorder(Path(run), cfg))
    results = []
    for i, (arrs, n, metrics) in enumerate(replies):
        params = Parameters([ndarray_to_bytes(a) for a in arrs], "numpy.ndarray")
        results.append((_Proxy(i), FitRes(Status(Code.OK, ""), params, n,  # type: ignore[arg-type]
                                          {"keys-digest": keys_digest(NAMES), **metrics})))
    try:
        params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    except RoundFailedError:
        return  # no valid update at all: the round fails loudly, nothing written
    for a in parameters_to_ndarrays(params):
        assert a.dtype == np.float32 and np.isfinite(a).all() and float(np.abs(a).max(initial=0)) <= 0.05 + 1e-7


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


@fuzz(150)
@given(st.lists(st.one_of(st.binary(max_size=64), arrays().map(lambda a: [ndarray_to_bytes(x) for x in a])
                          .map(lambda b: b[0] if b else b"")), max_size=4),
       st.one_of(st.integers(-3, 5000), st.just(10)), metric_dicts)
def test_masked_replies_are_rejected_with_a_value_error_or_fit_the_schema(blobs: list, n: int, metrics: dict) -> None:
    content = compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), Parameters([], ""), n,
                                                 {"keys-digest": keys_digest(NAMES), **{
                                                     k: v for k, v in metrics.items()
                                                     if isinstance(v, (int, float, str, bytes, bool))}}),
                                          keep_input=False)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: blobs})
    try:
        check_masked_reply(content, shapes=SHAPES, modulus=2**32, max_weight=1000.0, digest=keys_digest(NAMES))
    except (ValueError, TypeError, KeyError):
        return
    assert len(blobs) == 3


def test_a_well_formed_masked_reply_is_accepted() -> None:
    blobs = [ndarray_to_bytes(np.array([7])), *(ndarray_to_bytes(np.full(s, 5, np.int64)) for s in SHAPES)]
    content = compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), Parameters([], ""), 10,
                                                 {"keys-digest": keys_digest(NAMES), "dp-steps": 3}), keep_input=False)
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: blobs})
    check_masked_reply(content, shapes=SHAPES,
                       modulus=2**32, max_weight=1000.0, digest=keys_digest(NAMES))
