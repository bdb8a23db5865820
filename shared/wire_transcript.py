"""A transcript of every message that crosses the wire, recorded on both sides (``wire-transcript``).

Each side appends to a transcript of two files with the same stem:

- ``<stem>.jsonl``: one JSON object per message (:class:`WireEntry`): side, direction
  (``downlink`` server -> device, ``uplink`` device -> server), message type, round, SecAgg+
  stage, node ids, and every record of the content with each key's type, and dtype, shape
  and byte count of arrays and byte strings; values are not copied into it;
- ``<stem>.bin``: the content exactly as serialized for the wire (Flower's protobuf
  ``RecordDict``), one message after the other; a line's ``offset`` and ``nbytes`` locate
  its bytes, ``sha256`` checks them.

Where: the server writes ``<run-dir>/audit/transcript/server.*``; a simulated device writes
``<run-dir>/audit/transcript/device-<node id>.*``; a deployed device, which has no run
folder, writes ``<state-dir>/transcript/device-<node id>.*``. One file per node id, and
each append holds an ``flock`` on the ``.bin`` file, so Ray's worker processes never
interleave. The device's mod sits outside every other mod (SecAgg+ included), so it
records what actually leaves: the masked vectors, never the plain delta.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import serde
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.server import Grid

from fedpgen.shared.config import RunConfig

log = logging.getLogger(__name__)

RUN_TRANSCRIPT_DIR = Path("audit") / "transcript"  # under a run folder: the server, simulated devices
DEVICE_TRANSCRIPT_DIR = "transcript"  # under a deployed device's state-dir
SERVER_STEM = "server"
DOWNLINK, UPLINK = "downlink", "uplink"


def device_stem(node_id: int) -> str:
    """The file stem of one device's transcript."""
    return f"device-{node_id}"


@dataclasses.dataclass(frozen=True)
class WireEntry:
    """One recorded message; ``blob`` is its content as serialized for the wire."""

    transcript: str  # the stem of the transcript it was read from
    index: int  # its line in that transcript
    side: str  # "server" | "device": who recorded it
    direction: str  # DOWNLINK | UPLINK
    message_type: str
    round: int | None
    stage: str | None  # the SecAgg+ stage, None outside the protocol
    src: int
    dst: int
    message_id: str
    reply_to: str
    nbytes: int
    records: list[dict[str, Any]]
    error: dict[str, Any] | None
    blob: bytes

    def scanned_bytes(self) -> bytes:
        """What crossed the wire for this message: the content, and an error's text."""
        reason = (self.error or {}).get("reason") or ""
        return self.blob + reason.encode("utf-8", errors="replace")


def _npy_header(data: bytes) -> dict[str, Any] | None:
    """dtype and shape of a NumPy ``.npy`` buffer (Flower's serialized arrays), or None."""
    if not data.startswith(b"\x93NUMPY"):
        return None
    try:
        fh = io.BytesIO(data)
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    except (ValueError, OSError, SyntaxError):
        return None
    return {"dtype": str(dtype), "shape": list(shape)}


def _describe_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"type": "bytes", "nbytes": len(value), **(_npy_header(value) or {})}
    if isinstance(value, str):
        return {"type": "str", "nbytes": len(value.encode("utf-8", errors="replace"))}
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value}) or ["empty"]
        out: dict[str, Any] = {"type": f"list[{'|'.join(kinds)}]", "items": len(value)}
        if any(isinstance(v, (bytes, str)) for v in value):
            out["nbytes"] = sum(_describe_value(v).get("nbytes", 0) for v in value)
        arrays = [_npy_header(v) for v in value if isinstance(v, bytes)]
        if arrays and all(arrays):
            out["arrays"] = arrays
        return out
    return {"type": type(value).__name__}


def describe_records(content: RecordDict) -> list[dict[str, Any]]:
    """Every record of ``content``: its name, kind and each key with its type and sizes.

    Parameters
    ----------
    content
        A message's content.

    Returns
    -------
    list of dict
        ``{"name", "kind": "array"|"config"|"metric", "keys": [{"key", "type", ...}]}``;
        arrays and byte strings carry ``dtype``, ``shape`` (read from the ``.npy`` header
        where Flower's legacy arrays leave them empty) and ``nbytes``.
    """
    described = []
    for name, record in content.items():
        keys = []
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                header = _npy_header(array.data) if not array.dtype else None
                keys.append({"key": key, "type": "array", "stype": array.stype,
                             "dtype": header["dtype"] if header else array.dtype,
                             "shape": header["shape"] if header else list(array.shape), "nbytes": len(array.data)})
        else:
            keys = [{"key": key, **_describe_value(value)} for key, value in record.items()]
        kind = "array" if isinstance(record, ArrayRecord) else "config" if isinstance(record, ConfigRecord) else "metric"
        described.append({"name": name, "kind": kind, "keys": keys})
    return described


