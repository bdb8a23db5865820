"""The wire schema: every field that crosses between a device and the server.

Downlink (server -> device): the shared base, one array per name of the preset's
``send`` set, in that order, plus ``FitIns.config`` with the keys below.
Uplink (device -> server): the shared *delta* for the same names, in the same order, the
number of training records, and plaintext metrics restricted to the keys below. Nothing
else leaves the device: no personal tensor, no record, no text. The server rejects any
update whose arrays or metric keys do not match.
"""

from __future__ import annotations

import hashlib

import numpy as np

DOWNLINK_CONFIG = frozenset({"server-round", "final", "sampled-clients"})

# Plaintext metadata of a training reply: aggregate statistics of the device's round.
FIT_METRICS = frozenset({
    "client-index",        # simulation partition id (-1 in deployment); the server already knows the node id
    "keys-digest",         # hash of the allowlisted names, so both sides agree on the layout
    # data-dependent scalars, sent only by runs without DP (NOT PRIVATE anyway):
    "train-loss",          # mean shared-adapter training loss this round
    "val-loss-before",     # loss of the received shared base on the device's validation records
    "val-loss-after",      # loss after this round's shared + personal training
    "personal-best-step",  # early-stopping step kept for the personal part
    "skipped-files",       # unreadable input files skipped on the device
    "train-seconds",       # wall time of the device's local training (benchmarks: share of round time)
    # the round's privacy-ledger event (record-level DP), see shared/privacy/ledger.py
    "dp-epsilon", "dp-delta", "dp-sigma", "dp-clip", "dp-sample-rate", "dp-steps", "dp-accountant",
})

# Status message prefix of a device that refuses to train because its ε budget is spent.
BUDGET_EXHAUSTED = "budget-exhausted"

# Plaintext metadata of the final evaluation reply: held-out metrics of each model variant.
EVAL_METRICS = frozenset(
    {"client-index", "num-heldout", "skipped-files"}
    | {f"{variant}-{metric}" for variant in ("base", "shared", "personal", "local") for metric in ("ppl", "acc")}
)


def keys_digest(names: tuple[str, ...]) -> str:
    """A short digest of the allowlist (names and order)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def check_update(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], metrics: dict[str, object],
                 *, allowed: frozenset[str]) -> None:
    """Raise ``ValueError`` for an update that does not match the schema."""
    if len(arrays) != len(shapes):
        raise ValueError(f"malformed update: {len(arrays)} arrays, schema has {len(shapes)}")
    for i, (arr, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"malformed update: array {i} has shape {tuple(arr.shape)}, schema {shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"malformed update: array {i} has non-finite values")
    extra = set(metrics) - allowed
    if extra:
        raise ValueError(f"malformed update: metrics outside the wire schema: {sorted(extra)}")
