"""Secure aggregation with Flower's SecAgg+, driven as the legacy fit workflow, failing loudly.

Flower 1.42's ``SecAggPlusWorkflow`` runs only on the legacy path (``LegacyContext`` +
a legacy strategy); key agreement, secret sharing, encryption and masking are Flower's
(built on ``cryptography``), nothing here is a cryptographic primitive. Two upstream traps
are closed here: a round in which SecAgg+ halts (too few devices for the threshold,
dropouts, an even integer ``num_shares``) returns silently and keeps the old shared base —
we raise instead; and ``num_shares`` is validated in the run config.

A third is a cost trap: a fractional ``num_shares`` grows with the cohort; each device's
Shamir sharing (pycryptodome, pure Python) costs about shares × threshold and the server's
unmasking about (shares combined)² per device. At 1,000 devices the default fraction gives 101
shares: 2.6 CPU seconds per device per round. A fraction is capped at ``secagg-max-shares``
(``capped_shares``), and the server combines ``threshold`` shares of each device, not all it
collected (``keep_threshold_shares``), in a pool of processes (``server/unmasking.py``), and
devices share their private key as its 48-byte scalar and a 12-byte mask seed
(``shared/secagg_keys.py``; docs/scale.md).

Known limit, stated in the audit: Flower derives the masks with numpy's ``RandomState``
seeded from 32 bits of the shared secret, weaker than its key agreement.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.compat.common import recorddict_compat as compat
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import Grid
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedpgen.server import unmasking
from fedpgen.server.strategy import RoundFailedError, SharedDeltaStrategy, refusals_in
from fedpgen.server.bounds import check_weight
from fedpgen.shared import secagg_keys
from fedpgen.shared.config import RunConfig
from fedpgen.shared.wire import FIT_SCHEMA, check_metrics

FITINS = "fitins"  # Flower's record names of a FitIns (recorddict_compat): fitins.config, fitins.parameters

log = logging.getLogger(__name__)
# Flower's workflow module: its unmask stage calls this module's ``combine_shares`` by name
_flower_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")
secagg_keys.install_on_server()  # a dropped device's sk1 comes back as its scalar (shared/secagg_keys.py)


def secagg_parameters(cfg: RunConfig) -> dict[str, float | int]:
    """SecAgg+ parameters derived from the validated run config."""
    shares = cfg.secagg_num_shares
    threshold = cfg.secagg_threshold
    return {
        "num_shares": int(shares) if shares > 1 else float(shares),
        "reconstruction_threshold": int(threshold) if threshold >= 1 else float(threshold),
        "clipping_range": cfg.secagg_clipping_range,
        "quantization_range": cfg.secagg_quantization,
        "max_weight": cfg.secagg_max_weight,
        "timeout": cfg.round_timeout or None,
    }


def flower_shares(fraction: float, cohort: int) -> int:
    """The shares Flower 1.42's ``SecAggPlusWorkflow.setup_stage`` derives from a fraction."""
    shares = round(fraction * cohort)
    if shares < cohort and shares % 2 == 0:
        shares += 1
    return cohort if shares <= 2 else shares


def capped_shares(num_shares: float | int, cohort: int, cap: int) -> float | int:
    """``num_shares`` for a round of ``cohort`` devices: a fraction that would give more than
    ``cap`` shares becomes the integer ``cap`` (odd, >= 3); anything else is left to Flower."""
    if isinstance(num_shares, int) or cap <= 0 or cap >= cohort or flower_shares(num_shares, cohort) <= cap:
        return num_shares
    return cap


