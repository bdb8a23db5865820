"""metrics-log: the rows of rounds.jsonl and the summary medians reach TensorBoard and MLflow
through the strategy's own code path, value for value; a missing library is a clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Proxy
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

from fedpgen.server.metrics_log import (
    TENSORBOARD_DIR,
    metrics_logging,
    require_backend,
    scalars,
    summary_scalars,
)
from fedpgen.server.results import RunRecorder, read_jsonl
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.config import RunConfig
from fedpgen.shared.wire import keys_digest

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")
SHAPES = ((2, 3), (3,))


def fit_res(rng: np.random.Generator, n: int, client: int, *, shapes: tuple[tuple[int, ...], ...] = SHAPES) -> FitRes:
    arrays = [rng.normal(scale=0.1, size=s).astype(np.float32) for s in shapes]
    metrics = {"keys-digest": keys_digest(NAMES), "client-index": client, "train-loss": float(rng.uniform(1, 3)),
               "val-loss-before": float(rng.uniform(2, 3)), "val-loss-after": float(rng.uniform(1, 2)),
               "dp-epsilon": float(rng.uniform(0.5, 4))}
    return FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(arrays), num_examples=n,
                  metrics=metrics)


def eval_res(rng: np.random.Generator, client: int) -> EvaluateRes:
    metrics: dict[str, Any] = {"client-index": client, "num-heldout": 6}
    for variant in ("base", "shared", "personal", "local"):
        metrics[f"{variant}-ppl"] = float(rng.uniform(5, 9))
        metrics[f"{variant}-acc"] = float(rng.uniform(0.1, 0.5))
    return EvaluateRes(status=Status(Code.OK, ""), loss=0.0, num_examples=6, metrics=metrics)


def run_rounds(cfg: RunConfig) -> SharedDeltaStrategy:
    """Three rounds and the final evaluation through the strategy, as Flower's workflow calls it:
    a malformed update in round 2, a crashed device in round 3."""
    rng = np.random.default_rng(7)
    theta = [np.zeros(s, np.float32) for s in SHAPES]
    strategy = SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=theta, completed=0, opt_state={},
                                   recorder=RunRecorder(Path(cfg.run_dir), cfg))
    with metrics_logging(cfg, strategy):
        for r in (1, 2, 3):
            results = [(Proxy(i), fit_res(rng, 10 * (i + 1), i)) for i in range(3)]
            if r == 2:
                results.append((Proxy(9), fit_res(rng, 5, 9, shapes=((3, 2), (3,)))))
            failures: list[Any] = [RuntimeError("device crashed")] if r == 3 else []
            strategy.aggregate_fit(r, results, failures)
        strategy.aggregate_evaluate(3, [(Proxy(i), eval_res(rng, i)) for i in range(3)], [])
    return strategy


@pytest.fixture
def tracked_cfg(make_cfg: Any) -> Any:
    def make(backend: str) -> RunConfig:
        return make_cfg(metrics_log=backend, num_server_rounds=3, secure_aggregation=False, secagg_clip=10.0,
                        min_fit_clients=2)

    return make


def expected(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The rows of rounds.jsonl and the summary medians the run wrote."""
    from fedpgen.server.summary import summarize

    rows = read_jsonl(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["rejected"] for r in rows] == [0, 1, 0] and [r["failures"] for r in rows] == [0, 0, 1]
    medians = summary_scalars(summarize(run_dir))
    assert {"median-ppl/personal", "median-acc/shared", "median-personalization-gain"} <= medians.keys()
    return rows, medians


def test_tensorboard_event_files_hold_every_round_of_rounds_jsonl(tracked_cfg: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tracked_cfg("tensorboard")
    run_rounds(cfg)
    run_dir = Path(cfg.run_dir)
    rows, medians = expected(run_dir)
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    logged = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    want: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in scalars(row).items():
            want.setdefault(f"round/{key}", {})[row["round"]] = float(np.float32(value))  # event files hold float32
    for key, value in medians.items():
        want[f"summary/{key}"] = {3: float(np.float32(value))}
    assert {"round/train-loss", "round/val-loss-after", "round/delta-norm", "round/clients", "round/bytes-up-mean",
            "round/seconds", "round/rejected", "round/failures", "round/epsilon-max"} <= want.keys()
    assert logged == want


def test_mlflow_run_holds_every_round_of_rounds_jsonl(tracked_cfg: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = tracked_cfg("mlflow")
    run_rounds(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    rows, medians = expected(run_dir)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedpgen").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["metrics-log"] == "mlflow" and run.data.params["num-server-rounds"] == "3"
    for row in rows:
        for key, value in scalars(row).items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"round/{key}")}
            assert history[row["round"]] == pytest.approx(value, rel=1e-12)
    for key, value in medians.items():
        history = client.get_metric_history(run.info.run_id, f"summary/{key}")
        assert [(m.step, m.value) for m in history] == [(3, pytest.approx(value, rel=1e-12))]
    assert run.data.tags["fedpgen.run-dir"] == str(run_dir)


@pytest.mark.parametrize(("backend", "module"), [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_library_fails_at_run_start_naming_the_extra(tracked_cfg: Any, monkeypatch: pytest.MonkeyPatch,
                                                               backend: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"metrics-log.*pip install 'fedpgen\[tracking\]'"):
        require_backend(backend)
    cfg = tracked_cfg(backend)
    with pytest.raises(RuntimeError, match=r"fedpgen\[tracking\]"):
        run_rounds(cfg)
    assert not (Path(cfg.run_dir) / "rounds.jsonl").exists()  # nothing ran
    require_backend("none")


def test_metrics_log_is_validated(make_cfg: Any) -> None:
    with pytest.raises(ValueError, match=r"config 'metrics-log': 'wandb' is invalid: valid: none, tensorboard, mlflow"):
        make_cfg(metrics_log="wandb")
    assert make_cfg().metrics_log == "none"


def test_none_logs_nothing(tracked_cfg: Any) -> None:
    cfg = tracked_cfg("none")
    run_rounds(cfg)
    assert not (Path(cfg.run_dir) / TENSORBOARD_DIR).exists() and not (Path(cfg.run_dir) / "mlflow.db").exists()
    assert json.loads((Path(cfg.run_dir) / "config.json").read_text())["metrics-log"] == "none"
