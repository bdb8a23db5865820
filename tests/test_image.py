"""The image task: photo reading and its bad inputs, records, the subject token's place, a DP round."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.device import REPORT, Device
from shared.data import procedural_faces as faces
from shared.data.photos import read_photos, write_photos
from shared.population import ensure_population
from shared.tasks import NoUsableDataError
from shared.tasks.image import LABEL_WIDTH, PIXELS, edit_hair_token, pack, subject_slots, unpack
from shared.tasks.image_model import attribute_tokens
from shared.training import mean_loss

IMAGE = {"task": "image", "min_records": 12, "heldout_fraction": 0.25, "val_fraction": 0.0, "local_steps": 2,
         "personal_max_steps": 2}


def test_bad_photos_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    # Prepare: 2 good faces, a text file, a tiny image, a truncated PNG, a huge image; one subject
    rng = np.random.default_rng(0)
    good = faces.render(faces.random_identity(rng), rng)
    (tmp_path / "faces").mkdir()
    for i in range(2):
        Image.fromarray(good).save(tmp_path / "faces" / f"{i}.png")
    (tmp_path / "faces" / "notes.txt").write_text("not a photo")
    Image.new("RGB", (8, 8)).save(tmp_path / "faces" / "tiny.png")
    (tmp_path / "faces" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    Image.new("RGB", (5000, 20)).save(tmp_path / "faces" / "huge.png")
    (tmp_path / "subjects" / "rex").mkdir(parents=True)
    Image.fromarray(np.zeros((64, 48, 3), np.uint8)).save(tmp_path / "subjects" / "rex" / "a.jpg")
    # Execute
    face, subjects, skipped = read_photos(tmp_path, faces.SIZE)
    # Assert
    assert len(face) == 2 and len(subjects["rex"]) == 1
    assert subjects["rex"][0].shape == (faces.SIZE, faces.SIZE, 3)
    np.testing.assert_array_equal(face[0], good)  # already 32x32: no resampling
    assert skipped == {"not-an-image": 1, "tiny-image": 1, "unreadable-file": 1, "huge-image": 1}


def test_a_subject_folder_named_face_never_replaces_the_users_faces(tmp_path: Path) -> None:
    # Prepare: two face photos, and a subject folder that happens to be called "face"
    rng = np.random.default_rng(0)
    own = [faces.render(faces.random_identity(rng), rng) for _ in range(2)]
    write_photos(tmp_path / "faces", own)
    write_photos(tmp_path / "subjects" / "face", [np.zeros((32, 32, 3), np.uint8)])
    # Execute
    face, subjects, skipped = read_photos(tmp_path, faces.SIZE)
    # Assert: the faces are the user's; "face" is a subject like any other and gets a slot
    assert len(face) == 2 and all(np.array_equal(a, b) for a, b in zip(face, own, strict=True))
    assert list(subjects) == ["face"] and len(subjects["face"]) == 1 and skipped == {}
    assert subject_slots(subjects, {}) == {"face": 1}


def test_symlinked_and_empty_photos_are_counted_not_read(tmp_path: Path) -> None:
    # Prepare: a photo outside the folder linked in, a symlinked faces folder elsewhere,
    # a symlinked subject folder, a zero-byte photo
    rng = np.random.default_rng(0)
    write_photos(tmp_path / "outside", [faces.render(faces.random_identity(rng), rng) for _ in range(2)])
    user = tmp_path / "user"
    write_photos(user / "faces", [faces.render(faces.random_identity(rng), rng)])
    (user / "faces" / "linked.png").symlink_to(tmp_path / "outside" / "0000.png")
    (user / "faces" / "zero.png").write_bytes(b"")
    (user / "subjects").mkdir()
    (user / "subjects" / "rex").symlink_to(tmp_path / "outside", target_is_directory=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "faces").symlink_to(tmp_path / "outside", target_is_directory=True)
    # Execute
    face, subjects, skipped = read_photos(user, faces.SIZE)
    # Assert
    assert len(face) == 1 and subjects == {} and skipped == {"symlink": 2, "empty-file": 1}
    assert read_photos(other, faces.SIZE) == ([], {}, {"symlink": 1})


def test_an_edit_always_asks_for_another_hair_colour() -> None:
    hair = [attribute_tokens({"hair": h})[0] for h in faces.HAIR]
    edits = [edit_hair_token(t) for t in hair]
    assert all(e != t for e, t in zip(edits, hair, strict=True)) and sorted(edits) == sorted(hair)
    assert edit_hair_token(0) in hair  # no hair asked: any colour is an edit


def test_records_round_trip_pixels_slot_and_attributes() -> None:
    rng = np.random.default_rng(1)
    photos = [faces.render(faces.random_identity(rng), rng) for _ in range(3)]
    x, slot, attrs = unpack(pack(photos, 2, [1, 7, 9]))
    assert x.shape == (3, 3, faces.SIZE, faces.SIZE) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert slot.tolist() == [2, 2, 2] and attrs.tolist() == [[1, 7, 9]] * 3
    np.testing.assert_allclose(((x[0].permute(1, 2, 0) + 1) * 127.5).numpy(), photos[0], atol=1e-3)


def test_too_few_face_photos_is_no_usable_data(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "users" / "zoe" / "faces").mkdir(parents=True)
    (tmp_path / "users" / "zoe" / "faces" / "x.txt").write_text("no photos")
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), **IMAGE)
    with pytest.raises(NoUsableDataError, match="0 usable face photos"):
        Device(cfg, user_dir=tmp_path / "users" / "zoe", state_dir=tmp_path / "s")


def test_a_dp_round_sends_only_shared_attention_lora_and_keeps_the_subject_token(make_cfg) -> None:
    # Prepare
    cfg = make_cfg(**IMAGE)
    d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=Path(cfg.run_dir) / "s", client_index=0)
    assert d.data.train.shape[1] == PIXELS + 1 + 3
    # Execute
    delta, n, metrics = d.fit(d.init_send, server_round=1)
    out = d.evaluate([a + b for a, b in zip(d.init_send, delta, strict=True)])
    # Assert: the subject token (slot_proj LoRA) is personal; attention LoRA is what is sent
    assert any("slot_proj.lora_" in k for k in d.sets.keep) and not any("slot_proj" in k for k in d.sets.send)
    assert all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in d.sets.send)
    assert any(np.abs(x).max() > 0 for x in delta) and 0 < metrics["dp-epsilon"] < math.inf
    for v in ("base", "shared", "personal", "local"):
        assert 0.0 <= out[f"{v}-top1"] <= 1.0 and 0.0 <= out[f"{v}-align"] <= 1.0 and out[f"{v}-fd"] >= 0.0
        assert 0.0 <= out[f"{v}-edit"] <= 1.0
    png = d.store.read(REPORT)
    assert png is not None and Image.open(io.BytesIO(png)).size == (LABEL_WIDTH + 8 * 64, 5 * 64)  # real + 4 variants
    assert not (Path(cfg.run_dir) / "s" / REPORT).exists(), "the grid shows the user's face: sealed only"


def test_validation_loss_compares_checkpoints_on_the_same_noise_draws(make_cfg) -> None:
    # Prepare: the DDPM loss draws a timestep and noise per record, so two plain calls differ
    cfg = make_cfg(**IMAGE)
    d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=Path(cfg.run_dir) / "s")
    held = d.data.heldout
    with torch.no_grad():
        assert not torch.equal(d.task.per_record_loss(d.model, held), d.task.per_record_loss(d.model, held))
    # Execute
    state = torch.get_rng_state()
    first = mean_loss(d.model, held, task=d.task)
    second = mean_loss(d.model, held, task=d.task)
    # Assert: the same value every call, and training's random stream is not consumed
    assert first == second and math.isfinite(first)
    assert torch.equal(torch.get_rng_state(), state)
    assert d.task.val_draws > 1


def test_subjects_get_their_own_token_slots_and_extra_ones_are_counted(make_cfg, tmp_path: Path) -> None:
    # Prepare: 6 face photos and 4 subjects (one more than the model's subject slots)
    rng = np.random.default_rng(3)
    ident = faces.random_identity(rng)
    user = tmp_path / "users" / "kim"
    (user / "faces").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(faces.render(ident, rng)).save(user / "faces" / f"{i}.png")
    for name in ("cat", "dog", "mug", "vase"):
        (user / "subjects" / name).mkdir(parents=True)
        Image.fromarray(faces.render(faces.random_identity(rng), rng)).save(user / "subjects" / name / "a.png")
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), **IMAGE)
    # Execute
    d = Device(cfg, user_dir=user, state_dir=tmp_path / "s")
    # Assert: slots 1..3 by name, the fourth subject counted as skipped, not trained
    assert sorted(set(unpack(d.data.train)[1].tolist())) == [0, 1, 2, 3]
    assert d.data.skipped == {"extra-subject": 1}
    assert d.data.bindings == {"subject-slots": {"cat": 1, "dog": 2, "mug": 3}}
    out = d.task.generate(d.model, d.base_path, "", subject="dog", bindings=d.data.bindings, dest=tmp_path / "dog", n=2)
    assert len(list(Path(out).glob("*.png"))) == 2
    with pytest.raises(ValueError, match="no trained subject 'vase'.*cat, dog, mug"):
        d.task.generate(d.model, d.base_path, "", subject="vase", bindings=d.data.bindings, dest=tmp_path / "v")
    with pytest.raises(ValueError, match="unknown attribute 'hair=purple'"):
        d.task.generate(d.model, d.base_path, "hair=purple", dest=tmp_path / "p")

    # A round stores the map; a subject folder added later ("ant" sorts first) takes no trained slot
    d.fit(d.init_send, server_round=1)
    (user / "subjects" / "ant").mkdir()
    Image.fromarray(faces.render(faces.random_identity(rng), rng)).save(user / "subjects" / "ant" / "a.png")
    again = Device(cfg, user_dir=user, state_dir=tmp_path / "s")
    assert again.data.bindings == d.data.bindings and again.data.skipped == {"extra-subject": 2}


def test_prepare_builds_the_base_and_the_encoder_into_the_device_cache(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from fedpgen.cli import cli
    from shared.tasks.cache import MARKER

    # Prepare: an empty cache, as on a new device
    monkeypatch.setenv("FEDPGEN_CACHE", str(tmp_path))
    # Execute
    args = ["prepare", "--config", str(Path(__file__).parents[1] / "simulations" / "image.toml"),
            "--set", "pretrain-steps=3"]
    out = CliRunner().invoke(cli, args)
    # Assert: both are built and complete; a second call finds them
    assert out.exit_code == 0, out.output
    built = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "base").iterdir() if (p / MARKER).is_file())
    assert built == ["image-encoder", "image-unet"]
    before = {p: (p / MARKER).stat().st_mtime_ns for p in (tmp_path / "base").iterdir()}
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert {p: (p / MARKER).stat().st_mtime_ns for p in (tmp_path / "base").iterdir()} == before


def test_a_local_diffusers_unet_checkpoint_trains_and_a_latent_one_is_refused(make_cfg, tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from shared.tasks.image_model import UNET

    # Prepare: a diffusers-layout folder (<path>/unet) with another width and context size
    other = {**UNET, "block_out_channels": (16, 32, 32), "cross_attention_dim": 16}
    UNet2DConditionModel(**other).save_pretrained(tmp_path / "pixel" / "unet")
    UNet2DConditionModel(**{**other, "in_channels": 4, "out_channels": 4}).save_pretrained(tmp_path / "latent")
    cfg = make_cfg(base_model=str(tmp_path / "pixel"), **IMAGE)
    user = ensure_population(cfg)[0]
    # Execute
    d = Device(cfg, user_dir=user, state_dir=tmp_path / "s")
    delta, _, _ = d.fit(d.init_send, server_round=1)
    # Assert: the same machinery trains it; a latent-space UNet and a missing folder are named
    assert d.model.base_model.model.unet.config.cross_attention_dim == 16
    assert any("to_q.lora_A.shared" in n for n in d.sets.send) and max(float(np.abs(x).max()) for x in delta) > 0
    with pytest.raises(ValueError, match="pixel-space UNet"):
        Device(make_cfg(base_model=str(tmp_path / "latent"), **IMAGE), user_dir=user, state_dir=tmp_path / "s2")
    with pytest.raises(FileNotFoundError, match="no diffusers UNet"):
        Device(make_cfg(base_model=str(tmp_path / "nowhere"), **IMAGE), user_dir=user, state_dir=tmp_path / "s3")
