"""The server strategy: send the shared base, aggregate only shared deltas, checkpoint, fail loudly.

A legacy ``flwr.server.strategy.Strategy`` on purpose: Flower 1.42's SecAgg+ workflow
(``SecAggPlusWorkflow``) only drives legacy strategies through ``LegacyContext``
(DESIGN.md §6), and secure aggregation plugs in as the fit workflow.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server import checkpoint
from server.aggregation import make_server_optimizer, weighted_mean
from server.results import RunRecorder
from shared.config import RunConfig
from shared.wire import EVAL_METRICS, FIT_METRICS, check_update, keys_digest

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """A round produced no valid aggregate: the run stops instead of keeping the old base."""


class SharedDeltaStrategy(Strategy):
    """Weighted FedAvg (or FedAdam) of shared-adapter deltas, over the wire allowlist only."""

    def __init__(self, *, cfg: RunConfig, names: tuple[str, ...], theta: list[np.ndarray],
                 completed: int, opt_state: dict[str, list[np.ndarray]], recorder: RunRecorder) -> None:
        super().__init__()
        self.cfg, self.names, self.theta = cfg, names, theta
        self.shapes = [tuple(a.shape) for a in theta]
        self.digest = keys_digest(names)
        self.completed = completed
        self.optimizer = make_server_optimizer(cfg.server_optimizer, lr=cfg.server_lr)
        self.optimizer.load_state(opt_state)
        self.recorder = recorder
        self.final_metrics: list[dict[str, Scalar]] = []
        self._round_started = time.perf_counter()

    def absolute_round(self, server_round: int) -> int:
        return self.completed + server_round

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.theta)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        r = self.absolute_round(server_round)
        if r > self.cfg.num_server_rounds:
            return []  # resumed a finished run: only the final evaluation remains
        available = client_manager.num_available()
        n = max(self.cfg.min_fit_clients, math.ceil(self.cfg.fraction_fit * available))
        if n > available:
            raise RoundFailedError(f"round {r}: {available} clients available, need {n} (min-fit-clients)")
        clients = client_manager.sample(num_clients=n, min_num_clients=n)
        self._round_started = time.perf_counter()
        fit_ins = FitIns(ndarrays_to_parameters(self.theta), {"server-round": r, "final": False})
        return [(c, fit_ins) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        r = self.absolute_round(server_round)
        deltas, weights, rejected, byte_counts = [], [], 0, []
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            try:
                check_update(arrays, self.shapes, res.metrics, allowed=FIT_METRICS)
                if res.metrics.get("keys-digest") != self.digest:
                    raise ValueError("keys-digest does not match the server's allowlist")
                if res.num_examples <= 0:
                    raise ValueError(f"num_examples = {res.num_examples}")
            except ValueError as exc:
                rejected += 1
                log.warning("round %d: rejected update from node %s: %s", r, proxy.node_id, exc)
                continue
            deltas.append(arrays)
            weights.append(float(res.num_examples))
            nbytes = sum(len(t) for t in res.parameters.tensors)
            byte_counts.append(nbytes)
            self.recorder.client_round({"round": r, "node-id": proxy.node_id, "bytes-up": nbytes,
                                        "bytes-down": nbytes, "num-examples": res.num_examples,
                                        **{k: v for k, v in res.metrics.items() if k != "keys-digest"}})
        if len(deltas) < self.cfg.min_fit_clients:
            raise RoundFailedError(
                f"round {r}: {len(deltas)} valid updates (min-fit-clients = {self.cfg.min_fit_clients}); "
                f"{rejected} rejected, {len(failures)} failed: {[str(f)[:200] for f in failures[:3]]}")
        mean_delta = weighted_mean(deltas, weights)
        del deltas  # never kept: only the aggregate moves on
        self.theta = self.optimizer.step(self.theta, mean_delta)
        checkpoint.save(Path(self.cfg.run_dir) / "checkpoints", server_round=r, config_hash=self.cfg.model_hash(),
                        names=self.names, theta=self.theta, opt_state=self.optimizer.state())
        row = {"round": r, "clients": len(weights), "rejected": rejected, "failures": len(failures),
               "seconds": time.perf_counter() - self._round_started,
               "delta-norm": float(np.sqrt(sum(float((d * d).sum()) for d in mean_delta))),
               "bytes-up-mean": float(np.mean(byte_counts))}
        for key in ("train-loss", "val-loss-before", "val-loss-after"):
            vals = [(float(res.metrics[key]), res.num_examples) for _, res in results
                    if key in res.metrics and math.isfinite(float(res.metrics[key]))]
            if vals:
                row[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
        self.recorder.round(row)
        log.info("round %d/%d: %d clients, train loss %.4f, %.1fs", r, self.cfg.num_server_rounds,
                 len(weights), row.get("train-loss", float("nan")), row["seconds"])
        return ndarrays_to_parameters(self.theta), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.absolute_round(server_round) < self.cfg.num_server_rounds:
            return []
        available = client_manager.num_available()
        clients = client_manager.sample(num_clients=max(1, math.ceil(self.cfg.eval_fraction * available)))
        ins = EvaluateIns(ndarrays_to_parameters(self.theta), {"server-round": self.cfg.num_server_rounds,
                                                              "final": True})
        return [(c, ins) for c in clients]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        rows = []
        for proxy, res in results:
            extra = set(res.metrics) - EVAL_METRICS
            if extra:
                log.warning("evaluation from node %s rejected: metrics outside the wire schema %s",
                            proxy.node_id, sorted(extra))
                continue
            rows.append({"node-id": proxy.node_id, **res.metrics})
        if failures:
            log.warning("final evaluation: %d clients failed", len(failures))
        self.final_metrics = rows
        self.recorder.final_clients(rows)
        if not rows:
            return None, {}
        return float(np.mean([float(r["personal-ppl"]) for r in rows])), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
