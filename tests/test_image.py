"""The image task: photo reading and its bad inputs, records, the subject token's place, a DP round."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedpgen.client.device import Device
from fedpgen.client.evaluation import REPORT
from fedpgen.shared.data import procedural_faces as faces
from fedpgen.shared.data.photos import read_photos, write_photos
from fedpgen.shared.population import ensure_population
from fedpgen.shared.tasks import NoUsableDataError
from fedpgen.shared.tasks.image import (
    LABEL_WIDTH,
    PIXELS,
    SAMPLES,
    ImageTask,
    edit_hair_token,
    pack,
    subject_slots,
    unpack,
)
from fedpgen.shared.tasks.image_base import to_tensor
from fedpgen.shared.tasks.image_model import HEADS, attribute_tokens
from fedpgen.shared.training import mean_loss
from fedpgen.shared.wire import VARIANTS

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


def tagged(tags: list[int]) -> list[np.ndarray]:
    """Uniform photos whose pixel value is their tag: what ``TaggedEncoder`` recognizes them by."""
    return [np.full((faces.SIZE, faces.SIZE, 3), t, np.uint8) for t in tags]


class TaggedEncoder:
    """An identity encoder stand-in with known outputs: each tag (an image's pixel value) has an
    embedding and the attributes it shows."""

    def __init__(self, embeddings: dict[int, list[float]], shows: dict[int, dict[str, str]]) -> None:
        self.embeddings, self.shows = embeddings, shows

    def to(self, device: torch.device) -> TaggedEncoder:
        return self

    def _tags(self, images: torch.Tensor) -> list[int]:
        return [round(float((x[0, 0, 0] + 1) * 127.5)) for x in images]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.embeddings[t] for t in self._tags(images)])

    def attributes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tags = self._tags(images)
        return {k: torch.eye(len(v))[[v.index(self.shows[t][k]) for t in tags]] for k, v in HEADS.items()}


def test_image_metrics_of_known_samples_have_their_hand_computed_values(monkeypatch) -> None:
    # Prepare: embeddings in 16 dimensions; A = (0.6, 0.8, 0, ...), B = (0.6, -0.8, 0, ...), and
    # 12 public reference centroids e2..e13. The user asks for brown hair and glasses (no beard).
    a, b, ref0 = [0.6, 0.8] + [0.0] * 14, [0.6, -0.8] + [0.0] * 14, [0.0, 0.0, 1.0] + [0.0] * 13
    look = {"glasses": "yes", "beard": "yes"}
    encoder = TaggedEncoder(
        embeddings={1: a, 2: b, 3: a, 4: b, 5: ref0, 6: a, 7: a},
        shows={1: {"hair": "brown", **look}, 2: {"hair": "brown", **look},  # the held-out photos
               3: {"hair": "brown", **look}, 4: {"hair": "brown", **look, "glasses": "no"},
               5: {"hair": "red", **look, "glasses": "no"},  # samples as asked: 3 x tag 3, 3 x 4, 2 x 5
               6: {"hair": "blond", **look}, 7: {"hair": "brown", **look}})  # asked for blond: 5 x 6, 3 x 7
    task = ImageTask()
    task.encoder, task.refs = encoder, torch.eye(16)[2:14]
    asked = attribute_tokens({"hair": "brown", "glasses": "yes"})
    edited = [edit_hair_token(asked[0]), *asked[1:]]
    assert edited[0] == attribute_tokens({"hair": "blond"})[0]
    calls = []

    def sample(model: object, attrs: torch.Tensor, slot: int = 0, n: int = SAMPLES, seed: int = 1234) -> torch.Tensor:
        calls.append((attrs.tolist(), slot))
        return to_tensor(tagged({tuple(asked): [3, 3, 3, 4, 4, 4, 5, 5], tuple(edited): [6] * 5 + [7] * 3}
                                [tuple(attrs.tolist())]))

    monkeypatch.setattr(task, "sample", sample)
    # Execute
    scores, samples = task.evaluate(None, pack(tagged([1, 2]), 0, asked))  # type: ignore[arg-type]
    # Assert: the user's centroid is normalize((A + B) / 2) = e0
    assert calls == [(asked, 0), (edited, 0)] and samples.shape == (SAMPLES, 3, faces.SIZE, faces.SIZE)
    assert scores["top1"] == 0.75  # 6 samples score 0.6 on e0 and 0 on the references; 2 are reference 0
    assert scores["idsim"] == pytest.approx(6 * 0.6 / 8 - 2 / (8 * 12))  # mean cos to e0 - mean cos to the 12 refs
    assert scores["align"] == (6 / 8 + 3 / 8) / 2  # hair right on 6 of 8, glasses on 3 of 8; beard not asked
    assert scores["edit"] == 5 / 8  # asked for blond: 5 of 8 show it
    # Fréchet distance, diagonal covariances: samples' mean (0.45, 0, 0.25), photos' mean (0.6, 0, 0);
    # variances: samples (0.0675, 0.48, 0.1875), photos (0, 0.64, 0)
    fd = (0.15**2 + 0.25**2) + 0.0675 + (0.48 + 0.64 - 2 * math.sqrt(0.48 * 0.64)) + 0.1875
    assert scores["fd"] == pytest.approx(fd, rel=1e-5)


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
    assert {f"{v}-{m}" for v in VARIANTS for m in d.task.metric_names} <= set(out)
    # Each variant evaluates other weights (the values themselves: the known-samples test above).
    # FD is continuous in the samples: any change of the weights shows.
    fd = [out[f"{v}-fd"] for v in VARIANTS]
    assert len(set(fd)) == len(VARIANTS), f"two variants generated the same samples: {dict(zip(VARIANTS, fd))}"
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
    from fedpgen.shared.tasks.cache import MARKER

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

    from fedpgen.shared.tasks.image_model import UNET

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


def test_prior_preservation_trains_the_personal_part_on_generated_faces_only(make_cfg, monkeypatch) -> None:
    """DreamBooth's prior preservation: faces sampled by the frozen base for "a person" with the
    user's attributes (every hair colour) train the personal part beside the user's photos; no
    private phase sees them, and nothing of the user's photos is in them."""
    import fedpgen.client.device as device_module
    from fedpgen.shared.adapters import active
    from fedpgen.shared.presets import PERSONAL, SHARED
    from fedpgen.shared.tasks import image as image_task
    from fedpgen.shared.tasks.image_model import ATTR_VOCAB, CLASS_SLOT

    cfg = make_cfg(**IMAGE, prior_images=5, num_users=2)
    users = ensure_population(cfg)
    a = Device(cfg, user_dir=users[0], state_dir=Path(cfg.run_dir) / "a", client_index=0)
    # Prepare: a second user with the first one's profile but other photos
    twin = Path(cfg.run_dir).parent / "twin"
    write_photos(twin / "faces", [np.full((faces.SIZE, faces.SIZE, 3), 200 - 5 * i, np.uint8) for i in range(12)])
    (twin / "profile.json").write_text((users[0] / "profile.json").read_text())
    b = Device(cfg, user_dir=twin, state_dir=Path(cfg.run_dir) / "b", client_index=1)
    # Execute
    prior = a.prior_records()
    # Assert: 5 records of the class token, hair cycling over the colours, the user's other attributes
    x, slot, attrs = unpack(prior)
    own = unpack(a.data.train)[2][0]
    hair = [i + 1 for i, v in enumerate(ATTR_VOCAB) if v.startswith("hair=")]
    assert prior.shape == (5, PIXELS + 1 + 3) and set(slot.tolist()) == {CLASS_SLOT}
    assert attrs[:, 0].tolist() == (hair * 5)[:5] and torch.equal(attrs[:, 1:], own[1:].expand(5, -1))
    assert torch.equal(prior, b.prior_records()), "a function of the base and the attributes, not of the photos"
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    photos = unpack(torch.cat([a.data.train, a.data.heldout]))[0]
    assert min(float((p - q).abs().mean()) for p in x for q in photos) > 0.01, "a user's photo among the priors"
    # The class token is the frozen base's, whatever the personal part did to the slot token
    bumped = 0
    with active(a.model, [SHARED, PERSONAL], ()), torch.no_grad():
        for name, p in a.model.named_parameters():
            if "slot_proj.lora_B" in name:
                p.add_(0.5)
                bumped += 1
        base_token = a.model.base_model.model.slot_proj.base_layer.weight[:, 0]
        ctx = a.model.base_model.model.context(attrs[:2], torch.tensor([CLASS_SLOT, 0]))
    assert bumped, "no LoRA on slot_proj: the personal part would not touch the slot token"
    assert torch.equal(ctx[0, -1], base_token) and not torch.allclose(ctx[1, -1], base_token)
    # Which records each phase trains on: the private phase the user's, the personal phase both
    seen: list[tuple[bool, int]] = []
    real_train = device_module.train

    def spy(model, params, records, **kw):  # type: ignore[no-untyped-def]
        seen.append((kw["privacy"].private, records.shape[0]))
        return real_train(model, params, records, **kw)

    monkeypatch.setattr(device_module, "train", spy)
    a.fit(a.init_send, server_round=1)
    n = a.data.num_train
    assert seen == [(True, n), (False, n + 5)]
    assert image_task.PRIOR_SEED  # fixed seeds: the same priors every round


def test_prior_images_are_validated() -> None:
    from fedpgen.shared.config import RunConfig

    with pytest.raises(ValueError, match="'prior-images'.*image task only"):
        RunConfig.from_mapping({"prior-images": 4})
    with pytest.raises(ValueError, match="'prior-images'.*>= 0"):
        RunConfig.from_mapping({"prior-images": -1, "task": "image", "data": "synthetic"})
