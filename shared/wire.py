"""The wire schema: every field that crosses between a device and the server.

Downlink (server -> device): the shared base, one array per name of the preset's
``send`` set, in that order, plus ``FitIns.config`` with the keys below.
Uplink (device -> server): the shared *delta* for the same names, in the same order, the
number of training records, and plaintext metrics restricted to the keys below. Nothing
else leaves the device: no personal tensor, no record, no text. The server rejects any
update whose arrays (count, shape, dtype, finiteness) or metrics (key, type, range) do not
match, before anything is written: a bad reply is a rejected reply, never a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping

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
    "empty-file",          # any user file with no bytes (a document: or only whitespace)
    "too-large",           # a document, profile.json or behavior.jsonl over its size cap (never read whole)
    "user-cap",            # a file past the user's total byte cap (all their files together)
    "symlink",             # a symlink inside the user folder (file or subfolder): never followed
    "truncated-profile",   # text: the profile line cut to a quarter of the record
)

# The keys of a FitIns / EvaluateIns config; the wire audit (fedpgen/audit/wire_schema.py)
# checks every recorded downlink config against them.
DOWNLINK_CONFIG = frozenset({"server-round", "final", "sampled-clients"})


@dataclasses.dataclass(frozen=True)
class Field:
    """The type and range of one plaintext metric: a reply whose value does not fit is rejected."""

    kind: type                       # int, float or str (bool is never accepted as an int)
    lo: float = -math.inf
    hi: float = math.inf
    nan: bool = False                # float: NaN allowed (e.g. a loss with no records to score)
    choices: tuple[str, ...] = ()    # str: the only values allowed (strings are never free text)
    length: int = 0                  # str: exact length, when not a choice (e.g. a digest)

    def check(self, key: str, value: object) -> None:
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"metric {key!r}: expected an int, got {type(value).__name__}")
        elif self.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"metric {key!r}: expected a number, got {type(value).__name__}")
            if math.isnan(value):
                if not self.nan:
                    raise ValueError(f"metric {key!r}: NaN")
                return
        else:
            if not isinstance(value, str):
                raise ValueError(f"metric {key!r}: expected a string, got {type(value).__name__}")
            if self.choices and value not in self.choices:
                raise ValueError(f"metric {key!r}: {value[:40]!r} is not one of {self.choices}")
            if self.length and (len(value) != self.length or not all(c in "0123456789abcdef" for c in value)):
                raise ValueError(f"metric {key!r}: not a {self.length}-digit hex digest")
            return
        if not self.lo <= value <= self.hi:
            raise ValueError(f"metric {key!r}: {value!r} outside [{self.lo}, {self.hi}]")


COUNT = Field(int, 0, 2**31)
LOSS = Field(float, 0.0, 1e6, nan=True)

# Plaintext metadata of a training reply: aggregate statistics of the device's round, typed.
FIT_SCHEMA: dict[str, Field] = {
    "client-index": Field(int, -1, 2**31),  # simulation partition id (-1 in deployment); the node id is known anyway
    "keys-digest": Field(str, length=16),   # hash of the allowlisted names, so both sides agree on the layout
    # data-dependent scalars, sent only by runs without DP (NOT PRIVATE anyway):
    "train-loss": LOSS,                     # mean shared-adapter training loss this round
    "val-loss-before": LOSS,                # loss of the received shared base on the device's validation records
    "val-loss-after": LOSS,                 # loss after this round's shared + personal training
    "personal-best-step": Field(int, -1, 2**31),  # early-stopping step kept for the personal part
    "train-seconds": Field(float, 0.0, 1e7),  # wall time of the device's local training (benchmarks)
    # the round's privacy-ledger event (record-level DP), see shared/privacy/ledger.py
    "dp-epsilon": Field(float, 0.0, math.inf),  # inf: the event was not private
    "dp-delta": Field(float, 0.0, 1.0),
    "dp-sigma": Field(float, 0.0, 1e6),
    "dp-clip": Field(float, 0.0, 1e6),
    "dp-sample-rate": Field(float, 0.0, 1.0),
    "dp-steps": COUNT,
    "dp-accountant": Field(str, choices=("prv", "rdp", "none")),
    "dp-attempt": Field(int, 1, 2**31),      # 2+: the device already spent this round once (a retry after a crash)
    **{f"skipped-{reason}": COUNT for reason in SKIP_REASONS},
}
FIT_METRICS = frozenset(FIT_SCHEMA)

# A device that refuses to train says why in a status text (or, inside SecAgg+, in the text
# of the error that fails its message): its ε budget is spent, its folder holds too little
# usable data, or its sealed state was modified on disk. The server stops sampling it and
# reports why. Encoded and decoded here only.
BUDGET_EXHAUSTED = "budget-exhausted"
NO_USABLE_DATA = "no-usable-data"
STATE_TAMPERED = "state-tampered"  # a sealed state file failed authentication: never trained on
REFUSALS = (BUDGET_EXHAUSTED, NO_USABLE_DATA, STATE_TAMPERED)
REFUSAL_MEANING = {BUDGET_EXHAUSTED: "privacy budget spent", NO_USABLE_DATA: "no usable data",
                   STATE_TAMPERED: "on-device state failed authentication"}
_REFUSAL = re.compile(rf"({'|'.join(re.escape(r) for r in REFUSALS)})(?: node=(\d+))?: ")


def encode_refusal(reason: str, *, node: int | None = None, detail: str = "details in the device's log") -> str:
    """The refusal text: the reason code, the node id when known, and a detail free of personal data
    (a budget refusal states ε figures; other details stay in the device's log)."""
    if reason not in REFUSALS:
        raise ValueError(f"unknown refusal {reason!r}; valid: {', '.join(REFUSALS)}")
    return f"{reason}{f' node={node}' if node is not None else ''}: {detail}"


def decode_refusal(text: str, *, anywhere: bool = False) -> tuple[str, int | None] | None:
    """``(reason, node id or None)`` of a refusal text, else None. ``anywhere``: the refusal may sit
    inside a longer text (Flower wraps a failed message's error in its own words)."""
    match = _REFUSAL.search(text) if anywhere else _REFUSAL.match(text)
    if match is None:
        return None
    return match.group(1), int(match.group(2)) if match.group(2) else None

VARIANTS = ("base", "shared", "personal", "local")


def eval_schema(metric_names: tuple[str, ...]) -> dict[str, Field]:
    """Plaintext metadata of the final evaluation reply: the task's held-out metrics per variant."""
    return {"client-index": FIT_SCHEMA["client-index"], "num-heldout": COUNT,
            **{f"skipped-{r}": COUNT for r in SKIP_REASONS},
            **{f"{variant}-{metric}": Field(float, -1e12, 1e12, nan=True)
               for variant in VARIANTS for metric in metric_names}}


def eval_metrics(metric_names: tuple[str, ...]) -> frozenset[str]:
    """The keys of ``eval_schema``."""
    return frozenset(eval_schema(metric_names))


def check_metrics(metrics: Mapping[str, object], schema: Mapping[str, Field]) -> None:
    """Raise ``ValueError`` unless every metric is a key of ``schema`` with a value of its type and range."""
    extra = set(metrics) - set(schema)
    if extra:
        raise ValueError(f"malformed update: metrics outside the wire schema: {sorted(str(k)[:40] for k in extra)}")
    for key, value in metrics.items():
        schema[key].check(key, value)


def keys_digest(names: tuple[str, ...]) -> str:
    """A short digest of the allowlist (names and order)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def check_update(arrays: list[np.ndarray], shapes: list[tuple[int, ...]], metrics: Mapping[str, object], *,
                 schema: Mapping[str, Field], dtypes: list[np.dtype] | None = None) -> None:
    """Raise ``ValueError`` for an update that does not match the schema: array count, shape,
    dtype (exactly the shared base's: no int, complex, float16 or float64 stand-ins), finite
    values, and every metric's key, type and range."""
    if len(arrays) != len(shapes):
        raise ValueError(f"malformed update: {len(arrays)} arrays, schema has {len(shapes)}")
    for i, (arr, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"malformed update: array {i} has shape {tuple(arr.shape)}, schema {shape}")
        if dtypes is not None and arr.dtype != dtypes[i]:
            raise ValueError(f"malformed update: array {i} has dtype {arr.dtype}, schema {dtypes[i]}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"malformed update: array {i} has dtype {arr.dtype}, not a float")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"malformed update: array {i} has non-finite values")
    check_metrics(metrics, schema)
