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

# Bad inputs a device skipped, counted by reason (a data-quality report: counts only).
SKIP_REASONS = (
    "unreadable-file",     # binary, not UTF-8, wrong extension
    "malformed-profile",   # profile.json that is not a JSON object
    "malformed-line",      # behavior.jsonl: not JSON, no item, no numeric ts
    "unknown-item",        # behavior.jsonl: an item id the catalog does not know
    "out-of-order",        # behavior.jsonl: a timestamp earlier than an event before it
    "empty-log",           # behavior.jsonl: missing or without a usable event
    "not-an-image",        # photos: not a .png/.jpg file
    "tiny-image",          # photos: smaller than 16 pixels a side
    "huge-image",          # photos: larger than 4096 pixels a side or 20 MiB (decompression bombs)
    "extra-subject",       # photos: a subject folder beyond the model's subject slots (its photos unused)
)

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
    "train-seconds",       # wall time of the device's local training (benchmarks: share of round time)
    # the round's privacy-ledger event (record-level DP), see shared/privacy/ledger.py
    "dp-epsilon", "dp-delta", "dp-sigma", "dp-clip", "dp-sample-rate", "dp-steps", "dp-accountant",
}) | frozenset(f"skipped-{reason}" for reason in SKIP_REASONS)

# Status message prefixes of a device that refuses to train: its ε budget is spent, its
# folder holds too little usable data, or its sealed state was modified on disk. The server
# stops sampling it and reports why.
BUDGET_EXHAUSTED = "budget-exhausted"
NO_USABLE_DATA = "no-usable-data"
STATE_TAMPERED = "state-tampered"  # a sealed state file failed authentication: never trained on
REFUSALS = (BUDGET_EXHAUSTED, NO_USABLE_DATA, STATE_TAMPERED)

VARIANTS = ("base", "shared", "personal", "local")


def eval_metrics(metric_names: tuple[str, ...]) -> frozenset[str]:
    """Plaintext metadata of the final evaluation reply: the task's held-out metrics per variant."""
    return (frozenset({"client-index", "num-heldout"}) | {f"skipped-{r}" for r in SKIP_REASONS}
            | {f"{variant}-{metric}" for variant in VARIANTS for metric in metric_names})


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
