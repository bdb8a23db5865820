"""End to end in Flower's Simulation Engine: nothing personal leaves a device; runs resume.

Every payload the server receives is read back from the server's wire transcript
(``wire-transcript = true``): each reply's content exactly as serialized for Flower's wire (protobuf).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import server_received, task_kwargs
from flwr.common import bytes_to_ndarray, serde
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedpgen.generate import generate
from fedpgen.server.results import read_jsonl
from fedpgen.shared.model import build_model
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.shared.store import DeviceStore
from fedpgen.shared.tasks import NoUsableDataError
from fedpgen.shared.wire import FIT_METRICS, eval_metrics
from fedpgen.simulate import simulate

pytestmark = pytest.mark.slow

USERS = ("ada", "bo", "cy")


def canary(user: str) -> str:
    return f"CANARY-{user}-9f3e1c"


def make_users(root: Path) -> dict[str, list[str]]:
    docs = {}
    for u in USERS:
        (root / u / "documents").mkdir(parents=True)
        docs[u] = [f"{u} writes note {i}: my secret is {canary(u)} and the weather is mild today." * 2
                   for i in range(30)]
        for i, text in enumerate(docs[u]):
            (root / u / "documents" / f"{i:03d}.txt").write_text(text)
        (root / u / "profile.json").write_text(json.dumps({"home": f"PROFILE-{u}-5ac1"}))
    return docs


def test_nothing_personal_reaches_the_server_and_a_run_resumes(make_cfg, tmp_path: Path) -> None:
    # Prepare
    docs = make_users(tmp_path / "users")
    # σ given directly with a generous budget, so that the second invocation may add a round
    privacy = {"dp": "sigma", "dp_noise_multiplier": 1.0, "dp_epsilon": 1000.0}
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), num_server_rounds=1, min_fit_clients=3,
                   wire_transcript=True, **privacy)
    built = build_model(cfg)
    params = dict(built.model.named_parameters())
    # Execute
    summary = simulate(cfg)
    # Assert: what the server received (its wire transcript: each reply's content, as serialized for the wire)
    captured = [(e.message_type, e.blob) for e in server_received(Path(cfg.run_dir))]
    # SecAgg+ (the default): 4 protocol replies per device (keys, shares, masked vector, unmask) + 1 evaluation
    assert len(captured) == 5 * len(USERS)
    masked_stage = 0
    for message_type, wire in captured:
        content = serde.recorddict_from_proto(ProtoRecordDict.FromString(wire))
        for u in USERS:
            for secret in (canary(u), f"PROFILE-{u}-5ac1", docs[u][0][:24]):
                assert secret.encode() not in wire
            token_ids = struct.pack("<8q", *canary(u).encode()[:8])  # the canary as int64 token ids
            assert token_ids not in wire
        assert b".personal." not in wire and b"lora_" not in wire  # no parameter name at all
        if message_type == "train" and "fitres.metrics" in content.config_records:  # the masked-vector stage
            res = compat.recorddict_to_fitres(content, keep_input=True)
            assert res.parameters.tensors == [], "no plaintext delta next to the masked one"
            masked = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
            sizes = sorted(bytes_to_ndarray(t).size for t in masked)
            assert sizes[-len(built.sets.send):] == sorted(params[n].numel() for n in built.sets.send)
            assert set(res.metrics) <= FIT_METRICS
            masked_stage += 1
        elif message_type == "evaluate":
            res = compat.recorddict_to_evaluateres(content)
            assert set(res.metrics) <= eval_metrics(built.task.metric_names)
    assert masked_stage == len(USERS)
    assert summary["clients"] == len(USERS)

    # A second invocation with more rounds resumes from the round-1 checkpoint.
    ckpt1 = Path(cfg.run_dir) / "checkpoints" / "round_0001.safetensors"
    first_bytes = ckpt1.read_bytes()
    simulate(make_cfg(data="dir", data_dir=str(tmp_path / "users"), num_server_rounds=2, min_fit_clients=3,
                      wire_transcript=True, **privacy))
    assert [r["round"] for r in read_jsonl(Path(cfg.run_dir) / "rounds.jsonl")] == [1, 2]
    assert ckpt1.read_bytes() == first_bytes, "round 1 was not re-run"
    assert (Path(cfg.run_dir) / "checkpoints" / "round_0002.safetensors").is_file()
    for u in USERS:
        state = Path(cfg.run_dir) / "devices" / u
        meta = DeviceStore(state).load_meta()
        assert meta["rounds_trained"] == 2, "the personal state carried over across the two runs"
        ledger = PrivacyLedger(state).events()
        assert [e.round for e in ledger] == [1, 2] and ledger[1].epsilon > ledger[0].epsilon > 0
        assert not (state / "ledger.jsonl").exists() and (state / "ledger.jsonl.sealed").is_file()
    assert (Path(cfg.run_dir) / "rounds.png").is_file() and (Path(cfg.run_dir) / "personalization.png").is_file()
    # Generation for a user: the final shared base + that device's personal part
    personal = generate(Path(cfg.run_dir), "ada", "To be", variant="personal", seed=3)
    base = generate(Path(cfg.run_dir), "ada", "To be", variant="base", seed=3)
    assert isinstance(personal, str) and len(personal) > 0 and personal != base


@pytest.mark.long  # CI: the text canary above; the behavior reader's bad lines: test_behavior.py, test_bad_input.py
def test_behavior_sequences_never_reach_the_server_and_bad_logs_are_reported(make_cfg, tmp_path: Path) -> None:
    task_case = task_kwargs("behavior")
    # Prepare: three users, each re-playing a unique 12-item sequence; one more with an empty log
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), num_server_rounds=1, min_fit_clients=3,
                   dp="sigma", dp_noise_multiplier=1.0, dp_epsilon=1000.0, wire_transcript=True, **task_case)
    built = build_model(cfg)
    catalog = [json.loads(x)["item"] for x in (built.base_path / "catalog.jsonl").read_text().splitlines()]
    layout = built.task.layout
    sequences = {}
    for k, u in enumerate(USERS):
        seq = [(37 * k + 11 * j * j + 5) % len(catalog) for j in range(12)]
        sequences[u] = seq
        lines = [json.dumps({"item": catalog[seq[j % 12]], "ts": 1000 + j, "event": "play"}) for j in range(240)]
        lines.insert(50, "{broken")  # one malformed line per user: counted in the summary
        (tmp_path / "users" / u).mkdir(parents=True)
        (tmp_path / "users" / u / "behavior.jsonl").write_text("\n".join(lines))
        (tmp_path / "users" / u / "profile.json").write_text(json.dumps({"home": f"PROFILE-{u}-5ac1"}))
    (tmp_path / "users" / "zed").mkdir()
    (tmp_path / "users" / "zed" / "behavior.jsonl").write_text("")
    # Execute
    summary = simulate(cfg)
    captured = [(e.message_type, e.blob) for e in server_received(Path(cfg.run_dir))]
    # Assert: no item sequence, id string or profile value on the wire, in any encoding
    assert len(captured) == 5 * len(USERS), "4 SecAgg+ replies and 1 evaluation per usable device"
    for _, wire in captured:
        for u, seq in sequences.items():
            assert " ".join(catalog[i] for i in seq[:4]).encode() not in wire
            assert catalog[seq[0]].encode() not in wire
            tokens = [layout.item_base + i for i in seq[:6]]
            assert struct.pack("<6q", *tokens) not in wire and struct.pack("<6i", *tokens) not in wire
            assert f"PROFILE-{u}-5ac1".encode() not in wire
        assert b".personal." not in wire and b"lora_" not in wire
    assert summary["clients"] == len(USERS)
    assert summary["refused"]["no-usable-data"] == 1, "the empty log is reported, not a crash"
    assert summary["skipped"] == {"malformed-line": len(USERS)}
    assert 0.0 <= summary["median-hr10"]["personal"] <= 1.0


@pytest.mark.long  # CI: the text canary above; what an image device sends: test_image.py
def test_image_photos_never_reach_the_server(make_cfg, tmp_path: Path) -> None:
    # Prepare: three users whose photos carry a unique pixel pattern; one more with no usable photo
    from PIL import Image

    from fedpgen.shared.data import procedural_faces as faces
    from fedpgen.shared.tasks.image import PIXELS, pack

    cfg = make_cfg(task="image", data="dir", data_dir=str(tmp_path / "users"), num_server_rounds=1,
                   min_fit_clients=3, local_steps=2, personal_max_steps=2, heldout_fraction=0.25, val_fraction=0.0,
                   dp="sigma", dp_noise_multiplier=1.0, dp_epsilon=1000.0, wire_transcript=True)
    photos = {}
    for k, u in enumerate(USERS):
        rng = np.random.default_rng(100 + k)
        ident = faces.random_identity(rng)
        photos[u] = [faces.render(ident, rng) for _ in range(8)]
        photos[u][0][:4, :4] = rng.integers(0, 256, (4, 4, 3))  # a unique corner: the canary
        (tmp_path / "users" / u / "faces").mkdir(parents=True)
        for i, p in enumerate(photos[u]):
            Image.fromarray(p).save(tmp_path / "users" / u / "faces" / f"{i:03d}.png")
    (tmp_path / "users" / "zed" / "faces").mkdir(parents=True)
    (tmp_path / "users" / "zed" / "faces" / "a.txt").write_text("no photo")
    # Execute
    summary = simulate(cfg)
    captured = [(e.message_type, e.blob) for e in server_received(Path(cfg.run_dir))]
    # Assert: no PNG bytes, raw pixel rows or model-input tensors of any photo on the wire
    assert len(captured) == 5 * len(USERS)
    for _, wire in captured:
        for u, ps in photos.items():
            png = (tmp_path / "users" / u / "faces" / "000.png").read_bytes()
            assert png[-64:] not in wire and png[40:104] not in wire
            assert ps[0][0].tobytes()[:24] not in wire  # raw pixel row
            record = pack(ps[:1], 0, [0, 0, 0])[0, :PIXELS]
            assert record[:16].numpy().tobytes() not in wire  # float32 model input
            assert record[:16].double().numpy().tobytes() not in wire
        assert b".personal." not in wire and b"lora_" not in wire and b"slot_proj" not in wire
    assert summary["clients"] == len(USERS) and summary["refused"]["no-usable-data"] == 1
    assert sorted(p.name for p in (Path(cfg.run_dir) / "reports").iterdir()) == [f"{u}.png" for u in USERS]
    # Generation for a user (images on disk); a user whose folder is unusable is refused
    out = {v: Path(generate(Path(cfg.run_dir), "ada", "", variant=v, count=3, seed=5)) for v in ("personal", "base")}
    pix = {v: [np.asarray(Image.open(p)) for p in sorted(out[v].glob("*.png"))] for v in out}
    assert len(pix["personal"]) == 3 and pix["personal"][0].shape == (faces.SIZE, faces.SIZE, 3)
    assert not np.array_equal(pix["personal"][0], pix["base"][0]), "the personal part changed nothing"
    with pytest.raises(NoUsableDataError):
        generate(Path(cfg.run_dir), "zed", "", variant="base")
    with pytest.raises(FileNotFoundError, match="device key not found"):  # a reader never makes a new key
        generate(Path(cfg.run_dir), "ada", "", variant="base", device_state=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "device.key").exists()
    from typer.testing import CliRunner

    from fedpgen.cli import cli

    ran = CliRunner().invoke(cli, ["generate", cfg.run_dir, "bo", "hair=red", "--count", "2", "--out",
                                   str(tmp_path / "bo")])
    assert ran.exit_code == 0 and len(list((tmp_path / "bo").glob("*.png"))) == 2
    ran = CliRunner().invoke(cli, ["generate", cfg.run_dir, "nobody"])
    assert ran.exit_code != 0 and "no user 'nobody'" in str(ran.exception)
    encoder = summary["instrument"]["identity-encoder"]  # the ruler's own quality is in the report
    assert encoder["identities"] == 40 and encoder["top1"] > 10 * encoder["chance"]
    assert encoder["same_cos"] > encoder["other_cos"] + 0.3