def _round_of(msg: Message) -> int | None:
    group = msg.metadata.group_id
    return int(group) if group.isdigit() else None


def stage_of(msg: Message) -> str | None:
    """The SecAgg+ stage a downlink message asks for (None outside the protocol)."""
    if not msg.has_content():
        return None
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    return str(stage) if stage is not None else None


class TranscriptWriter:
    """Appends messages to ``<folder>/<stem>.jsonl`` and ``<folder>/<stem>.bin``."""

    def __init__(self, folder: Path, stem: str, *, side: str) -> None:
        self.folder, self.stem, self.side = Path(folder), stem, side

    def record(self, msg: Message, *, direction: str, stage: str | None = None,
               blob: bytes | None = None, raised: BaseException | None = None) -> None:
        """Append ``msg`` (or, with ``raised``, the error reply Flower builds from that exception).

        ``blob``: the content serialized earlier (before anything could change it)."""
        content = msg.has_content() and raised is None
        if blob is None:
            blob = serde.recorddict_to_proto(msg.content).SerializeToString() if content else b""
            records = describe_records(msg.content) if content else []
        else:  # described from the bytes, which were taken before the message was sent
            records = describe_records(serde.recorddict_from_proto(ProtoRecordDict.FromString(blob))) if blob else []
        error = None
        if raised is not None:  # Flower's own format for the reason (flwr/supernode/runtime/run_clientapp.py)
            error = {"code": None, "reason": f"{type(raised)}:<'{raised}'>", "raised-here": True}
        elif msg.has_error():
            error = {"code": int(msg.error.code), "reason": msg.error.reason or ""}
        meta = msg.metadata
        ids = {"src": meta.src_node_id, "dst": meta.dst_node_id, "message_id": meta.message_id,
               "reply_to": meta.reply_to_message_id}
        if raised is not None:  # ``msg`` is the request: the reply goes back to its sender
            ids = {"src": meta.dst_node_id, "dst": meta.src_node_id, "message_id": "", "reply_to": meta.message_id}
        entry = {"side": self.side, "direction": direction, "message_type": meta.message_type,
                 "round": _round_of(msg), "stage": stage, "run_id": meta.run_id, **ids,
                 "time": time.time(), "nbytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                 "records": records, "error": error}
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"{self.stem}.bin").open("ab") as bin_file:
            fcntl.flock(bin_file, fcntl.LOCK_EX)  # one appender at a time, whichever process
            try:
                entry["offset"] = bin_file.seek(0, io.SEEK_END)
                bin_file.write(blob)
                bin_file.flush()
                with (self.folder / f"{self.stem}.jsonl").open("a", encoding="utf-8") as lines:
                    lines.write(json.dumps(entry, sort_keys=True) + "\n")
            finally:
                fcntl.flock(bin_file, fcntl.LOCK_UN)


