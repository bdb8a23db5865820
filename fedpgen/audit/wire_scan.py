"""Check a wire transcript against ``shared/wire.py`` and scan it for each user's raw context.

Checks (each ``pass``, ``fail`` or ``not-checked`` with the reason); the schema itself is
``fedpgen/audit/wire_schema.py``:

- ``transcript``: transcripts found and every entry's bytes intact (``sha256``);
- ``agreement``: where a device's transcript and the server's both hold a message, the
  bytes are the same (neither side can leave out or alter what the other recorded);
- ``schema:records``: only the message types and records of the FitIns / FitRes /
  EvaluateIns / EvaluateRes layout and of the SecAgg+ protocol, whose keys are checked per
  stage (``flwr.common.secure_aggregation.secaggplus_constants``);
- ``schema:downlink-config``: configs hold only ``DOWNLINK_CONFIG`` keys, with int or bool values;
- ``schema:uplink-metrics``: metrics hold only ``FIT_SCHEMA`` / ``eval_schema(task)`` keys,
  with values of their type and range (``shared.wire.Field``), plus Flower's own counts;
- ``schema:status``: status texts are ``ok`` or a documented refusal (``shared.wire.REFUSALS``);
- ``schema:arrays``: array keys are Flower's indices, one float32 array per ``send`` name
  with its shape (down; up without SecAgg+), no plain delta next to a masked one, a masked
  vector of one weight level plus one integer array per ``send`` name;
- ``personal-names``: no personal parameter name (the preset's ``keep`` set) anywhere;
- ``raw-context:<user>``: none of the user's needles (``fedpgen/audit/raw_context.py``) in
  any message's bytes (an error reply's text included);
- ``personal-part:<user>``: no window of the device's personal part in any message.

``scan_run`` audits a run folder; ``scan_transcripts`` any set of transcripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedpgen.audit import wire_schema
from fedpgen.audit.raw_context import Needle, NeedleIndex, Sources, personal_needles, user_needles
from fedpgen.shared.wire_transcript import (DEVICE_TRANSCRIPT_DIR, DOWNLINK, RUN_TRANSCRIPT_DIR, WireEntry,
                                      find_transcripts, read_transcript)
from fedpgen.shared.adapters import ParamSets
from fedpgen.shared.config import RunConfig
from fedpgen.shared.tasks import TASKS
from fedpgen.shared.wire import eval_schema

log = logging.getLogger(__name__)

PASSED, FAILED, NOT_CHECKED = "pass", "fail", "not-checked"  # the vocabulary of every audit check
MAX_HITS = 50  # hits kept per check; ``hit_count`` has them all
OWN_WORDS = "part of the wire schema's own words"  # a needle that every message may carry


@dataclasses.dataclass(frozen=True)
class Hit:
    """Where a check found something: a message of a transcript, what matched, whose it is."""

    transcript: str
    message: int  # the entry's line in its transcript
    direction: str
    message_type: str
    round: int | None
    stage: str | None
    what: str  # e.g. "document 3, bytes 120-144" or "metric key 'note' outside the schema"; never the content
    user: str | None = None

    @classmethod
    def at(cls, entry: WireEntry, what: str, user: str | None = None) -> Hit:
        return cls(entry.transcript, entry.index, entry.direction, entry.message_type, entry.round, entry.stage,
                   what, user)


@dataclasses.dataclass
class Check:
    """One check's outcome: ``pass``, ``fail`` (with hits) or ``not-checked`` (``detail`` says why)."""

    name: str
    status: str
    detail: str
    hits: list[Hit] = dataclasses.field(default_factory=list)
    hit_count: int = 0

    @classmethod
    def of(cls, name: str, hits: Sequence[Hit], detail: str) -> Check:
        return cls(name, FAILED if hits else PASSED, detail, list(hits[:MAX_HITS]), len(hits))