def check_masked_reply(content: RecordDict, *, shapes: list[tuple[int, ...]], modulus: int, max_weight: float,
                       digest: str) -> None:
    """Raise ``ValueError`` unless a collect-stage reply fits the wire schema: the masked vector
    (a weight level, then one integer array per shared name, each in ``[0, modulus)``), the
    declared weight and the metrics. Checked before Flower sums the vectors."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    raw = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
    if not isinstance(raw, list) or len(raw) != 1 + len(shapes) or not all(isinstance(b, bytes) for b in raw):
        raise ValueError(f"masked vector of {len(raw) if isinstance(raw, list) else 'no'} arrays, "
                         f"schema has {1 + len(shapes)}")
    for i, (blob, shape) in enumerate(zip(raw, [(1,), *shapes], strict=True)):
        try:
            arr = bytes_to_ndarray(blob)
        except Exception as exc:  # hostile bytes: any parse error is a malformed reply
            raise ValueError(f"masked array {i} does not deserialize ({type(exc).__name__})") from None
        if tuple(arr.shape) != tuple(shape) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"masked array {i}: {arr.dtype} {tuple(arr.shape)}, schema integers {shape}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= modulus):
            raise ValueError(f"masked array {i}: values outside [0, {modulus})")
    fitres = compat.recorddict_to_fitres(content, keep_input=True)
    check_weight(fitres.num_examples, max_weight)
    check_metrics(fitres.metrics, FIT_SCHEMA)
    if fitres.metrics.get("keys-digest") != digest:
        raise ValueError("keys-digest does not match the server's allowlist")


class _CheckedReplies:
    """``grid`` whose collect-stage replies are checked before Flower sums them: a reply that
    does not fit is dropped, so SecAgg+ treats its sender as a dropout and removes its masks."""

    def __init__(self, grid: Grid, check: Callable[[RecordDict], None], on_reject: Callable[[int, str], None]) -> None:
        self._grid, self._check, self._on_reject = grid, check, on_reject

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        kept = []
        for msg in self._grid.send_and_receive(messages, timeout=timeout):
            if not msg.has_error():
                try:
                    self._check(msg.content)
                except (ValueError, TypeError, KeyError) as exc:
                    self._on_reject(msg.metadata.src_node_id, str(exc))
                    continue
            kept.append(msg)
        return kept


def _share_replies(replies: list[Message]) -> Iterator[tuple[Message, ConfigRecord, list, list]]:
    """(reply, its record, owner ids, shares) of each unmask reply Flower reads: errors skipped,
    and a reply whose two lists differ in length too (Flower refuses it)."""
    for msg in replies:
        if msg.has_error():
            continue
        record = msg.content.config_records[RECORD_KEY_CONFIGS]
        nids, shares = list(record[Key.NODE_ID_LIST]), list(record[Key.SHARE_LIST])  # type: ignore[arg-type]
        if len(nids) == len(shares):
            yield msg, record, nids, shares


def keep_threshold_shares(replies: list[Message], threshold: int,
                          neighbours: Mapping[int, set[int]]) -> tuple[int, int]:
    """Trim the unmask stage's replies, in place, to the first ``threshold`` distinct shares of
    each device; return (surplus shares dropped, hostile shares dropped).

    Flower's unmask stage hands every share it collected of a device, up to k, to
    ``combine_shares`` (Lagrange interpolation at 0, pycryptodome, pure Python, about k² work),
    while Shamir needs exactly ``threshold`` shares of the degree-(threshold - 1) polynomial:
    any ``threshold`` honest shares give the same secret, and a device with fewer is left as
    it was (Flower then halts the round, loudly here). At k = 31, threshold 19 this is most of
    the server's unmasking time (docs/scale.md). The order of ``replies`` decides which shares
    are kept. A share whose index (its first 4 bytes) was already kept for that device, or a
    second share of one device in one reply, is dropped as repeated: an honest neighbour
    returns one share of each device, and pycryptodome refuses a set with two shares at one
    index ("Duplicate share"), which failed the round. So is a share of a device that is not
    the sender's neighbour (``neighbours``, Flower's ``nid_to_neighbours``: each device's
    neighbourhood, itself included): no honest sender holds one, and an unknown device id made
    Flower's unmasking fail the round. A reply whose two lists differ in length is left for
    Flower, which refuses it."""
    kept: dict[int, set[bytes]] = {}  # device -> indices of the shares kept
    surplus = repeated = 0
    for msg, record, nids, shares in _share_replies(replies):
        keep, here = [], set()
        theirs = neighbours.get(msg.metadata.src_node_id, set())
        for nid, share in zip(nids, shares, strict=True):
            indices = kept.setdefault(int(nid), set())
            index = bytes(share[:4])
            if int(nid) not in theirs or index in indices or int(nid) in here:
                repeated += 1
                keep.append(False)
            elif len(indices) >= threshold:
                surplus += 1
                keep.append(False)
            else:
                indices.add(index)
                here.add(int(nid))
                keep.append(True)
        if not all(keep):
            record[Key.NODE_ID_LIST] = [n for n, k in zip(nids, keep, strict=True) if k]  # type: ignore[assignment]
            record[Key.SHARE_LIST] = [b for b, k in zip(shares, keep, strict=True) if k]  # type: ignore[assignment]
    return surplus, repeated


def collected_shares(replies: list[Message], sampled: Iterable[int]) -> dict[int, list[bytes]]:
    """The share list of each device, built from the unmask replies as Flower's unmask stage
    builds it (reply order, errors skipped), for :func:`fedpgen.server.unmasking.combine_all`."""
    collected: dict[int, list[bytes]] = {int(nid): [] for nid in sampled}
    for _, _, nids, shares in _share_replies(replies):
        for nid, share in zip(nids, shares, strict=True):
            collected.setdefault(int(nid), []).append(bytes(share))
    return collected


class _ThresholdShares:
    """``grid`` whose unmask-stage replies carry at most ``threshold`` shares per device
    (:func:`keep_threshold_shares`), and whose secrets are reconstructed in parallel as soon as
    they arrive (``secrets``, :func:`fedpgen.server.unmasking.combine_all`)."""

    def __init__(self, grid: Grid, state: WorkflowState) -> None:
        self._grid, self._state = grid, state
        self.secrets: dict[tuple[bytes, ...], bytes] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        surplus, hostile = keep_threshold_shares(replies, self._state.threshold, self._state.nid_to_neighbours)
        log.debug("SecAgg+ unmask: %d surplus shares left out of the reconstruction", surplus)
        if hostile:
            log.warning("SecAgg+ unmask: %d key shares dropped: repeated, or of a device that is not the "
                        "sender's neighbour", hostile)
        lists = [shares for shares in collected_shares(replies, self._state.sampled_node_ids).values()
                 if len(shares) >= self._state.threshold]
        self.secrets.update(unmasking.combine_all(lists))  # the dict reconstructed() reads
        if self.secrets:
            log.debug("SecAgg+ unmask: %d secrets reconstructed in %d processes", len(self.secrets),
                      unmasking.workers())
        return replies


@contextlib.contextmanager
def reconstructed(secrets: dict[tuple[bytes, ...], bytes]) -> Iterator[None]:
    """Within it, Flower's unmask stage takes the secret of a share list from ``secrets`` (filled
    in parallel by :class:`_ThresholdShares` once the replies are in; each used once) and
    combines any other list itself, as always."""
    flower_combine = _flower_workflow.combine_shares

    def combine(shares: list[bytes]) -> bytes:
        secret = secrets.pop(tuple(bytes(s) for s in shares), None)
        return secret if secret is not None else flower_combine(shares)

    _flower_workflow.combine_shares = combine  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _flower_workflow.combine_shares = flower_combine  # type: ignore[attr-defined]


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow with one upstream fix: dropouts before key sharing completes.

    In Flower 1.42 a device that answered the setup stage but not the share-keys stage stays
    in the sampled set; at the unmask stage every survivor is then asked for key shares of
    that device that it never received, raises, and the whole round halts. Such a device
    holds no mask in anyone's vector: it is removed from the sampled set and from every
    neighbourhood once key sharing is over.

    Under distributed user-level DP, a round whose masked sum holds fewer devices than their
    noise shares were sized for is refused before the unmask stage asks for any key share.

    And at the unmask stage each device's secret is reconstructed from ``threshold`` distinct
    shares, not from all it collected; repeated shares, and shares of devices that are not the
    sender's neighbours, are dropped (:func:`keep_threshold_shares`).
    """

    def __init__(self, strategy: SharedDeltaStrategy, *, max_shares: int, **kwargs: float | int) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.strategy, self.max_shares = strategy, max_shares

    def setup_stage(self, grid: Grid, context: Context, state: WorkflowState) -> bool:  # type: ignore[override]
        # Flower derives the shares from ``self.num_shares`` right after the strategy has sampled
        # the cohort, in this same call: the sampling sets the capped value for this round only.
        strategy = context.strategy  # type: ignore[attr-defined]
        configured, num_shares = strategy.configure_fit, self.num_shares

        def configure_fit(*args: Any, **kwargs: Any) -> Any:
            chosen = configured(*args, **kwargs)
            self.num_shares = capped_shares(num_shares, len(chosen), self.max_shares)
            if self.num_shares != num_shares:
                log.info("SecAgg+: %d shares per device for %d devices (secagg-max-shares; the fraction %g would "
                         "give %d)", self.num_shares, len(chosen), num_shares, flower_shares(num_shares, len(chosen)))
            return chosen

        strategy.configure_fit = configure_fit
        try:
            ok = super().setup_stage(grid, context, state)  # type: ignore[arg-type]
        finally:
            del strategy.configure_fit  # the class's method again
            self.num_shares = num_shares
        refused = refusals_in(state.failures)  # devices refuse here, by node id (budget spent, no usable data)
        if refused:
            self.strategy.mark_refused(refused, self.strategy.last_configured_round)
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: Context,  # type: ignore[override]
                                     state: WorkflowState) -> bool:
        strategy = self.strategy

        def check(content: RecordDict) -> None:
            check_masked_reply(content, shapes=strategy.shapes, modulus=self.modulus_range,
                               max_weight=float(self.max_weight), digest=strategy.digest)

        checked = _CheckedReplies(grid, check, strategy.reject_before_sum)
        return super().collect_masked_vectors_stage(checked, context, state)  # type: ignore[arg-type]

    def unmask_stage(self, grid: Grid, context: Context, state: WorkflowState) -> bool:  # type: ignore[override]
        if self.strategy.refuse_if_noise_short(len(state.active_node_ids)):
            return False  # distributed DP: too few noise shares in the masked sum; it is never unmasked
        wrapped = _ThresholdShares(grid, state)
        with reconstructed(wrapped.secrets):
            return super().unmask_stage(wrapped, context, state)  # type: ignore[arg-type]

    def share_keys_stage(self, grid: Grid, context: Context, state: WorkflowState) -> bool:  # type: ignore[override]
        ok = super().share_keys_stage(grid, context, state)  # type: ignore[arg-type]
        state.sampled_node_ids = set(state.active_node_ids)
        for neighbours in state.nid_to_neighbours.values():
            neighbours &= state.active_node_ids
        self._size_noise_shares(state)
        return ok

    def _size_noise_shares(self, state: WorkflowState) -> None:
        """Nobody has trained yet: tell the devices that will (those left after setup and key
        sharing) how many they are, so that distributed noise shares are sized for them. A device
        that refused at setup (its participation cap or budget reached, after a server restart
        that forgot whom it sampled) would otherwise leave the others' shares sized for one more,
        and the round would be refused for too little noise."""
        training = len(state.active_node_ids)
        for nid in state.active_node_ids:
            state.nid_to_fitins[nid].config_records[f"{FITINS}.config"]["sampled-clients"] = training
        self.strategy.shares_sized_for(training)


