"""The wire audit: every message recorded on both sides, checked against shared/wire.py, scanned for raw context."""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from conftest import TINY
from fedpgen.audit.raw_context import Needle, NeedleIndex
from fedpgen.shared.wire_transcript import DOWNLINK, RUN_TRANSCRIPT_DIR, TranscriptWriter, read_transcript
from fedpgen.audit.wire_scan import FAILED, NOT_CHECKED, PASSED, scan_run, scan_transcripts
from fedpgen.shared.adapters import ParamSets
from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.user_folder import read_documents
from fedpgen.shared.population import ensure_population
from fedpgen.shared.tasks import TASKS
from fedpgen.shared.wire import FIT_METRICS, eval_metrics

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the mod below runs in Ray workers

# σ given directly (no calibration) with a generous budget: the fastest private run there is
FAST = {**TINY, "num-server-rounds": 1, "min-fit-clients": 2, "dp": "sigma", "dp-noise-multiplier": 1.0,
        "dp-epsilon": 1000.0, "wire-transcript": True}


class PlantInEvaluation:
    """A device that adds to its final evaluation reply, after the app (an outer mod: inside the
    transcript's, so what it adds crosses the wire): ``("record", text)`` a config record holding
    ``text``, ``("metric", key)`` a metric ``key`` outside the schema."""

    def __init__(self, plants: dict[int, tuple[str, str]]) -> None:
        self.plants = plants

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        out = call_next(msg, ctxt)
        plant = self.plants.get(int(ctxt.node_config["partition-id"]))
        if plant and msg.metadata.message_type == "evaluate" and out.has_content():
            kind, value = plant
            if kind == "record":
                out.content.config_records["note"] = ConfigRecord({"text": value})
            else:
                out.content.config_records["evaluateres.metrics"][value] = 1.0
        return out