@dataclasses.dataclass
class WireScan:
    """The wire audit: checks, the transcripts read and the bytes per message type per round."""

    checks: list[Check]
    transcripts: list[str]
    messages: int
    bytes_per_round: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """No check failed (``not-checked`` ones are listed in ``not_checked``, not failures)."""
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAILED]

    @property
    def not_checked(self) -> list[Check]:
        return [c for c in self.checks if c.status == NOT_CHECKED]

    def check(self, name: str) -> Check:
        """The check called ``name``; ``KeyError`` names the ones there are."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for ``audit.json``)."""
        return {"ok": self.ok, "transcripts": self.transcripts, "messages": self.messages,
                "checks": [dataclasses.asdict(c) for c in self.checks], "bytes-per-round": self.bytes_per_round}


# -- reading -----------------------------------------------------------------------------------
def load_entries(paths: Iterable[Path]) -> tuple[list[WireEntry], list[str], list[str]]:
    """``(entries, transcript names, problems)`` of the given ``.jsonl`` transcripts."""
    entries: list[WireEntry] = []
    names: list[str] = []
    problems: list[str] = []
    for path in paths:
        try:
            for item in read_transcript(path):
                if isinstance(item, str):
                    problems.append(item)
                else:
                    entries.append(item)
            names.append(str(path))
        except (FileNotFoundError, OSError) as exc:
            problems.append(f"not checked: {exc}")
    return entries, names, problems


def _content(entry: WireEntry) -> RecordDict | None:
    if not entry.blob:
        return None
    return serde.recorddict_from_proto(ProtoRecordDict.FromString(entry.blob))


def bytes_per_round(entries: Iterable[WireEntry]) -> list[dict[str, Any]]:
    """Messages and serialized bytes by side, round, direction, message type and SecAgg+ stage."""
    totals: Counter[tuple[Any, ...]] = Counter()
    counts: Counter[tuple[Any, ...]] = Counter()
    for e in entries:
        key = (e.side, e.round if e.round is not None else -1, e.direction, e.message_type, e.stage or "")
        totals[key] += e.nbytes
        counts[key] += 1
    return [{"side": k[0], "round": k[1] if k[1] >= 0 else None, "direction": k[2], "message_type": k[3],
             "stage": k[4] or None, "messages": counts[k], "bytes": totals[k]} for k in sorted(totals)]


# -- the checks --------------------------------------------------------------------------------
def check_agreement(entries: Sequence[WireEntry]) -> Check:
    """Messages in both a device's and the server's transcript must carry the same bytes."""
    server = {(e.direction, e.message_id if e.direction == DOWNLINK else e.reply_to): e
              for e in entries if e.side == "server"}
    devices = [e for e in entries if e.side == "device"]
    if not server or not devices:
        return Check("agreement", NOT_CHECKED, "not checked: needs the server's and at least one device's transcript")
    hits, paired, unpaired = [], 0, 0
    for e in devices:
        other = server.get((e.direction, e.message_id if e.direction == DOWNLINK else e.reply_to))
        unpaired += other is None
        if other is None or e.error or other.error:  # an error's text is Flower's on each side
            continue
        paired += 1
        if other.blob != e.blob:
            hits.append(Hit.at(e, f"differs from {other.transcript} message {other.index}"))
    return Check.of("agreement", hits, f"{paired} of {len(devices)} device-side messages paired with the server's "
                                       f"and compared; {unpaired} not in the server's transcript")


