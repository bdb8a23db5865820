"""Run the federation from the server side: resume, strategy, Flower's legacy workflow."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from fedpgen.server import checkpoint
from fedpgen.server.metrics_log import metrics_logging
from fedpgen.server.progress import EVENTS_FILE, RoundProgress
from fedpgen.server.results import RunRecorder
from fedpgen.server.secure_aggregation import LoudSecAggPlus
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.adapters import get_arrays
from fedpgen.shared.config import RunConfig
from fedpgen.shared.locking import exclusive
from fedpgen.shared.model import build_model
from fedpgen.shared.wire_transcript import recording_grid

log = logging.getLogger(__name__)


def make_strategy(cfg: RunConfig) -> SharedDeltaStrategy:
    """Initial shared base from the seeded adapters, or the newest checkpoint of this run-dir."""
    built = build_model(cfg)
    names = built.sets.send
    theta, completed, opt_state = get_arrays(built.model, names), 0, {}
    ckpt = checkpoint.latest(Path(cfg.run_dir) / "checkpoints", config_hash=cfg.model_hash(), names=names)
    if ckpt is not None:
        theta, completed, opt_state = ckpt.theta, ckpt.round, ckpt.opt_state
        log.info("resuming from checkpoint of round %d", completed)
    return SharedDeltaStrategy(cfg=cfg, names=names, theta=theta, completed=completed, opt_state=opt_state,
                               recorder=RunRecorder(Path(cfg.run_dir), cfg))


def run_server(grid: Grid, context: Context, cfg: RunConfig) -> SharedDeltaStrategy:
    """The whole federation, holding the run folder exclusively (one run per folder, shared/locking.py)."""
    with exclusive(Path(cfg.run_dir), what="run folder"):
        return _run(grid, context, cfg)


def _run(grid: Grid, context: Context, cfg: RunConfig) -> SharedDeltaStrategy:
    strategy = make_strategy(cfg)
    remaining = max(1, cfg.num_server_rounds - strategy.completed)
    legacy = LegacyContext(context=context, strategy=strategy,
                           config=ServerConfig(num_rounds=remaining, round_timeout=cfg.round_timeout or None))
    with (RoundProgress(total_rounds=cfg.num_server_rounds, offset=strategy.completed,
                        events=Path(cfg.run_dir) / EVENTS_FILE) as progress,
          metrics_logging(cfg, strategy)):  # docs/monitoring.md
        strategy.on_round_end = progress.round_recorded
        fit_workflow = LoudSecAggPlus(cfg, strategy) if cfg.secure_aggregation else None
        grid = recording_grid(progress.watch(grid), cfg)  # wire-transcript: audits
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    if not strategy.final_metrics:
        raise RuntimeError("the final evaluation returned no client metrics")
    return strategy