# -- the device side: a ClientApp mod ---------------------------------------------------------
def device_transcript_dir(node_config: Mapping[str, Any], cfg: RunConfig) -> Path:
    """A deployed device (``state-dir`` in its node config) records into its state-dir, a
    simulated one into the run folder."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser() / DEVICE_TRANSCRIPT_DIR
    return Path(cfg.run_dir) / RUN_TRANSCRIPT_DIR


def transcript_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """A ClientApp mod recording the message a device receives and the reply it sends.

    Put it outside every other mod: it serializes the incoming message before SecAgg+ pops
    its stage key, and the reply after SecAgg+ masked it. Off unless ``wire-transcript``."""

    def record_wire(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        cfg = RunConfig.merged(dict(ctxt.run_config), overrides)
        if not cfg.wire_transcript:
            return call_next(msg, ctxt)
        writer = TranscriptWriter(device_transcript_dir(ctxt.node_config, cfg),
                                  device_stem(msg.metadata.dst_node_id), side="device")
        stage = stage_of(msg)
        writer.record(msg, direction=DOWNLINK, stage=stage)
        try:
            reply = call_next(msg, ctxt)
        except Exception as exc:  # Flower turns it into an error reply: that reply crosses the wire
            writer.record(msg, direction=UPLINK, stage=stage, raised=exc)
            raise
        writer.record(reply, direction=UPLINK, stage=stage)
        return reply

    return record_wire


# -- the server side: a Grid that records ------------------------------------------------------
class RecordingGrid:
    """``grid`` recording every message the ServerApp sends and every reply it receives."""

    def __init__(self, grid: Grid, writer: TranscriptWriter) -> None:
        self._grid, self._writer = grid, writer
        self._stages: dict[int, str | None] = {}  # node id -> the SecAgg+ stage last asked of it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _sent(self, messages: Iterable[Message]) -> tuple[list[Message], list[bytes]]:
        out = list(messages)
        return out, [serde.recorddict_to_proto(m.content).SerializeToString() if m.has_content() else b""
                     for m in out]

    def _record_sent(self, messages: list[Message], blobs: list[bytes]) -> None:
        for msg, blob in zip(messages, blobs, strict=True):  # after the push: message ids are set
            self._stages[msg.metadata.dst_node_id] = stage_of(msg)
            self._writer.record(msg, direction=DOWNLINK, stage=self._stages[msg.metadata.dst_node_id], blob=blob)

    def _record_received(self, replies: Iterable[Message]) -> list[Message]:
        out = list(replies)
        for msg in out:  # before the workflow consumes the arrays
            self._writer.record(msg, direction=UPLINK, stage=self._stages.get(msg.metadata.src_node_id))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        sent, blobs = self._sent(messages)
        try:
            replies = self._grid.send_and_receive(sent, timeout=timeout)
        finally:
            self._record_sent(sent, blobs)
        return self._record_received(replies)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        sent, blobs = self._sent(messages)
        try:
            return self._grid.push_messages(sent)
        finally:
            self._record_sent(sent, blobs)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._record_received(self._grid.pull_messages(message_ids))


def recording_grid(grid: Grid, cfg: RunConfig) -> Grid:
    """``grid`` itself, or with ``wire-transcript`` a :class:`RecordingGrid` writing
    ``<run-dir>/audit/transcript/server.*``."""
    if not cfg.wire_transcript:
        return grid
    log.info("recording every message on the wire into %s", Path(cfg.run_dir) / RUN_TRANSCRIPT_DIR)
    writer = TranscriptWriter(Path(cfg.run_dir) / RUN_TRANSCRIPT_DIR, SERVER_STEM, side="server")
    return RecordingGrid(grid, writer)  # type: ignore[return-value]


# -- reading -------------------------------------------------------------------------------------
def find_transcripts(folder: Path) -> list[Path]:
    """The ``*.jsonl`` transcripts directly in ``folder`` (server first), [] when there is none."""
    folder = Path(folder)
    found = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    return sorted(found, key=lambda p: (p.stem != SERVER_STEM, p.name))


def read_transcript(path: Path) -> Iterator[WireEntry | str]:
    """Each entry of the transcript ``path`` (a ``.jsonl``), with its bytes from the ``.bin``.

    Yields a :class:`WireEntry` per readable line and, instead, a sentence for each line
    that cannot be used (malformed, bytes missing or not matching their ``sha256``).
    Raises ``FileNotFoundError`` naming the file when the transcript or its bytes are missing.
    """
    path = Path(path)
    bin_path = path.with_suffix(".bin")
    for needed in (path, bin_path):
        if not needed.is_file():
            raise FileNotFoundError(f"no transcript at {needed}")
    data = bin_path.read_bytes()
    with path.open(encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            try:
                raw = json.loads(line)
                offset, nbytes = int(raw["offset"]), int(raw["nbytes"])
                blob = data[offset : offset + nbytes]
                if len(blob) != nbytes or hashlib.sha256(blob).hexdigest() != raw["sha256"]:
                    yield f"{path.name} line {index + 1}: its bytes are missing or do not match their sha256"
                    continue
                yield WireEntry(transcript=path.stem, index=index, side=raw["side"], direction=raw["direction"],
                                message_type=raw["message_type"], round=raw["round"], stage=raw["stage"],
                                src=int(raw["src"]), dst=int(raw["dst"]), message_id=raw["message_id"],
                                reply_to=raw["reply_to"], nbytes=nbytes, records=raw["records"],
                                error=raw["error"], blob=blob)
            except (ValueError, KeyError, TypeError) as exc:
                yield f"{path.name} line {index + 1}: not a transcript entry ({type(exc).__name__}: {exc})"
