"""photos -> images: personalized generation of the user's face (DreamBooth style, DDPM).

Raw context: ``<user>/faces/*.png|jpg`` and ``<user>/subjects/<name>/*`` (read on the
device, ``shared/data/photos.py``), ``profile.json`` attributes as the prompt. A record is
one photo: pixels in [-1, 1], its slot (0: the face, 1..: subjects) and its attribute
tokens, flattened into one float row. The loss is DDPM noise prediction (a fresh timestep
and noise per record: no record's loss depends on another's). Held out: the user's last
face photos by name.

Metrics, per model variant, on ``SAMPLES`` images generated for slot 0 with the profile's
attributes (DDIM, fixed seeds, so variants differ only by their weights):

- ``top1``: share of samples whose nearest identity centroid, among the user's held-out
  photos and ``REF_CHOICES - 1`` unseen public identities, is the user's (chance 1/10);
- ``idsim``: mean cosine to the user's held-out centroid minus the mean cosine to the
  public reference centroids (other users' photos are never on the device);
- ``align``: share of asked attributes (hair, glasses, beard) the encoder finds in the samples;
- ``edit``: share of samples asked for *another* hair colour than the user's (same seeds)
  that show it: instruction alignment beyond the user's own look (DreamBooth's drift);
- ``fd``: Fréchet distance between samples and held-out photos in the encoder's feature
  space, with diagonal covariances (8 samples cannot estimate a full one).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from fedpgen.shared.data import procedural_faces as faces
from fedpgen.shared.data.photos import read_photos, write_photos
from fedpgen.shared.data.safe_read import UserBudget
from fedpgen.shared.data.user_folder import read_profile
from fedpgen.shared.tasks.base import NoUsableDataError, Task, UserData
from fedpgen.shared.tasks.image_base import (
    cached_encoder_quality,
    ensure_encoder,
    ensure_unet,
    load_encoder,
    scheduler,
    to_tensor,
)
from fedpgen.shared.tasks.image_model import (
    ATTR_KEYS,
    ATTR_VOCAB,
    CLASS_SLOT,
    HEADS,
    NUM_SLOTS,
    FaceUNet,
    attribute_tokens,
)

if TYPE_CHECKING:
    from fedpgen.shared.config import RunConfig

PIXELS = 3 * faces.SIZE * faces.SIZE
SAMPLES, SAMPLE_STEPS, REF_CHOICES = 8, 25, 10
PRIOR_SEED = 7_000  # prior-preservation samples: fixed seeds, the same for every user with the same attributes
CELL, LABEL_WIDTH = 64, 104  # report grid: pixels per sample, width of the row labels
ROW_LABELS = {"base": "base", "shared": "shared only", "personal": "shared+personal", "local": "local only"}
USER_CAST = (1.12, 0.97, 0.85)  # a warm cast in every simulated user's photos: a population trait
TARGETS = {"shared": ["to_q", "to_k", "to_v", "to_out.0"], "mlp": ["slot_proj", "ff.net.0.proj", "ff.net.2"],
           "head": ["slot_proj", "proj_out"]}


def pack(photos: list[np.ndarray], slot: int, attrs: list[int]) -> torch.Tensor:
    return _records(to_tensor(photos).reshape(len(photos), PIXELS), slot, attrs)


def _records(x: torch.Tensor, slot: int, attrs: list[int]) -> torch.Tensor:
    """Rows of pixels ``x`` ([n, PIXELS] in [-1, 1]), then the slot, then the attribute tokens."""
    extra = torch.tensor([[float(slot), *map(float, attrs)]]).expand(x.shape[0], -1)
    return torch.cat([x, extra], dim=1)


def unpack(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = records[:, :PIXELS].reshape(-1, 3, faces.SIZE, faces.SIZE)
    return x, records[:, PIXELS].long(), records[:, PIXELS + 1 :].long()


class ImageTask(Task, task="image"):
    val_draws = 8  # the DDPM loss of 2-3 validation photos at one random timestep each is too noisy to stop on

    def __init__(self) -> None:
        self.encoder: Any = None
        self.refs: torch.Tensor | None = None

    # -- models -----------------------------------------------------------------------------
    def base_model_path(self, cfg: RunConfig) -> Path:
        ensure_encoder()  # the metrics' instrument is built with the base, before any device starts
        if cfg.base_model:
            path = Path(cfg.base_model).expanduser()
            unet = path / "unet" if (path / "unet" / "config.json").is_file() else path
            if not (unet / "config.json").is_file():
                raise FileNotFoundError(f"base-model: no diffusers UNet (config.json) at {path} or {path}/unet")
            return path
        return ensure_unet(steps=cfg.pretrain_steps, seed=cfg.seed)

    def load_base(self, path: Path) -> torch.nn.Module:
        unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True)
        if unet.config.in_channels != 3 or unet.config.sample_size != faces.SIZE:
            raise ValueError(f"{unet_dir}: the image task needs a pixel-space UNet ({faces.SIZE}x{faces.SIZE}, "
                             f"3 channels), got {unet.config.in_channels} channels at {unet.config.sample_size}")
        torch.manual_seed(0)
        model = FaceUNet(unet)
        if (path / "wrapper.safetensors").is_file():
            model.load_state_dict(load_file(str(path / "wrapper.safetensors")), strict=False)
        model.requires_grad_(False)
        return model.eval()

    def _load_encoder(self) -> None:
        """Loaded on first evaluation only: a training round (a fresh process per message in a
        deployment) never needs it."""
        if self.encoder is None:
            self.encoder, self.refs = load_encoder(ensure_encoder())

    def instrument(self) -> dict[str, Any]:
        quality = cached_encoder_quality()
        return {"identity-encoder": quality if quality is not None else "not built on this machine"}

    def lora_targets(self, model: torch.nn.Module) -> dict[str, list[str]]:
        return TARGETS

    # -- users ------------------------------------------------------------------------------
    def materialize_users(self, cfg: RunConfig, dest: Path) -> list[Path]:
        pop = faces.population(num_identities=cfg.num_users, photos=cfg.min_records, seed=cfg.seed, public=False,
                               cast=USER_CAST)
        written = []
        for i, (ident, photos) in enumerate(pop):
            user = dest / f"user{i:03d}"
            write_photos(user / "faces", photos)
            (user / "profile.json").write_text(json.dumps(ident.attributes()), encoding="utf-8")
            written.append(user)
        return written

    def read_user(self, user_dir: Path, cfg: RunConfig, *, base_path: Path,
                  bindings: dict[str, Any] | None = None) -> UserData:
        budget = UserBudget()  # one cap for all of this user's files, the profile read first
        profile, skipped = read_profile(Path(user_dir), budget=budget)
        face, subjects, photo_skipped = read_photos(Path(user_dir), faces.SIZE, budget=budget)
        skipped = dict(Counter(skipped) + Counter(photo_skipped))
        if len(face) < 3:
            raise NoUsableDataError(f"user {Path(user_dir).name}: {len(face)} usable face photos (need >= 3); "
                                    f"skipped {skipped or 'nothing'}")
        slots = subject_slots(subjects, (bindings or {}).get("subject-slots", {}))
        if extra := [name for name in subjects if name not in slots]:
            skipped["extra-subject"] = len(extra)
        n_held = max(1, round(len(face) * cfg.heldout_fraction))
        n_val = round((len(face) - n_held) * cfg.val_fraction)
        n_train = len(face) - n_held - n_val
        attrs = attribute_tokens(profile)
        train = [pack(face[:n_train], 0, attrs)]
        for name, slot in slots.items():
            if name in subjects:  # a trained subject without usable photos now keeps its slot, unused
                train.append(pack(subjects[name], slot, [0] * len(ATTR_KEYS)))
        val = pack(face[n_train : n_train + n_val], 0, attrs) if n_val else torch.zeros(0, PIXELS + 1 + len(attrs))
        return UserData(train=torch.cat(train), val=val, heldout=pack(face[n_train + n_val :], 0, attrs),
                        skipped=skipped, bindings={"subject-slots": slots})

    def prior_records(self, model: torch.nn.Module, data: UserData, cfg: RunConfig) -> torch.Tensor | None:
        """``prior-images`` faces of "a person" with the user's attributes, hair cycling over every
        colour, sampled by the frozen base (adapters off, fixed seeds) and recorded for the class
        token (``CLASS_SLOT``): DreamBooth's prior preservation. Nothing of the user's photos is in
        them; the profile attributes (the prompt) are the only input from the device."""
        if cfg.prior_images <= 0:
            return None
        _, slots, attrs = unpack(data.train)
        own = attrs[slots == 0][0] if bool((slots == 0).any()) else torch.zeros(len(ATTR_KEYS), dtype=torch.long)
        hair = [i + 1 for i, v in enumerate(ATTR_VOCAB) if v.startswith("hair=")]
        rows = []
        with model.disable_adapter():
            for i, token in enumerate(hair):
                n = cfg.prior_images // len(hair) + (i < cfg.prior_images % len(hair))
                if n:
                    asked = own.clone()
                    asked[0] = token
                    images = self.sample(model, asked, slot=0, n=n, seed=PRIOR_SEED + i).float().cpu()
                    rows.append(_records(images.reshape(n, PIXELS), CLASS_SLOT, asked.tolist()))
        return torch.cat(rows)

    # -- loss, sampling, metrics ------------------------------------------------------------
    def per_record_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        x, slot, attrs = unpack(batch)
        sched = scheduler()
        noise = torch.randn_like(x)
        t = torch.randint(0, sched.config.num_train_timesteps, (x.shape[0],), device=x.device)
        pred = model(sched.add_noise(x, noise, t), t, attrs, slot)
        return ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, attrs: torch.Tensor, slot: int = 0, n: int = SAMPLES,
               seed: int = 1234) -> torch.Tensor:
        """``n`` images in [-1, 1] for ``slot`` with attribute tokens ``attrs`` (DDIM, fixed seed)."""
        device = next(model.parameters()).device
        ddim = DDIMScheduler.from_config(scheduler().config)
        ddim.set_timesteps(SAMPLE_STEPS)
        x = torch.randn((n, 3, faces.SIZE, faces.SIZE), generator=torch.Generator().manual_seed(seed)).to(device)
        a = attrs.reshape(1, -1).expand(n, -1).to(device)
        s = torch.full((n,), slot, dtype=torch.long, device=device)
        for t in ddim.timesteps:
            eps = model(x, t.to(device).expand(n), a, s).float()
            x = ddim.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    def metrics(self, model: torch.nn.Module, records: torch.Tensor) -> dict[str, float]:
        return self.evaluate(model, records)[0]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, records: torch.Tensor,
                 memory: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
        """The metrics, and the samples they were measured on (for the grid)."""
        self._load_encoder()
        real, _, attrs = unpack(records)
        gen = self.sample(model, attrs[0])
        enc = self.encoder.to(gen.device)
        zg, zr = enc.embed(gen.float()), enc.embed(real.float())
        own = F.normalize(zr.mean(0), dim=0)
        refs = self.refs.to(gen.device)
        choices = torch.cat([own[None], refs[: REF_CHOICES - 1]])
        top1 = float(((zg @ choices.T).argmax(1) == 0).float().mean())
        idsim = float((zg @ own).mean() - (zg @ refs.T).mean())
        asked = {k: int(v) for k, v in zip(ATTR_KEYS, attrs[0].tolist(), strict=True)}
        found = enc.attributes(gen.float())
        hits = [float((found[k].argmax(1) == _head_index(k, token)).float().mean())
                for k, token in asked.items() if token > 0]
        mu_g, mu_r = zg.mean(0), zr.mean(0)
        var_g, var_r = zg.var(0, unbiased=False), zr.var(0, unbiased=False)
        fd = float(((mu_g - mu_r) ** 2).sum() + (var_g + var_r - 2 * (var_g * var_r).sqrt()).sum())
        # Instruction alignment beyond the user's own look: ask for another hair colour (same seeds).
        edited = attrs[0].clone()
        edited[0] = edit_hair_token(int(attrs[0][0]))
        hair = enc.attributes(self.sample(model, edited).float())["hair"].argmax(1)
        edit = float((hair == _head_index("hair", int(edited[0]))).float().mean())
        scores = {"top1": top1, "idsim": idsim, "align": sum(hits) / len(hits) if hits else float("nan"), "fd": fd,
                  "edit": edit}
        return scores, gen.cpu()

    def render_report(self, parts: dict[str, Any], records: torch.Tensor) -> bytes | None:
        """A PNG grid, one labelled row each: the held-out photos, then the samples of each variant."""
        real, _, _ = unpack(records)
        named = [("held-out photos", real[:SAMPLES])] + [(ROW_LABELS.get(v, v), x) for v, x in parts.items()
                                                        if x is not None]
        rows = [x for _, x in named]
        width = max(r.shape[0] for r in rows)
        grid = torch.ones(len(rows), width, 3, faces.SIZE, faces.SIZE)
        for i, row in enumerate(rows):
            grid[i, : row.shape[0]] = row.cpu()
        img = ((grid.permute(0, 3, 1, 4, 2).reshape(len(rows) * faces.SIZE, width * faces.SIZE, 3) + 1) * 127.5)
        tiles = Image.fromarray(img.clamp(0, 255).byte().numpy()).resize((width * CELL, len(rows) * CELL),
                                                                         Image.NEAREST)
        canvas = Image.new("RGB", (LABEL_WIDTH + tiles.width, tiles.height), "white")
        canvas.paste(tiles, (LABEL_WIDTH, 0))
        draw = ImageDraw.Draw(canvas)
        for i, (label, _) in enumerate(named):
            draw.text((6, i * CELL + CELL // 2 - 6), label, fill="black")
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, base_path: Path, prompt: str, **kwargs: Any) -> str:
        """Generate images into ``kwargs['dest']`` and return its path: of the user's face with the
        attributes of ``prompt`` (``hair=red glasses=yes``; unset keys from ``kwargs['profile']``),
        or of the subject ``kwargs['subject']`` (a folder name under the user's ``subjects/``)."""
        subject = kwargs.get("subject")
        if subject:
            slots = dict(kwargs.get("bindings", {}).get("subject-slots", {}))
            if subject not in slots:
                raise ValueError(f"no trained subject {subject!r} for this user; trained subjects: "
                                 f"{', '.join(slots) or 'none'} (up to {NUM_SLOTS - 1} folders under subjects/)")
            slot, profile = slots[subject], {}
        else:
            slot = 0
            profile = {**kwargs.get("profile", {}), **parse_attributes(prompt)}
        images = self.sample(model, torch.tensor(attribute_tokens(profile)), slot=slot,
                             n=int(kwargs.get("n", 4)), seed=int(kwargs.get("seed", 0)))
        dest = Path(kwargs.get("dest", "samples"))
        write_photos(dest, [((x.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy() for x in images])
        return str(dest)


def parse_attributes(prompt: str) -> dict[str, str]:
    """``"hair=red glasses=yes"`` -> attributes; an unknown key or value is an error that lists the valid ones."""
    out = {}
    for word in prompt.split():
        key, _, value = word.partition("=")
        if f"{key}={value}" not in ATTR_VOCAB:
            raise ValueError(f"unknown attribute {word!r}; valid: {' '.join(ATTR_VOCAB)}")
        out[key] = value
    return out


def edit_hair_token(token: int) -> int:
    """The hair token an edit asks for: the next colour after the user's own (the first if none)."""
    hair = [i + 1 for i, v in enumerate(ATTR_VOCAB) if v.startswith("hair=")]
    return hair[(hair.index(token) + 1) % len(hair)] if token in hair else hair[0]


def subject_slots(subjects: dict[str, list[np.ndarray]], kept: dict[str, int]) -> dict[str, int]:
    """The subject-token slot of each subject with usable photos (slot 0 is the face).

    ``subjects``: the user's subjects by folder name (any name, ``face`` included: the faces
    are read apart). ``kept``: the map this device trained with so far; its subjects keep
    their slots (even when their photos are gone for now), so a new folder never takes over a
    trained token. New subjects take the free slots in name order; the rest are extra
    (counted, unused)."""
    slots = {name: int(slot) for name, slot in kept.items()}
    free = [s for s in range(1, NUM_SLOTS) if s not in slots.values()]
    for name in sorted(n for n in subjects if n not in slots)[: len(free)]:
        slots[name] = free.pop(0)
    return slots


def _head_index(key: str, token: int) -> int:
    """The attribute head's class index for vocabulary token ``token`` (1-based) of ``key``."""
    value = ATTR_VOCAB[token - 1].split("=", 1)[1]
    return HEADS[key].index(value)
