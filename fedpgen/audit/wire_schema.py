"""What may be in a message on the wire: ``shared/wire.py``'s schema in Flower's record layout.

Pure checks of one message's content, no I/O: :func:`findings` says, per schema check, what
in a message does not fit. The allowlists are Flower's legacy FitIns / FitRes / EvaluateIns
/ EvaluateRes records (the plain and the SecAgg+ path both use them) and the SecAgg+
protocol's keys, stage by stage (``flwr.common.secure_aggregation.secaggplus_constants``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import EMPTY_TENSOR_KEY

from fedpgen.shared.wire_transcript import DOWNLINK, UPLINK, describe_records
from fedpgen.shared.wire import DOWNLINK_CONFIG, FIT_SCHEMA, REFUSALS, Field

CHECKS = ("records", "downlink-config", "uplink-metrics", "status", "arrays")
MESSAGE_TYPES = frozenset({"train", "evaluate"})
RECORDS = {  # record name -> kind, by direction
    DOWNLINK: {"fitins.parameters": "array", "fitins.config": "config", "evaluateins.parameters": "array",
               "evaluateins.config": "config", RECORD_KEY_CONFIGS: "config"},
    UPLINK: {"fitres.parameters": "array", "fitres.metrics": "config", "fitres.num_examples": "metric",
             "fitres.status": "config", "evaluateres.loss": "metric", "evaluateres.num_examples": "metric",
             "evaluateres.metrics": "config", "evaluateres.status": "config", RECORD_KEY_CONFIGS: "config"},
}
SECAGG_KEYS = {  # SecAgg+ protocol keys by direction and stage (share keys down: one key per neighbour's node id)
    (DOWNLINK, Stage.SETUP): {Key.STAGE, Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD, Key.CLIPPING_RANGE,
                              Key.TARGET_RANGE, Key.MOD_RANGE, Key.MAX_WEIGHT},
    (DOWNLINK, Stage.SHARE_KEYS): {Key.STAGE},
    (DOWNLINK, Stage.COLLECT_MASKED_VECTORS): {Key.STAGE, Key.CIPHERTEXT_LIST, Key.SOURCE_LIST},
    (DOWNLINK, Stage.UNMASK): {Key.STAGE, Key.ACTIVE_NODE_ID_LIST, Key.DEAD_NODE_ID_LIST},
    (UPLINK, Stage.SETUP): {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},
    (UPLINK, Stage.SHARE_KEYS): {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    (UPLINK, Stage.COLLECT_MASKED_VECTORS): {Key.MASKED_PARAMETERS},
    (UPLINK, Stage.UNMASK): {Key.NODE_ID_LIST, Key.SHARE_LIST},
}
FLOWER_COUNTS = {"fitres.num_examples": {"num_examples"}, "evaluateres.num_examples": {"num_examples"},
                 "evaluateres.loss": {"loss"}}


def findings(content: RecordDict, *, direction: str, message_type: str, stage: str | None,
             shapes: list[list[int]] | None, eval_fields: Mapping[str, Field]) -> dict[str, list[str]]:
    """What in one message does not fit the wire schema, by check (:data:`CHECKS`).

    Parameters
    ----------
    content
        The message's content, as deserialized from the bytes that crossed the wire.
    direction, message_type, stage
        Where it went, its Flower message type and its SecAgg+ stage (None outside the protocol).
    shapes
        The ``send`` arrays' shapes in order; None: shapes are not checked (counts and keys are).
    eval_fields
        The task's evaluation schema (``shared.wire.eval_schema``).

    Returns
    -------
    dict
        Check name -> sentences saying what does not fit (never the values themselves).
    """
    found: dict[str, list[str]] = {k: [] for k in CHECKS}
    allowed = RECORDS.get(direction, {})
    if message_type not in MESSAGE_TYPES or not allowed:
        found["records"].append(f"{direction[:20]} message type {message_type[:60]!r} outside the wire schema")
    described = {d["name"]: d for d in describe_records(content)}
    for name, record in content.items():
        kind = described[name]["kind"]
        if allowed.get(name) != kind:
            found["records"].append(f"{kind} record {name[:60]!r} outside the wire schema")
        elif name == RECORD_KEY_CONFIGS:
            found["records"] += _secagg(record, direction, stage)
        elif name.endswith("ins.config"):
            found["downlink-config"] += [f"config key {key[:60]!r} ({type(value).__name__}) outside DOWNLINK_CONFIG"
                                         for key, value in record.items()
                                         if key not in DOWNLINK_CONFIG or not isinstance(value, (int, bool))]
        elif name.endswith("res.metrics"):
            found["uplink-metrics"] += _metrics(record, FIT_SCHEMA if name.startswith("fitres") else eval_fields)
        elif name in FLOWER_COUNTS and set(record) != FLOWER_COUNTS[name]:
            found["uplink-metrics"].append(f"{name} holds {sorted(k[:60] for k in record)[:5]}")
        elif name.endswith("res.status"):
            message = record.get("message")
            if set(record) != {"code", "message"} or not isinstance(message, str) or not (
                    message == "ok" or message.startswith(REFUSALS)):
                found["status"].append(f"{name} is not 'ok' or a documented refusal")
    found["arrays"] += _arrays(content, described, direction=direction, shapes=shapes)
    return found


def _secagg(record: Any, direction: str, stage: str | None) -> list[str]:
    keys = SECAGG_KEYS.get((direction, stage or ""))
    if keys is None:
        return [f"SecAgg+ record at an unknown stage {str(stage)[:60]!r}"]
    node_ids = direction == DOWNLINK and stage == Stage.SHARE_KEYS
    return [f"SecAgg+ key {key[:60]!r} outside the protocol" for key in record
            if key not in keys and not (node_ids and key.isdigit())]


def _metrics(record: Any, schema: Mapping[str, Field]) -> list[str]:
    out = []
    for key, value in record.items():
        if key not in schema:
            out.append(f"metric key {key[:60]!r} outside the schema")
            continue
        try:
            schema[key].check(key, value)
        except ValueError as exc:
            out.append(str(exc)[:200])
    return out


def _arrays(content: RecordDict, described: Mapping[str, dict[str, Any]], *, direction: str,
            shapes: list[list[int]] | None) -> list[str]:
    out = []
    masked = content.config_records.get(RECORD_KEY_CONFIGS, ConfigRecord()).get(Key.MASKED_PARAMETERS)
    for name, record in content.items():
        if not isinstance(record, ArrayRecord):
            continue
        keys = described[name]["keys"]
        bad = [k["key"][:60] for k in keys if not (k["key"].isdigit() or k["key"] == EMPTY_TENSOR_KEY)]
        if bad:
            out.append(f"{name}: array keys {bad[:3]} are not Flower's indices")
        plain = [k for k in keys if k["key"] != EMPTY_TENSOR_KEY]
        if direction == UPLINK and not plain and all(k["nbytes"] == 0 for k in keys):
            continue  # SecAgg+ empties the plain delta; a refusal sends none
        if direction == UPLINK and masked is not None:
            out.append(f"{name}: a plain delta next to the masked vector")
        elif shapes is not None and ([k["shape"] for k in plain] != shapes
                                     or any(k["dtype"] != "float32" for k in plain)):
            out.append(f"{name}: {len(plain)} arrays, not one float32 array per send name ({len(shapes)}) "
                       "with its shape")
    if masked is not None and shapes is not None:
        headers = [k.get("arrays") for k in described[RECORD_KEY_CONFIGS]["keys"] if k["key"] == Key.MASKED_PARAMETERS]
        arrays = headers[0] if headers and headers[0] else []
        if [a["shape"] for a in arrays] != [[1], *shapes] or any(not a["dtype"].startswith(("int", "uint"))
                                                                for a in arrays):
            out.append(f"masked vector of {len(arrays)} arrays, not a weight level plus one integer array per "
                       f"send name ({len(shapes)})")
    return out


def vocabulary(eval_fields: Mapping[str, Field]) -> bytes:
    """Every name and fixed string the schema itself puts on the wire (record names, keys,
    stages, string choices, status texts): a user's pattern inside them proves nothing."""
    words = {*RECORDS[DOWNLINK], *RECORDS[UPLINK], *DOWNLINK_CONFIG, *FIT_SCHEMA, *eval_fields, *REFUSALS, "ok",
             *Stage.all(), *(k for keys in SECAGG_KEYS.values() for k in keys),
             *(k for keys in FLOWER_COUNTS.values() for k in keys), "code", "message",
             *(c for f in (*FIT_SCHEMA.values(), *eval_fields.values()) for c in f.choices)}
    return "\n".join(sorted(words)).encode()
