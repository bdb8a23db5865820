"""The server strategy: send the shared base, aggregate only shared deltas, checkpoint, fail loudly.

A legacy ``flwr.server.strategy.Strategy`` on purpose: Flower 1.42's SecAgg+ workflow
(``SecAggPlusWorkflow``) only drives legacy strategies through ``LegacyContext``
(docs/architecture.md, "Why the server uses Flower's legacy strategy API"), and secure
aggregation plugs in as the fit workflow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import Strategy

from fedpgen.server import checkpoint
from fedpgen.server.aggregation import RoundFailedError, aggregate, make_server_optimizer
from fedpgen.server.bounds import OutOfBoundsError, cap_weight, check_weight, clip_elements
from fedpgen.server.results import RunRecorder, read_jsonl
from fedpgen.shared.config import RunConfig
from fedpgen.shared.privacy.user_level import (TooFewNoiseShares, check_noise_survivors, clip_delta, expected_cohort,
                                               user_epsilon_of_rounds, user_level_mean)
from fedpgen.shared.tasks import TASKS
from fedpgen.shared.wire import (
    BUDGET_EXHAUSTED,
    FIT_SCHEMA,
    REFUSAL_MEANING,
    REFUSALS,
    check_metrics,
    check_update,
    decode_refusal,
    eval_schema,
    keys_digest,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Accepted:
    res: FitRes
    delta: list[np.ndarray]
    weight: float
    nbytes: int


def refusals_in(failures: list[Any]) -> dict[int, str]:
    """{node id: reason} of refusals that arrived as failed messages (inside SecAgg+)."""
    found = (decode_refusal(str(f), anywhere=True) for f in failures if isinstance(f, BaseException))
    return {node: reason for reason, node in (f for f in found if f) if node is not None}


def refusal_of(res: FitRes) -> str:
    """The refusal reason of a fit reply, or ``""``."""
    found = decode_refusal(res.status.message)
    return found[0] if found else ""


class _NotRefused(Criterion):
    def __init__(self, refused: set[int]) -> None:
        self.refused = refused

    def select(self, client: ClientProxy) -> bool:
        return client.node_id not in self.refused


def poisson_cohort(client_manager: ClientManager, excluded: set[int], *, rate: float,
                   coin: random.Random) -> list[ClientProxy]:
    """Each device that can be sampled, independently with probability ``rate``: the client
    sampling the user-level accountant assumes (Poisson). A fixed-size cohort is not: adding a
    user to it swaps another out, a change of the sum of up to 2·S, and the ε of z at q = n/N
    understates it (docs/privacy.md). ``coin`` draws from OS entropy: no one can recompute the
    cohort from public values."""
    nodes = [c for c in client_manager.all().values() if c.node_id not in excluded]
    return [c for c in nodes if coin.random() < rate]


def past_user_rates(rounds_file: Path, completed: int) -> list[float | None]:
    """The client sampling rate of each DP-FedAvg round up to the checkpoint ``completed``, from
    ``rounds.jsonl`` (a restarted server resumes its accounting). A round without such a row (a
    refused round, which the checkpoint's count includes, or a lost file) is ``None``: charged,
    at the q of the round that asks, as every round was before per-round rates."""
    rows = read_jsonl(rounds_file, skip_torn=True)  # a line torn by the crash resumed from: its round unknown
    rates = {int(r["round"]): float(r["client-sample-rate"]) for r in rows
             if "user-epsilon" in r and "client-sample-rate" in r and int(r["round"]) <= completed}
    known: list[float | None] = [rates[r] for r in sorted(rates)]
    return known + [None] * (completed - len(known))


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
        self.on_round_end: Callable[[dict[str, Any]], None] = lambda row: None  # an aggregated round
        self.on_round_row: Callable[[dict[str, Any]], None] = lambda row: None  # any row of rounds.jsonl
        self.refused: dict[int, str] = {}  # devices that refused, and why (shared.wire.REFUSALS)
        self.times_sampled: dict[int, int] = {}  # per node, this server process (dp-max-participations)
        self.eval_schema = eval_schema(TASKS[cfg.task].metric_names)
        # DP-FedAvg rounds so far, each its q (user-level accounting); None: before a restart, q unknown
        self.user_rates: list[float | None] = (past_user_rates(recorder.dir / "rounds.jsonl", completed)
                                               if cfg.user_dp != "off" else [])
        self.configured_rounds = self.aggregated_rounds = self.last_configured_round = 0  # loud-failure checks
        self._sampled = self._expected = self._population = 1  # this round's cohort, its expected size, N
        self.coin: random.Random = secrets.SystemRandom()  # user-level cohorts (poisson_cohort)
        self._bytes_down = 0
        self.stopped: str = ""
        self.refused_round = 0
        self._rejected_before_sum = 0
        self.refused_rounds: list[int] = []  # rounds whose updates were out of bounds: base kept, no checkpoint
        self._round_started = time.perf_counter()

    @property
    def user_rounds(self) -> int:
        """DP-FedAvg rounds accounted so far (this process's and those before a restart)."""
        return len(self.user_rates)

    def _write_round(self, row: dict[str, Any]) -> None:
        """Record a row of ``rounds.jsonl`` and hand it to ``on_round_row`` (server/metrics_log.py)."""
        self.recorder.round(row)
        self.on_round_row(row)

    def absolute_round(self, server_round: int) -> int:
        return self.completed + server_round

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.theta)

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
        return ", ".join(f"{n} {REFUSAL_MEANING[why]}" for why, n in self.refusal_counts().items() if n)

    def capped(self) -> set[int]:
        """Devices sampled ``dp-max-participations`` times: they would refuse (a device spends its
        budget when sampled, even if its update is then lost), so they are not sampled again.
        Under SecAgg+ a refusal is a dropout, and too many of them halt the round. The device
        enforces its cap itself (across server restarts too); this only avoids asking. The cap
        holds under record-level and user-level DP alike (``shared/privacy/plan.py``)."""
        cap = self.cfg.dp_max_participations if self.cfg.record_dp or self.cfg.user_dp != "off" else 0
        return {node for node, k in self.times_sampled.items() if cap and k >= cap}

    def stop(self, r: int, why: str) -> None:
        """Stop training (the final evaluation still runs), and say so in the results."""
        self.stopped = f"round {r}: {why}"
        log.warning("%s", self.stopped)
        self._write_round({"round": r, **self.refusal_counts(), "stopped": self.stopped})

    def wait_for_population(self, client_manager: ClientManager, *, poll: float = 1.0) -> int:
        """Before a round samples: wait until ``min-available-clients`` devices are registered
        (a simulation sets it to its whole population), as Flower's own ``min_available_clients``.
        Flower registers virtual nodes while the server already runs: sampling at once would
        draw the configured share of whoever registered first (53 of 10,000 users in round 1)
        and misstate the sampling rate q of user-level accounting; in a deployment a device
        that crashed and is reconnecting is waited for. Fails after ``round-timeout`` seconds
        if one is set. Returns the number registered (each count is a pass over every node)."""
        need = max(self.cfg.min_available_clients, self.cfg.min_fit_clients)
        started = last_said = time.monotonic()
        while (have := client_manager.num_available()) < need:
            waited = time.monotonic() - started
            if self.cfg.round_timeout and waited > self.cfg.round_timeout:
                raise RoundFailedError(f"only {have} of {need} devices registered after {waited:.0f} s "
                                       "(min-available-clients; round-timeout)")
            if time.monotonic() - last_said >= 10.0:
                log.info("waiting for devices to register: %d of %d", have, need)
                last_said = time.monotonic()
            time.sleep(poll)
        return have

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        r = self.absolute_round(server_round)
        if r > self.cfg.num_server_rounds:
            return []  # resumed a finished run: only the final evaluation remains
        if self.stopped:
            return []
        total = self.wait_for_population(client_manager)
        excluded = set(self.refused) | self.capped()
        available = total - len(excluded)
        if self.cfg.user_dp != "off":  # the expected Poisson cohort: q = fraction-fit whatever N (not ⌈f·N⌉/N)
            n: float = expected_cohort(population=available, fraction=self.cfg.fraction_fit,
                                       min_clients=self.cfg.min_fit_clients)
        else:
            n = max(self.cfg.min_fit_clients, math.ceil(self.cfg.fraction_fit * available))
        if excluded and n > available:
            self.stop(r, f"training stopped: {len(self.refused)} of {total} devices refused "
                         f"({self._refusal_text()}), {len(self.capped())} reached dp-max-participations; "
                         f"{available} left < {n:g} needed")
            return []
        if n > available:
            raise RoundFailedError(f"round {r}: {available} clients available, need {n:g} (min-fit-clients)")
        if self.cfg.user_dp != "off":  # what user-level accounting assumes: n is the expected cohort
            clients = poisson_cohort(client_manager, excluded, rate=n / available, coin=self.coin)
        else:
            clients = client_manager.sample(num_clients=int(n), min_num_clients=int(n), criterion=_NotRefused(excluded))
        for c in clients:
            self.times_sampled[c.node_id] = self.times_sampled.get(c.node_id, 0) + 1
        self._round_started = time.perf_counter()
        # q = n / (the devices that could be sampled): a refused or capped device never is, the others more often
        self._sampled, self._expected, self._population = len(clients), n, available
        if not clients:  # a Poisson draw of nobody: the round releases the noise alone
            self._noise_only_round(r)
            return []
        self.configured_rounds += 1
        self.last_configured_round = r
        base = ndarrays_to_parameters(self.theta)
        self._bytes_down = sum(len(t) for t in base.tensors)
        fit_ins = FitIns(base, {"server-round": r, "final": False, "sampled-clients": len(clients)})
        return [(c, fit_ins) for c in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Accept (refusals, checks, bounds) → aggregate (server/aggregation.py) → record."""
        r = self.absolute_round(server_round)
        failures, refused_now = self._take_refusals(r, failures)
        accepted, rejected, refused_because = self._accept_all(r, results)
        if refused_because:
            return self.refuse_round(r, refused_because)
        if not self._enough(r, accepted, rejected, failures, refused_now):
            return ndarrays_to_parameters(self.theta), {}
        cfg = self.cfg
        try:
            mean_delta, user_round = aggregate([a.delta for a in accepted], [a.weight for a in accepted],
                                               declared=[int(a.res.num_examples) for a in accepted], cfg=cfg,
                                               sampled=self._sampled, denominator=self._expected,
                                               rng=np.random.default_rng())
        except OutOfBoundsError as exc:
            return self.refuse_round(r, f"the unmasked aggregate is out of bounds: {exc}")
        except TooFewNoiseShares as exc:
            return self.refuse_round(r, f"too little noise: {exc}")
        except RoundFailedError as exc:
            raise RoundFailedError(f"round {r}: {exc}") from None
        theta = self.optimizer.step(self.theta, mean_delta)
        if not all(np.all(np.isfinite(t)) for t in theta):  # never reached with the bounds above; never written
            return self.refuse_round(r, "the updated base is not finite")
        self.theta = theta
        if user_round:
            self.user_rates.append(self._expected / self._population)
        self._record(r, accepted, rejected, failures, mean_delta)
        return ndarrays_to_parameters(self.theta), {}

    def _take_refusals(self, r: int, failures: list[Any]) -> tuple[list[Any], int]:
        """Mark the devices that refused (never sampled again); ``(the other failures, how many refused)``."""
        refused = {proxy.node_id: refusal_of(res) for proxy, res in (f for f in failures if isinstance(f, tuple))
                   if refusal_of(res)}
        refused.update(refusals_in(failures))
        self.mark_refused(refused, r)
        return [f for f in failures if not (isinstance(f, tuple) and f[0].node_id in refused)
                and not (isinstance(f, BaseException) and refusals_in([f]))], len(refused)

    def _accept_all(self, r: int, results: list[tuple[ClientProxy, FitRes]]) -> tuple[list[_Accepted], int, str]:
        """``(accepted updates, rejected count, why the round is refused or "")``: a malformed reply
        is rejected; under SecAgg+ its contribution is inside the sum, so the round is refused."""
        accepted: list[_Accepted] = []
        rejected, self._rejected_before_sum = self._rejected_before_sum, 0
        for proxy, res in results:
            try:
                delta, weight = self._accept(res)
            except ValueError as exc:
                if self.cfg.secure_aggregation:
                    return [], rejected, f"node {proxy.node_id}: {exc}"
                rejected += 1
                log.warning("round %d: rejected update from node %s: %s", r, proxy.node_id, exc)
                continue
            nbytes = sum(len(t) for t in res.parameters.tensors)  # under SecAgg+: the aggregate, not an upload
            accepted.append(_Accepted(res=res, delta=delta, weight=weight, nbytes=nbytes))
            self.recorder.client_round({"round": r, "node-id": proxy.node_id, "bytes-down": self._bytes_down,
                                        "num-examples": res.num_examples,
                                        **({} if self.cfg.secure_aggregation else {"bytes-up": nbytes}),
                                        **{k: v for k, v in res.metrics.items() if k != "keys-digest"}})
        return accepted, rejected, ""

    def _enough(self, r: int, accepted: list[_Accepted], rejected: int, failures: list[Any], refused_now: int) -> bool:
        """Enough valid updates to aggregate? Too few after refusals stops training (the final
        evaluation still runs); too few otherwise fails the run loudly. A Poisson cohort (user-level
        DP) may draw fewer than min-fit-clients: then every device it drew must answer."""
        need = self.cfg.min_fit_clients
        if self.cfg.user_dp != "off":
            need = min(need, self._sampled)
        if len(accepted) >= need:
            return True
        if refused_now:
            self.stop(r, f"{refused_now} devices refused ({self._refusal_text()}); training stopped")
            return False
        raise RoundFailedError(
            f"round {r}: {len(accepted)} valid updates (min-fit-clients = {self.cfg.min_fit_clients}); "
            f"{rejected} rejected, {len(failures)} failed: {[str(f)[:200] for f in failures[:3]]}")

    def _record(self, r: int, accepted: list[_Accepted], rejected: int, failures: list[Any],
                mean_delta: list[np.ndarray]) -> None:
        """Checkpoint the new base, then write the round's row (rounds.jsonl) and log it."""
        cfg = self.cfg
        checkpoint.save(Path(cfg.run_dir) / "checkpoints", server_round=r, config_hash=cfg.model_hash(),
                        names=self.names, theta=self.theta, opt_state=self.optimizer.state())
        row = {"round": r, "clients": len(accepted), "rejected": rejected, "failures": len(failures),
               **self.refusal_counts(),
               "seconds": time.perf_counter() - self._round_started,
               "delta-norm": float(np.sqrt(sum(float((d * d).sum()) for d in mean_delta))),
               "bytes-down-mean": float(self._bytes_down), "secure-aggregation": cfg.secure_aggregation,
               "client-sample-rate": self._expected / self._population,  # user-level q; the audit recomputes ε
               "sampled": self._sampled}  # how many devices shared a distributed noise (the audit's check)
        if not cfg.secure_aggregation and accepted:
            row["bytes-up-mean"] = float(np.mean([a.nbytes for a in accepted]))
        if cfg.user_dp != "off":
            now = self._expected / self._population  # a round of unknown q is charged at this one (as before)
            rates = [now if q is None else q for q in self.user_rates]
            row["user-epsilon"] = user_epsilon_of_rounds(noise_multiplier=cfg.user_noise_multiplier, sample_rates=rates,
                                                         delta=cfg.dp_delta, accountant=cfg.dp_accountant)
        eps = [float(a.res.metrics["dp-epsilon"]) for a in accepted if "dp-epsilon" in a.res.metrics]
        if eps:
            row["epsilon-max"] = max(eps)
        for key in ("train-loss", "val-loss-before", "val-loss-after"):
            vals = [(float(a.res.metrics[key]), a.res.num_examples) for a in accepted
                    if key in a.res.metrics and math.isfinite(float(a.res.metrics[key]))]
            if vals:
                row[key] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
        self._write_round(row)
        self.aggregated_rounds += 1
        self.on_round_end(row)
        log.info("round %d/%d: %d clients, %.1fs, max record-level ε so far %.2f", r, cfg.num_server_rounds,
                 len(accepted), row["seconds"], row.get("epsilon-max", float("inf")))

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

    def _noise_only_round(self, r: int) -> None:
        """A user-level round whose Poisson cohort is empty: θ moves by N(0, (z·S)²) / n, what the
        mechanism releases for an empty sum (the server adds it: no device's data is in it), and
        the round is accounted like any other."""
        cfg = self.cfg
        noise = user_level_mean([[np.zeros(t.shape) for t in self.theta]], num_sampled=self._expected,
                                central_std=cfg.user_noise_multiplier * cfg.user_clip, rng=np.random.default_rng())
        log.info("round %d: the Poisson draw sampled no device; the base takes the noise alone", r)
        self.theta = self.optimizer.step(self.theta, noise)
        self.user_rates.append(self._expected / self._population)
        self._record(r, [], 0, [], noise)

    def shares_sized_for(self, devices: int) -> None:
        """The devices of this round told to size their noise shares for ``devices`` (SecAgg+,
        once setup has dropped those that refused): the count a distributed round must reach."""
        self._sampled = devices

    def refuse_if_noise_short(self, contributed: int) -> bool:
        """Under distributed user-level DP, refuse the round just configured (True) when fewer
        devices contributed than their noise shares were sized for. SecAgg+ asks this before
        it unmasks anything, so the server never learns a sum carrying less than z·S noise."""
        if self.cfg.user_dp != "distributed":
            return False
        try:
            check_noise_survivors(contributed, num_sampled=self._sampled,
                                  dropouts=self.cfg.user_noise_dropouts)
        except TooFewNoiseShares as exc:
            self.refuse_round(self.last_configured_round, f"too little noise, nothing unmasked: {exc}")
            return True
        return False

    def refuse_round(self, r: int, why: str) -> tuple[Parameters, dict[str, Scalar]]:
        """Keep the base as it was, write no checkpoint, record the refused round, go on."""
        log.error("round %d REFUSED, shared base unchanged: %s", r, why)
        self.refused_rounds.append(r)
        self._write_round({"round": r, "out-of-bounds": why[:500], "seconds": time.perf_counter() - self._round_started})
        return ndarrays_to_parameters(self.theta), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.absolute_round(server_round) < self.cfg.num_server_rounds:
            return []
        # A spent budget still evaluates; no usable data or tampered state has nothing to evaluate.
        skip = {n: why for n, why in self.refused.items() if why != BUDGET_EXHAUSTED}
        available = client_manager.num_available() - len(skip)
        n = max(1, math.ceil(self.cfg.eval_fraction * available))
        clients = client_manager.sample(num_clients=n, min_num_clients=n, criterion=_NotRefused(set(skip)))
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