def make_users(root: Path) -> None:
    """Three users whose documents and profile are their own: random words from each one's RNG
    (the built-in synthetic users share a grammar, so a passage of one is often another's too)."""
    for k, user in enumerate(("user-ada", "user-bo", "user-cy")):
        rng = random.Random(k)
        (root / user / "documents").mkdir(parents=True)
        for i in range(30):
            words = ("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(30))
            (root / user / "documents" / f"{i:03d}.txt").write_text(" ".join(words) + ".")
        (root / user / "profile.json").write_text(json.dumps({"home": f"PROFILE-{user}-5ac1"}))


def run(tmp: Path) -> tuple[RunConfig, list[Path]]:
    make_users(tmp / "users")
    cfg = RunConfig.from_mapping({**FAST, "run-dir": str(tmp / "run"), "data": "dir", "data-dir": str(tmp / "users")})
    return cfg, ensure_population(cfg)


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    from fedpgen.simulate import simulate

    cfg, _ = run(tmp_path_factory.mktemp("honest"))
    simulate(cfg)
    return cfg


@pytest.mark.slow
def test_an_honest_secagg_run_is_recorded_on_both_sides_and_the_scan_finds_nothing(honest: RunConfig) -> None:
    # Prepare: a real SecAgg+ simulation with wire-transcript on (the fixture)
    folder = Path(honest.run_dir) / RUN_TRANSCRIPT_DIR
    devices = sorted(folder.glob("device-*.jsonl"))
    # Execute
    scan = scan_run(Path(honest.run_dir))
    # Assert: a transcript for the server and each device, every message on both sides
    assert (folder / "server.jsonl").is_file() and (folder / "server.bin").is_file()
    assert len(devices) == honest.num_users and all(p.with_suffix(".bin").is_file() for p in devices)
    assert scan.messages == 2 * honest.num_users * (2 * 4 + 2), "4 SecAgg+ stages and the evaluation, both ways"
    assert scan.ok, [(c.name, c.hits[:3]) for c in scan.failed]
    assert scan.check("agreement").detail.startswith(f"{scan.messages // 2} of {scan.messages // 2}")
    assert not scan.not_checked
    names = {c.name for c in scan.checks}
    for user in (p.name for p in ensure_population(honest)):
        assert {f"raw-context:{user}", f"personal-part:{user}"} <= names
        assert scan.check(f"raw-context:{user}").status == PASSED
        assert "documents" in scan.check(f"raw-context:{user}").detail
        assert "personal part" in scan.check(f"personal-part:{user}").detail
    # Bytes per message type per round, the same seen from both sides
    rows = {(r["side"], r["direction"], r["message_type"], r["stage"]): r for r in scan.bytes_per_round}
    for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
        for direction in ("downlink", "uplink"):
            server, device = rows[("server", direction, "train", stage)], rows[("device", direction, "train", stage)]
            assert server["messages"] == honest.num_users and server["bytes"] == device["bytes"] > 0
    # Recorded outside SecAgg+: the stage before the mod pops it, the masked vector and no plain delta
    entries = [e for p in devices for e in read_transcript(p)]
    assert {e.stage for e in entries if e.direction == DOWNLINK and e.message_type == "train"} == {
        "setup", "share_keys", "collect_masked_vectors", "unmask"}
    for e in entries:
        records = {r["name"]: r for r in e.records}
        if e.direction == "uplink" and "fitres.metrics" in records:
            assert records["fitres.parameters"]["keys"] == []
            masked = records["secaggplus_configs"]["keys"][0]
            assert masked["key"] == "masked_params" and all(a["dtype"].startswith("int") for a in masked["arrays"])
            assert {k["key"] for k in records["fitres.metrics"]["keys"]} <= FIT_METRICS
        if e.direction == "uplink" and "evaluateres.metrics" in records:
            assert {k["key"] for k in records["evaluateres.metrics"]["keys"]} <= eval_metrics(TASKS["text"].metric_names)


@pytest.mark.slow
def test_a_planted_leak_and_a_metric_outside_the_schema_are_flagged(tmp_path: Path) -> None:
    from fedpgen.simulate import simulate

    # Prepare: device 0 sends a passage of one of its documents and its profile value in an extra
    # record, device 1 an extra metric
    cfg, users = run(tmp_path)
    texts, _ = read_documents(users[0])
    plants = {0: ("record", f"{texts[1][10:80]} from PROFILE-{users[0].name}-5ac1"), 1: ("metric", "debug-note")}
    # Execute
    simulate(cfg, client_mods=([PlantInEvaluation(plants)], []))
    scan = scan_run(Path(cfg.run_dir))
    # Assert: the passage is found, naming its user and where it came from, in what both sides recorded
    leak = scan.check(f"raw-context:{users[0].name}")
    assert leak.status == FAILED and {h.user for h in leak.hits} == {users[0].name}
    assert {h.transcript.split("-")[0] for h in leak.hits} == {"server", "device"}
    assert all(h.direction == "uplink" and h.message_type == "evaluate" for h in leak.hits)
    assert any(h.what.startswith("document 2, bytes") for h in leak.hits)
    assert any(h.what == "profile value of 'home'" for h in leak.hits)
    assert scan.check(f"raw-context:{users[1].name}").status == PASSED
    assert any("'note'" in h.what for h in scan.check("schema:records").hits)
    metrics = scan.check("schema:uplink-metrics")
    assert metrics.status == FAILED and all("'debug-note' outside the schema" in h.what for h in metrics.hits)
    assert not scan.ok and {c.name for c in scan.failed} == {
        f"raw-context:{users[0].name}", "schema:records", "schema:uplink-metrics"}


def test_a_run_folder_without_a_transcript_says_what_was_not_checked(tmp_path: Path) -> None:
    # Prepare: a run folder with its config and users but no transcript; one without a config
    cfg = RunConfig.from_mapping({**FAST, "run-dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_toml_dict()))
    users = {"ada": tmp_path / "ada"}
    # Execute
    scan = scan_run(tmp_path / "run", users=users, devices={})
    bare = scan_run(tmp_path / "empty")
    # Assert
    transcript = scan.check("transcript")
    assert transcript.status == NOT_CHECKED
    assert transcript.detail == (f"not checked: no transcript at {tmp_path / 'run' / RUN_TRANSCRIPT_DIR} "
                                 "(run with wire-transcript = true)")
    assert scan.check("raw-context:ada").status == NOT_CHECKED and scan.ok
    assert bare.check("transcript").status == NOT_CHECKED and "no usable config.json" in bare.check("transcript").detail


@pytest.mark.slow
def test_a_missing_key_or_user_folder_is_not_checked_and_said(honest: RunConfig, tmp_path: Path) -> None:
    # Prepare: the honest run's transcripts; a user folder that is not there; a key file that is not there
    run_dir = Path(honest.run_dir)
    user = ensure_population(honest)[0].name
    paths = sorted((run_dir / RUN_TRANSCRIPT_DIR).glob("*.jsonl"))
    # Execute
    scan = scan_transcripts(paths, honest, users={"ghost": tmp_path / "ghost"},
                            devices={user: run_dir / "devices" / user, "nobody": tmp_path / "nobody"},
                            key_files={user: tmp_path / "missing.key"})
    # Assert
    assert scan.check("raw-context:ghost").status == NOT_CHECKED
    assert str(tmp_path / "ghost") in scan.check("raw-context:ghost").detail
    assert scan.check(f"personal-part:{user}").status == NOT_CHECKED
    assert f"device key not found: {tmp_path / 'missing.key'}" in scan.check(f"personal-part:{user}").detail
    assert "no device state-dir" in scan.check("personal-part:nobody").detail
    assert scan.ok, "nothing failed: what could not be checked is listed, not a crash"


def test_a_transcript_whose_bytes_were_altered_fails_the_transcript_check(tmp_path: Path) -> None:
    # Prepare: two recorded messages, then one byte of the second one's bytes changed
    writer = TranscriptWriter(tmp_path, "server", side="server")
    for r in (1, 2):
        content = RecordDict({"fitins.config": ConfigRecord({"server-round": r, "final": False})})
        meta = Metadata(run_id=1, message_id=f"m{r}", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id=str(r), created_at=0.0, ttl=60.0, message_type="train")
        writer.record(Message(content=content, metadata=meta), direction=DOWNLINK)
    data = bytearray((tmp_path / "server.bin").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "server.bin").write_bytes(bytes(data))
    cfg = RunConfig.from_mapping({**FAST, "run-dir": str(tmp_path / "run")})
    # Execute
    entries = list(read_transcript(tmp_path / "server.jsonl"))
    scan = scan_transcripts([tmp_path / "server.jsonl"], cfg, sets=ParamSets((), (), (), ()), shapes=[])
    # Assert
    assert entries[0].round == 1 and entries[0].records[0]["keys"][0] == {"key": "server-round", "type": "int"}
    assert entries[1] == "server.jsonl line 2: its bytes are missing or do not match their sha256"
    assert scan.check("transcript").status == FAILED and "line 2" in scan.check("transcript").detail


@pytest.mark.parametrize("length", [6, 7, 8, 9, 24, 64])
def test_the_needle_index_finds_a_pattern_at_every_offset(length: int) -> None:
    rng = np.random.default_rng(length)
    haystack = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for offset in (0, 1, 5, 7, 8, 1001, 4096 - length):
        needle = Needle(rng.integers(0, 256, length, dtype=np.uint8).tobytes(), "ada", "x")
        other = Needle(needle.data[:-1] + bytes([needle.data[-1] ^ 1]), "bo", "y")  # one bit off
        data = haystack[:offset] + needle.data + haystack[offset + length :]
        assert NeedleIndex([needle, other]).search(data) == [needle]
        assert NeedleIndex([other]).search(data) == []


def test_the_config_switch_is_off_by_default_and_takes_booleans() -> None:
    assert RunConfig.from_mapping({}).wire_transcript is False
    assert RunConfig.from_mapping({"wire-transcript": "true"}).wire_transcript is True
    with pytest.raises(ValueError, match="'wire-transcript'"):
        RunConfig.from_mapping({"wire-transcript": "sometimes"})
    assert RunConfig.from_mapping({"wire-transcript": True}).model_hash() == RunConfig.from_mapping({}).model_hash()
