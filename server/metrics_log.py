"""Log a run's per-round aggregates to TensorBoard or MLflow (run-config key ``metrics-log``).

What is logged is what the server already records, nothing more: each row of
``rounds.jsonl`` (aggregates: losses weighted over devices, the delta norm, counts, bytes,
seconds, ε) at the step of its round, and at the end the medians of ``summary.json``
(over the devices' final evaluations). Nothing of a single device is logged.

- ``tensorboard``: event files in ``<run-dir>/tensorboard/`` (``torch.utils.tensorboard``);
- ``mlflow``: one MLflow run per invocation, in ``MLFLOW_TRACKING_URI`` when it is set,
  else a SQLite store ``<run-dir>/mlflow.db`` with artifacts in ``<run-dir>/mlruns/``.

Both need the optional extra ``fedpgen[tracking]``; without it a run that asks for them
fails at its start (:func:`require_backend`), never silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedpgen.shared.config import METRICS_LOGS, RunConfig

if TYPE_CHECKING:
    from fedpgen.server.strategy import SharedDeltaStrategy

log = logging.getLogger(__name__)

EXTRA = "fedpgen[tracking]"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"
MLFLOW_EXPERIMENT = "fedpgen"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny (or mlflow)"}


def require_backend(backend: str) -> None:
    """Raise ``RuntimeError`` naming the extra when ``backend``'s library is not installed.

    Parameters
    ----------
    backend
        The ``metrics-log`` value: ``none``, ``tensorboard`` or ``mlflow``.
    """
    if backend not in METRICS_LOGS:
        raise ValueError(f"config 'metrics-log': {backend!r} is invalid: valid: {', '.join(METRICS_LOGS)}")
    try:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
        elif backend == "mlflow":
            import mlflow  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"config 'metrics-log': {backend!r} needs {_PACKAGES[backend]}, which is not "
                           f"installed ({exc}): pip install '{EXTRA}'") from None


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``rounds.jsonl`` row, the round itself and flags left out."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def texts(row: Mapping[str, Any]) -> dict[str, str]:
    """The sentences of a ``rounds.jsonl`` row (why training stopped, why a round was refused)."""
    return {k: v for k, v in row.items() if isinstance(v, str) and v}


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The medians of ``summary.json``: ``median-perplexity/personal``, ``median-personalization-gain``."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if not key.startswith("median-"):
            continue
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        for variant, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[f"{key}/{variant}" if variant else key] = float(v)
    return out


class MetricsLog(Protocol):
    """Where the run's aggregates go."""

    def round(self, row: Mapping[str, Any]) -> None:
        """One row of ``rounds.jsonl``."""

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        """The end-of-run summary (``summary.json``)."""

    def close(self, *, failed: bool = False) -> None:
        """Flush and close."""


class NoMetricsLog:
    """``metrics-log = "none"``."""

    def round(self, row: Mapping[str, Any]) -> None:
        return None

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        return None

    def close(self, *, failed: bool = False) -> None:
        return None


class TensorBoardLog:
    """Scalars ``round/<key>`` at step = round, ``summary/<median>`` at the final round."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", "```\n" + json.dumps(cfg.to_toml_dict(), indent=2, sort_keys=True) + "\n```")

    def round(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        for key, value in scalars(row).items():
            self.writer.add_scalar(f"round/{key}", value, step)
        for key, value in texts(row).items():
            self.writer.add_text(f"round/{key}", value, step)
        self.writer.flush()  # `tensorboard --logdir` shows each round as it ends

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        for key, value in summary_scalars(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        self.writer.flush()

    def close(self, *, failed: bool = False) -> None:
        self.writer.close()


class MLflowLog:
    """One MLflow run: the run config as parameters, metrics ``round/<key>`` at step = round."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag

        self._metric = Metric
        run_dir = Path(run_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / MLFLOW_DB}"
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            experiment_id = self.client.create_experiment(name)
        else:
            experiment_id = self.client.create_experiment(name, (run_dir / MLFLOW_ARTIFACTS).as_uri())
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"fedpgen.run-dir": str(run_dir)})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in sorted(cfg.to_toml_dict().items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self._tag = RunTag
        log.info("logging metrics to MLflow run %s at %s", self.run_id, uri)

    def _log(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def round(self, row: Mapping[str, Any]) -> None:
        step = int(row["round"])
        self._log({f"round/{k}": v for k, v in scalars(row).items()}, step)
        tags = [self._tag(f"round-{step}/{k}", v[:5000]) for k, v in texts(row).items()]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def summary(self, summary: Mapping[str, Any], step: int) -> None:
        self._log({f"summary/{k}": v for k, v in summary_scalars(summary).items()}, step)

    def close(self, *, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def open_metrics_log(cfg: RunConfig) -> MetricsLog:
    """The :class:`MetricsLog` that ``metrics-log`` names (``RuntimeError`` without its library)."""
    require_backend(cfg.metrics_log)
    if cfg.metrics_log == "tensorboard":
        return TensorBoardLog(Path(cfg.run_dir), cfg)
    if cfg.metrics_log == "mlflow":
        return MLflowLog(Path(cfg.run_dir), cfg)
    return NoMetricsLog()


@contextlib.contextmanager
def metrics_logging(cfg: RunConfig, strategy: SharedDeltaStrategy) -> Iterator[MetricsLog]:
    """Within this block, each row the strategy writes to ``rounds.jsonl`` is logged too; on
    a normal exit after a final evaluation, so are the medians of the run's summary.

    Parameters
    ----------
    cfg
        The run configuration (``metrics-log``, ``run-dir``).
    strategy
        The server strategy of the run.

    Yields
    ------
    MetricsLog
        The open log (closed on exit; an MLflow run is marked failed if the block raised).
    """
    sink = open_metrics_log(cfg)
    strategy.on_round_row = sink.round
    try:
        yield sink
    except BaseException:
        sink.close(failed=True)
        raise
    try:
        if strategy.final_metrics and cfg.metrics_log != "none":
            from fedpgen.server.summary import summarize

            summary = summarize(Path(cfg.run_dir))
            sink.summary(summary, int(summary["final-round"]))
    finally:
        sink.close()