def check_schema(entries: Sequence[WireEntry], cfg: RunConfig, *, shapes: list[list[int]] | None) -> list[Check]:
    """The ``schema:*`` checks over every message's deserialized bytes.

    Parameters
    ----------
    entries
        The transcript entries.
    cfg
        The run's config (its task gives the evaluation schema).
    shapes
        The ``send`` arrays' shapes, in order; ``None`` when the model could not be built
        (the array shapes are then not checked).
    """
    eval_fields = eval_schema(TASKS[cfg.task].metric_names)
    found: dict[str, list[Hit]] = {k: [] for k in wire_schema.CHECKS}
    errors = 0
    for entry in entries:
        errors += entry.error is not None
        try:
            content = _content(entry)
        except Exception as exc:  # hostile bytes: any parse error is a finding, not a crash
            found["records"].append(Hit.at(entry, f"content does not parse ({type(exc).__name__})"))
            continue
        if content is not None:
            for key, sentences in wire_schema.findings(content, direction=entry.direction,
                                                       message_type=entry.message_type, stage=entry.stage,
                                                       shapes=shapes, eval_fields=eval_fields).items():
                found[key] += [Hit.at(entry, what) for what in sentences]
    n = f"{len(entries)} messages"
    arrays = n if shapes is not None else f"{n}; shapes not checked (the model could not be built)"
    return [Check.of("schema:records", found["records"], n),
            Check.of("schema:downlink-config", found["downlink-config"], n),
            Check.of("schema:uplink-metrics", found["uplink-metrics"], n),
            Check.of("schema:status", found["status"], f"{n}; {errors} error replies (their text is scanned "
                                                       "for raw context)"),
            Check.of("schema:arrays", found["arrays"], arrays)]


def personal_name_needles(sets: ParamSets) -> list[Needle]:
    """Every personal parameter name (and the name without PEFT's ``base_model.model.`` prefix)."""
    names = {n for name in sets.keep for n in (name, name.removeprefix("base_model.model."))}
    names |= {".personal."} if any(".personal." in n for n in sets.keep) else set()
    return [Needle(n.encode(), "", f"personal parameter name {n!r}") for n in sorted(names)]


def search(entries: Sequence[WireEntry], needles: Sequence[Needle]) -> list[Hit]:
    """Every (message, needle) match in the bytes that crossed the wire."""
    index = NeedleIndex(needles)
    return [Hit.at(e, n.what, n.user or None) for e in entries for n in index.search(e.scanned_bytes())]


def _context_check(name: str, src: Sources, hits: list[Hit], messages: int) -> Check:
    searched = ", ".join(f"{k} {v}" for k, v in sorted(src.searched.items())) or "nothing"
    skipped = f"; not searched: {', '.join(f'{v} {k}' for k, v in sorted(src.skipped.items()))}" if src.skipped else ""
    detail = f"{len(src.needles)} patterns ({searched}) in {messages} messages{skipped}"
    if src.problems and not src.needles:
        return Check(name, NOT_CHECKED, "; ".join(src.problems))
    check = Check.of(name, hits, detail + ("; " + "; ".join(src.problems) if src.problems else ""))
    return check