class LoudSecAggPlus:
    """SecAgg+ as the fit workflow, raising when a configured round aggregated nothing."""

    def __init__(self, cfg: RunConfig, strategy: SharedDeltaStrategy) -> None:
        self.inner = _SecAggPlus(strategy, max_shares=cfg.secagg_max_shares, **secagg_parameters(cfg))
        self.strategy = strategy

    def __call__(self, grid: Grid, context: Context) -> None:
        configured, aggregated = self.strategy.configured_rounds, self.strategy.aggregated_rounds
        refused = len(self.strategy.refused_rounds)  # out-of-bounds rounds are refused, not halted
        self.inner(grid, context)
        if self.strategy.stopped:
            return
        halted = (self.strategy.configured_rounds > configured and self.strategy.aggregated_rounds == aggregated
                  and len(self.strategy.refused_rounds) == refused)
        r = self.strategy.last_configured_round
        if halted and self.strategy.refused_round == r:  # devices refused (budget spent), too few left
            self.strategy.stop(r, "devices refused (privacy budget spent) and too few were left for secure "
                                  "aggregation; training stopped")
            return
        if halted:
            raise RoundFailedError(
                f"round {self.strategy.last_configured_round}: secure aggregation halted — too few devices "
                "answered for the reconstruction threshold (dropouts, or too few sampled); the shared base "
                "was NOT updated")
