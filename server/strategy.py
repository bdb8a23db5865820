"""The server strategy: send the shared base, aggregate only shared deltas, checkpoint, fail loudly.

A legacy ``flwr.server.strategy.Strategy`` on purpose: Flower 1.42's SecAgg+ workflow
(``SecAggPlusWorkflow``) only drives legacy strategies through ``LegacyContext``
(DESIGN.md §6), and secure aggregation plugs in as the fit workflow.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from server import checkpoint
from server.aggregation import make_server_optimizer, weighted_mean
from server.bounds import OutOfBoundsError, cap_weight, check_secure_aggregate, check_weight, clip_elements
from server.results import RunRecorder
from shared.config import RunConfig
from shared.privacy.user_level import clip_delta, user_epsilon, user_level_mean
from shared.tasks import TASKS
from shared.wire import (BUDGET_EXHAUSTED, FIT_SCHEMA, NO_USABLE_DATA, REFUSALS, STATE_TAMPERED, check_metrics,
                         check_update, eval_schema, keys_digest)

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """A round produced no valid aggregate: the run stops instead of keeping the old base."""


_REFUSAL = re.compile(rf"({'|'.join(REFUSALS)}) node=(\d+)")
_REASONS = {BUDGET_EXHAUSTED: "privacy budget spent", NO_USABLE_DATA: "no usable data",
            STATE_TAMPERED: "on-device state failed authentication"}


def refusals_in(failures: list[Any]) -> dict[int, str]:
    """{node id: reason} of refusals that arrived as failed messages (inside SecAgg+)."""
    found = (_REFUSAL.search(str(f)) for f in failures if isinstance(f, BaseException))
    return {int(m.group(2)): m.group(1) for m in found if m}


def refusal_of(res: FitRes) -> str:
    """The refusal reason of a fit reply, or ``""``."""
    return next((r for r in REFUSALS if res.status.message.startswith(r)), "")


class _NotRefused(Criterion):
    def __init__(self, refused: dict[int, str]) -> None:
        self.refused = refused

    def select(self, client: ClientProxy) -> bool:
        return client.node_id not in self.refused


class SharedDeltaStrategy(Strategy):
    """Weighted FedAvg (or FedAdam) of shared-adapter deltas, over the wire allowlist only."""

    def __init__(self, *, cfg: RunConfig, names: tuple[str, ...], theta: list[np.ndarray],
                 completed: int, opt_state: dict[str, list[np.ndarray]], recorder: RunRecorder) -> None:
        super().__init__()
        self.cfg, self.names, self.theta = cfg, names, theta
        self.shapes = [tuple(a.shape) for a in theta]
        self.dtypes = [a.dtype for a in theta]
        self.digest = keys_digest(names)
        self.completed = completed
        self.optimizer = make_server_optimizer(cfg.server_optimizer, lr=cfg.server_lr)
        self.optimizer.load_state(opt_state)
        self.recorder = recorder
        self.final_metrics: list[dict[str, Scalar]] = []
        self.on_round_end: Callable[[dict[str, Any]], None] = lambda row: None
        self.refused: dict[int, str] = {}  # devices that refused, and why (shared.wire.REFUSALS)
        self.eval_schema = eval_schema(TASKS[cfg.task].metric_names)
        self.user_rounds = completed  # DP-FedAvg rounds so far (user-level accounting)
        self.configured_rounds = self.aggregated_rounds = self.last_configured_round = 0  # loud-failure checks
        self._sampled = self._population = 1
        self._bytes_down = 0
        self.stopped: str = ""
        self.refused_round = 0
        self._rejected_before_sum = 0
        self.refused_rounds: list[int] = []  # rounds whose updates were out of bounds: base kept, no checkpoint
        self._round_started = time.perf_counter()

    def absolute_round(self, server_round: int) -> int:
        return self.completed + server_round

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.theta)

    @property
    def exhausted(self) -> set[int]:
        """Devices whose ε budget is spent."""
        return {n for n, why in self.refused.items() if why == BUDGET_EXHAUSTED}

    def refusal_counts(self) -> dict[str, int]:
        return {reason: sum(why == reason for why in self.refused.values()) for reason in REFUSALS}

    def mark_refused(self, refused: dict[int, str], r: int) -> None:
        """Devices that refused (budget spent, no usable data): never sampled again."""
        for node_id, why in refused.items():
            log.warning("round %d: node %s refused to train (%s); it will not be sampled again", r, node_id, why)
        self.refused.update(refused)
        if refused:
            self.refused_round = r

    def _refusal_text(self) -> str:
        return ", ".join(f"{n} {_REASONS[why]}" for why, n in self.refusal_counts().items() if n)

    def stop(self, r: int, why: str) -> None:
        """Stop training (the final evaluation still runs), and say so in the results."""
        self.stopped = f"round {r}: {why}"
        log.warning("%s", self.stopped)
        self.recorder.round({"round": r, **self.refusal_counts(), "stopped": self.stopped})

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        r = self.absolute_round(server_round)
        if r > self.cfg.num_server_rounds:
            return []  # resumed a finished run: only the final evaluation remains
        if self.stopped:
            return []
        total = client_manager.num_available()
        available = total - len(self.refused)
        n = max(self.cfg.min_fit_clients, math.ceil(self.cfg.fraction_fit * available))
        if self.refused and n > available:
            self.stop(r, f"training stopped: {len(self.refused)} of {total} devices refused "
                         f"({self._refusal_text()}); {available} left < {n} needed")
            return []
        if n > available:
            raise RoundFailedError(f"round {r}: {available} clients available, need {n} (min-fit-clients)")
        clients = client_manager.sample(num_clients=n, min_num_clients=n, criterion=_NotRefused(self.refused))
        self._round_started = time.perf_counter()
        self._sampled, self._population = len(clients), total
        self.configured_rounds += 1
        self.last_configured_round = r
        base = ndarrays_to_parameters(self.theta)
        self._bytes_down = sum(len(t) for t in base.tensors)
        fit_ins = FitIns(base, {"server-round": r, "final": False, "sampled-clients": len(clients)})
        return [(c, fit_ins) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        r = self.absolute_round(server_round)
        refused = {proxy.node_id: refusal_of(res) for proxy, res in (f for f in failures if isinstance(f, tuple))
                   if refusal_of(res)}
        refused.update(refusals_in(failures))
        self.mark_refused(refused, r)
        failures = [f for f in failures if not (isinstance(f, tuple) and f[0].node_id in refused)
                    and not (isinstance(f, BaseException) and _REFUSAL.search(str(f)))]
        deltas, weights, declared, byte_counts, accepted = [], [], [], [], []
        rejected, self._rejected_before_sum = self._rejected_before_sum, 0
        for proxy, res in results:
            try:
                delta, weight = self._accept(res)
            except ValueError as exc:
                if self.cfg.secure_aggregation:  # its contribution is inside the sum: the round is refused
                    return self.refuse_round(r, f"node {proxy.node_id}: {exc}")
                rejected += 1
                log.warning("round %d: rejected update from node %s: %s", r, proxy.node_id, exc)
                continue
            deltas.append(delta)
            weights.append(weight)
            declared.append(int(res.num_examples))
            accepted.append(res)
            nbytes = sum(len(t) for t in res.parameters.tensors)  # under SecAgg+: the aggregate, not an upload
            byte_counts.append(nbytes)
            self.recorder.client_round({"round": r, "node-id": proxy.node_id, "bytes-down": self._bytes_down,
                                        "num-examples": res.num_examples,
                                        **({} if self.cfg.secure_aggregation else {"bytes-up": nbytes}),
                                        **{k: v for k, v in res.metrics.items() if k != "keys-digest"}})
        if refused and len(deltas) < self.cfg.min_fit_clients:
            self.stop(r, f"{len(refused)} devices refused ({self._refusal_text()}); training stopped")
            return ndarrays_to_parameters(self.theta), {}
        if len(deltas) < self.cfg.min_fit_clients:
            raise RoundFailedError(
                f"round {r}: {len(deltas)} valid updates (min-fit-clients = {self.cfg.min_fit_clients}); "
                f"{rejected} rejected, {len(failures)} failed: {[str(f)[:200] for f in failures[:3]]}")
        if self.cfg.secure_aggregation:
            try:
                check_secure_aggregate(deltas[0], weights=declared, clipping_range=self.cfg.secagg_clipping_range,
                                       quantization_range=self.cfg.secagg_quantization,
                                       max_weight=self.cfg.secagg_max_weight)
            except OutOfBoundsError as exc:
                return self.refuse_round(r, f"the unmasked aggregate is out of bounds: {exc}")
        cfg = self.cfg
        if cfg.secure_aggregation:
            # SecAgg+ hands every result the same unmasked aggregate: the weighted mean, never one delta.
            if any(not all(np.array_equal(a, b) for a, b in zip(d, deltas[0], strict=True)) for d in deltas[1:]):
                raise RoundFailedError(f"round {r}: secure aggregation returned differing aggregates")
            mean_delta = [d.astype(np.float64) for d in deltas[0]]
            if cfg.user_dp != "off":  # devices sent weight 1: rescale to the fixed denominator n
                mean_delta = user_level_mean([[d * len(deltas) for d in mean_delta]], num_sampled=self._sampled,
                                             central_std=cfg.user_noise_multiplier * cfg.user_clip
                                             if cfg.user_dp == "central" else 0.0, rng=np.random.default_rng())
                self.user_rounds += 1
        elif cfg.user_dp == "off":
            mean_delta = weighted_mean(deltas, weights)
        else:  # DP-FedAvg: fixed denominator, uniform weights; the server adds the noise if central
            central = cfg.user_noise_multiplier * cfg.user_clip if cfg.user_dp == "central" else 0.0
            mean_delta = user_level_mean(deltas, num_sampled=self._sampled, central_std=central,
                                         rng=np.random.default_rng())
            self.user_rounds += 1
        del deltas  # never kept: only the aggregate moves on
        theta = self.optimizer.step(self.theta, mean_delta)
        if not all(np.all(np.isfinite(t)) for t in theta):  # never reached with the bounds above; never written
            return self.refuse_round(r, "the updated base is not finite")
        self.theta = theta
        checkpoint.save(Path(self.cfg.run_dir) / "checkpoints", server_round=r, config_hash=self.cfg.model_hash(),
                        names=self.names, theta=self.theta, opt_state=self.optimizer.state())
        row = {"round": r, "clients": len(weights), "rejected": rejected, "failures": len(failures),
               **self.refusal_counts(),
               "seconds": time.perf_counter() - self._round_started,
               "delta-norm": float(np.sqrt(sum(float((d * d).sum()) for d in mean_delta))),
               "bytes-down-mean": float(self._bytes_down), "secure-aggregation": self.cfg.secure_aggregation,
               "client-sample-rate": self._sampled / self._population}  # user-level accounting; the audit recomputes it
        if not self.cfg.secure_aggregation:
            row["bytes-up-mean"] = float(np.mean(byte_counts))
        if cfg.user_dp != "off":
            row["user-epsilon"] = user_epsilon(noise_multiplier=cfg.user_noise_multiplier,
                                               sample_rate=self._sampled / self._population,
                                               rounds=self.user_rounds, delta=cfg.dp_delta,
                                               accountant=cfg.dp_accountant)
        eps = [float(res.metrics["dp-epsilon"]) for res in accepted if "dp-epsilon" in res.metrics]
        if eps:
            row["epsilon-max"] = max(eps)
        for key in ("train-loss", "val-loss-before", "val-loss-after"):
            vals = [(float(res.metrics[key]), res.num_examples) for res in accepted
                    if key in res.metrics and math.isfinite(float(res.metrics[key]))]
            if vals:
                row[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
        self.recorder.round(row)
        self.aggregated_rounds += 1
        self.on_round_end(row)
        log.info("round %d/%d: %d clients, %.1fs, max record-level ε so far %.2f", r, self.cfg.num_server_rounds,
                 len(weights), row["seconds"], row.get("epsilon-max", float("inf")))
        return ndarrays_to_parameters(self.theta), {}

    def _accept(self, res: FitRes) -> tuple[list[np.ndarray], float]:
        """One reply's delta and weight, checked and bounded (server/bounds.py); ``ValueError`` if malformed.

        Under SecAgg+ every reply carries the same unmasked aggregate: its bounds are checked
        once for the round (``check_secure_aggregate``), the declared weight here."""
        try:
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as exc:  # np.load of hostile bytes raises several types: all a malformed reply
            raise ValueError(f"malformed update: arrays do not deserialize ({type(exc).__name__})") from None
        dtypes = [np.dtype(np.float64)] * len(self.shapes) if self.cfg.secure_aggregation else self.dtypes
        check_update(arrays, self.shapes, res.metrics, schema=FIT_SCHEMA, dtypes=dtypes)
        if res.metrics.get("keys-digest") != self.digest:
            raise ValueError("keys-digest does not match the server's allowlist")
        if self.cfg.secure_aggregation:
            return arrays, float(check_weight(res.num_examples, self.cfg.secagg_max_weight))
        if isinstance(res.num_examples, bool) or not isinstance(res.num_examples, int) or res.num_examples < 1:
            raise ValueError(f"num_examples = {res.num_examples!r}")
        delta = clip_elements(arrays, self.cfg.secagg_clipping_range)
        if self.cfg.user_dp == "central":  # the server's noise is calibrated to S: hold every device to it
            delta = clip_delta(delta, self.cfg.user_clip)
        return delta, cap_weight(res.num_examples, self.cfg.secagg_max_weight)

    def reject_before_sum(self, node_id: int, why: str) -> None:
        """A SecAgg+ reply that did not fit the schema, dropped before the sum (a dropout)."""
        log.warning("round %d: rejected masked update from node %s: %s", self.last_configured_round, node_id, why)
        self._rejected_before_sum += 1

    def refuse_round(self, r: int, why: str) -> tuple[Parameters, dict[str, Scalar]]:
        """Keep the base as it was, write no checkpoint, record the refused round, go on."""
        log.error("round %d REFUSED, shared base unchanged: %s", r, why)
        self.refused_rounds.append(r)
        self.recorder.round({"round": r, "out-of-bounds": why[:500], "seconds": time.perf_counter() - self._round_started})
        return ndarrays_to_parameters(self.theta), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.absolute_round(server_round) < self.cfg.num_server_rounds:
            return []
        # A spent budget still evaluates; no usable data or tampered state has nothing to evaluate.
        skip = {n: why for n, why in self.refused.items() if why != BUDGET_EXHAUSTED}
        available = client_manager.num_available() - len(skip)
        n = max(1, math.ceil(self.cfg.eval_fraction * available))
        clients = client_manager.sample(num_clients=n, min_num_clients=n, criterion=_NotRefused(skip))
        ins = EvaluateIns(ndarrays_to_parameters(self.theta), {"server-round": self.cfg.num_server_rounds,
                                                              "final": True})
        return [(c, ins) for c in clients]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        rows = []
        for proxy, res in results:
            try:
                check_metrics(res.metrics, self.eval_schema)
            except ValueError as exc:
                log.warning("evaluation from node %s rejected: %s", proxy.node_id, exc)
                continue
            rows.append({"node-id": proxy.node_id, **res.metrics})
        if failures:
            log.warning("final evaluation: %d clients failed", len(failures))
        self.final_metrics = rows
        self.recorder.final_clients(rows)
        if not rows:
            return None, {}
        return float(np.mean([float(r[f"personal-{TASKS[self.cfg.task].primary}"]) for r in rows])), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