# -- entry points ------------------------------------------------------------------------------
def scan_transcripts(paths: Sequence[Path], cfg: RunConfig, *, users: Mapping[str, Path] | None = None,
                     devices: Mapping[str, Path] | None = None, key_files: Mapping[str, Path] | None = None,
                     sets: ParamSets | None = None, shapes: list[list[int]] | None = None,
                     cap: int = 4096) -> WireScan:
    """Check the transcripts ``paths`` and scan them for each user's raw context.

    Parameters
    ----------
    paths
        ``.jsonl`` transcripts (server and devices); none gives a ``not-checked`` entry.
    cfg
        The run's config.
    users
        User name -> device folder, whose raw context is searched for.
    devices
        User name -> device state-dir, whose personal part is searched for (needs the key).
    key_files
        User name -> device key file (default ``<state-dir>/device.key``).
    sets, shapes
        The preset's parameter sets and ``send`` shapes (default: built from ``cfg``).
    cap
        Most windows per source of a user (``fedpgen/audit/raw_context.py``).

    Returns
    -------
    WireScan
        Every check with its status, hits and detail, and the bytes per round.
    """
    entries, names, problems = load_entries(paths)
    if not names:
        detail = "; ".join(problems) or "not checked: no transcript given"
        return WireScan([Check("transcript", NOT_CHECKED, detail)] + [
            Check(f"{kind}:{user}", NOT_CHECKED, "not checked: no transcript to search")
            for kind, group in (("raw-context", users), ("personal-part", devices)) for user in (group or {})],
            [], 0, [])
    checks = [Check("transcript", FAILED if problems else PASSED,
                    "; ".join(problems) if problems else f"{len(names)} transcripts, {len(entries)} messages")]
    why = ""
    if sets is None or shapes is None:
        sets, shapes, why = _model_sets(cfg)
    checks.append(check_agreement(entries))
    checks += check_schema(entries, cfg, shapes=shapes)
    checks.append(Check("personal-names", NOT_CHECKED, f"not checked: {why}") if sets is None else
                  Check.of("personal-names", search(entries, personal_name_needles(sets)),
                           f"{len(sets.keep)} personal parameter names in {len(entries)} messages"))
    sources = {f"raw-context:{user}": user_needles(path, cfg, name=user, cap=cap)
               for user, path in (users or {}).items()}
    sources |= {f"personal-part:{user}": personal_needles(path, user=user, key_file=(key_files or {}).get(user),
                                                          cap=cap)
                for user, path in (devices or {}).items()}
    vocabulary = wire_schema.vocabulary(eval_schema(TASKS[cfg.task].metric_names))
    for name, src in sources.items():  # a needle's owner is its check's name until the hits are sorted out
        ours = [n for n in src.needles if n.data in vocabulary]  # e.g. a profile value "metrics"
        if ours:
            src.skipped[OWN_WORDS] = len(ours)
        src.needles = [dataclasses.replace(n, user=name) for n in src.needles if n.data not in vocabulary]
    hits = search(entries, [n for s in sources.values() for n in s.needles])
    for name, src in sources.items():
        user = name.split(":", 1)[1]
        mine = [dataclasses.replace(h, user=user) for h in hits if h.user == name]
        checks.append(_context_check(name, src, mine, len(entries)))
    return WireScan(checks=checks, transcripts=names, messages=len(entries), bytes_per_round=bytes_per_round(entries))


def _model_sets(cfg: RunConfig) -> tuple[ParamSets | None, list[list[int]] | None, str]:
    try:
        from fedpgen.shared.model import build_model

        built = build_model(cfg)
    except Exception as exc:  # a missing or unreadable base model: the checks that need it say so
        log.warning("wire scan: cannot build the model: %s", exc)
        return None, None, f"the model could not be built ({type(exc).__name__}: {exc})"
    params = dict(built.model.named_parameters())
    return built.sets, [list(params[n].shape) for n in built.sets.send], ""


def run_transcripts(run_dir: Path, devices: Mapping[str, Path] | None = None) -> list[Path]:
    """The transcripts of a run folder (server, simulated devices) and of the given device state-dirs."""
    found = find_transcripts(Path(run_dir) / RUN_TRANSCRIPT_DIR)
    for state in (devices or {}).values():
        found += [p for p in find_transcripts(Path(state) / DEVICE_TRANSCRIPT_DIR) if p not in found]
    return found


def scan_run(run_dir: Path, *, users: Mapping[str, Path] | None = None, devices: Mapping[str, Path] | None = None,
             key_files: Mapping[str, Path] | None = None, cap: int = 4096) -> WireScan:
    """The wire audit of a run folder.

    Parameters
    ----------
    run_dir
        The run folder (``config.json``, ``audit/transcript/``).
    users
        User name -> device folder; default: the simulation's population, if there.
    devices
        User name -> state-dir; default: the simulated devices' ``<run-dir>/devices/<user>``.
        A deployed device's transcript, in ``<state-dir>/transcript/``, is read from here too.
    key_files
        User name -> device key file (default ``<state-dir>/device.key``).
    cap
        Most windows per source of a user (``fedpgen/audit/raw_context.py``).

    Returns
    -------
    WireScan
        With a ``not-checked`` entry naming what is missing (no transcript at ..., no
        config.json, an unreadable user folder, a missing key) instead of an exception.
    """
    run_dir = Path(run_dir)
    try:
        cfg = RunConfig.from_mapping(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        return WireScan([Check("transcript", NOT_CHECKED, f"not checked: no usable config.json in {run_dir} ({exc})")],
                        [], 0, [])
    extra: list[Check] = []
    if users is None:
        users, problem = _simulated_users(cfg)
        if problem:
            extra.append(Check("raw-context", NOT_CHECKED, problem))
    if devices is None:
        devices = {u: run_dir / "devices" / u for u in users if (run_dir / "devices" / u).is_dir()}
    paths = run_transcripts(run_dir, devices)
    scan = scan_transcripts(paths, cfg, users=users, devices=devices, key_files=key_files, cap=cap)
    if not paths:
        scan.checks[0].detail = (f"not checked: no transcript at {run_dir / RUN_TRANSCRIPT_DIR} "
                                 "(run with wire-transcript = true)")
    scan.checks += extra
    return scan


def _simulated_users(cfg: RunConfig) -> tuple[dict[str, Path], str]:
    from fedpgen.shared.data.user_folder import list_user_dirs
    from fedpgen.shared.population import population_dir

    try:
        return {p.name: p for p in list_user_dirs(population_dir(cfg))}, ""
    except (OSError, ValueError) as exc:
        return {}, f"not checked: the users' folders ({exc}); give them to the audit"


def describe_hit(hit: Hit) -> str:
    """One line for a report: where (transcript, message, direction, type, round, stage), what, whose."""
    where = f"{hit.transcript} message {hit.message} ({hit.direction} {hit.message_type}, round {hit.round}" + \
        (f", {hit.stage})" if hit.stage else ")")
    return f"{where}: {hit.what}" + (f" [user {hit.user}]" if hit.user else "")


def audit_wire(run_dir: Path, *, cfg: Mapping[str, Any] | None = None, devices: Sequence[Path] = (),
               key_file: Path | None = None, users_dir: Path | None = None) -> tuple[dict[str, Any], list[Any]]:
    """The wire part of ``fedpgen audit``: :func:`scan_run` as a dict and as audit checks.

    Parameters
    ----------
    run_dir
        The run folder.
    cfg
        Unused: the scan reads ``config.json`` itself (kept for the runner's call).
    devices
        Device state-dirs, each named after its user (as ``<run-dir>/devices/<user>``);
        default: the simulated devices of the run folder.
    key_file
        One device key for every state-dir given (default ``<state-dir>/device.key``).
    users_dir
        A folder of the users' device folders, named as their state-dirs (a deployment's:
        the auditor was given them); default: the simulation's population.

    Returns
    -------
    tuple
        ``(WireScan.to_dict(), [fedpgen.audit.accounting.Check])``: one check per wire check,
        named ``wire <check>`` with the user (or ``run``) as subject.
    """
    from fedpgen.audit.accounting import Check as AuditCheck

    states = {Path(d).name: Path(d) for d in devices} or None
    keys = {name: Path(key_file) for name in states} if key_file and states else None
    users = None
    if users_dir is not None:
        from fedpgen.shared.data.user_folder import list_user_dirs

        users = {p.name: p for p in list_user_dirs(Path(users_dir))}
    scan = scan_run(Path(run_dir), users=users, devices=states, key_files=keys)
    checks = []
    for c in scan.checks:
        kind, _, subject = c.name.partition(":")
        if kind == "schema":
            kind, subject = c.name, ""
        hits = "; ".join(describe_hit(h) for h in c.hits[:3])
        more = f" (+{c.hit_count - 3} more)" if c.hit_count > 3 else ""
        detail = c.detail + (f" — found: {hits}{more}" if hits else "")
        checks.append(AuditCheck(f"wire {kind}", subject or "run", c.status, detail,
                                 {"hits": float(c.hit_count)}))
    return scan.to_dict(), checks
