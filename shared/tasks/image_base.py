"""The image task's built-in models: a conditional UNet and an identity encoder, both trained
by the project on *public* procedural identities no user owns, cached by settings hash.

UNet pre-training: DDPM noise prediction, context = attribute tokens (randomly dropped)
plus a per-identity token from a table that is discarded afterwards; every slot token of
``slot_proj`` starts at the table's mean (an "average person" the personal part moves).
Encoder: cosine classifier over the public identities plus attribute heads, with colour
(per-channel gain, which covers the users' colour cast) and lighting augmentation. Its
quality on *unseen* public identities is measured and stored (``encoder.json``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from fedpgen.shared.data import procedural_faces as faces
from fedpgen.shared.tasks.cache import MARKER, cached_path, ensure_built
from fedpgen.shared.tasks.pretraining import pretrain_loop
from fedpgen.shared.tasks.image_model import ATTR_KEYS, HEADS, NUM_SLOTS, UNET, FaceUNet, IdentityEncoder, attribute_tokens

log = logging.getLogger(__name__)

PUBLIC_IDS, PUBLIC_PHOTOS = 200, 10
PROBE_IDS, REF_IDS = 40, 20  # unseen public identities: encoder quality, and the "others" on devices
BATCH, LR = 32, 2e-3
ENCODER_BATCH, ENCODER_STEPS, ENCODER_SEED = 64, 600, 0


def to_tensor(photos: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.asarray(photos)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _public(seed: int, ids: int, photos: int, offset: int = 0) -> list[tuple[faces.Identity, list[np.ndarray]]]:
    return faces.population(num_identities=ids, photos=photos, seed=seed + offset, public=True)


def ensure_unet(*, steps: int, seed: int) -> Path:
    key = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()}, "steps": steps,
           "seed": seed, "ids": [PUBLIC_IDS, PUBLIC_PHOTOS], "batch": BATCH, "lr": LR, "v": 1}
    return ensure_built("image-unet", key, lambda dest: pretrain_unet(dest, steps=steps, seed=seed))


def ensure_encoder(*, seed: int = ENCODER_SEED, steps: int = ENCODER_STEPS) -> Path:
    """The identity encoder: one fixed measuring instrument for every run (not the run's seed
    or settings), so that runs are compared with the same ruler."""
    return ensure_built("image-encoder", _encoder_key(seed, steps), lambda dest: train_encoder(dest, seed=seed,
                                                                                             steps=steps))


def _encoder_key(seed: int, steps: int) -> dict[str, object]:
    return {"ids": [PUBLIC_IDS, PUBLIC_PHOTOS, PROBE_IDS, REF_IDS], "steps": steps, "seed": seed, "v": 1}


def cached_encoder_quality() -> dict[str, float] | None:
    """The identity encoder's measured quality (``encoder.json``) if it is built here, else None."""
    path = cached_path("image-encoder", _encoder_key(ENCODER_SEED, ENCODER_STEPS)) / "encoder.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pretrain_unet(dest: Path, *, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    pop = _public(seed, PUBLIC_IDS, PUBLIC_PHOTOS)
    images = to_tensor([p for _, photos in pop for p in photos])
    ids = torch.tensor([i for i, (_, photos) in enumerate(pop) for _ in photos])
    attrs = torch.tensor([attribute_tokens(ident.attributes()) for ident, photos in pop for _ in photos])
    model = FaceUNet()
    table = torch.nn.Embedding(len(pop), model.unet.config.cross_attention_dim)
    noise_sched = scheduler()
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()

    def loss_fn() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (BATCH,), generator=gen)
        x = images[idx]
        a = attrs[idx] * (torch.rand(BATCH, len(ATTR_KEYS), generator=gen) > 0.2)  # drop some attributes
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (BATCH,), generator=gen)
        pred = model(noise_sched.add_noise(x, noise, t), t, a, torch.zeros(BATCH, dtype=torch.long),
                     identity=table(ids[idx]))
        return F.mse_loss(pred, noise)

    loss = pretrain_loop([*model.parameters(), *table.parameters()], loss_fn, steps=steps, lr=LR,
                         description="pre-training the image UNet", weight_decay=0.0)
    with torch.no_grad():  # every slot starts as the average public identity
        model.slot_proj.weight.copy_(table.weight.mean(0, keepdim=True).T.expand(-1, NUM_SLOTS))
    dest.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(dest / "unet")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("unet.")},
              str(dest / "wrapper.safetensors"))
    meta = {"steps": steps, "seed": seed, "final_loss": loss, "seconds": time.perf_counter() - started,
            "parameters": sum(p.numel() for p in model.parameters())}
    (dest / MARKER).write_text(json.dumps(meta, indent=2))
    log.info("pre-trained the image UNet: %d steps, final loss %.4f", steps, loss)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour gain per channel, brightness, a shift of up to 2 pixels."""
    n = x.shape[0]
    gain = 1.0 + 0.3 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    bright = 0.2 * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    x = ((x + 1) * gain - 1) + bright
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)).clamp(-1, 1)


def train_encoder(dest: Path, *, seed: int, steps: int) -> None:
    """Train the identity encoder, the image metrics' measuring instrument, and store it.

    Its own loop, not ``pretrain_loop``: this recipe (constant learning rate, no warm-up,
    decay or gradient clipping) is the one the encoder's reported quality and every image
    result were measured with; another schedule would change the instrument
    (docs/architecture.md, "Training loops").
    """
    torch.manual_seed(seed)
    pop = _public(seed, PUBLIC_IDS, PUBLIC_PHOTOS)
    images = to_tensor([p for _, photos in pop for p in photos])
    ids = torch.tensor([i for i, (_, photos) in enumerate(pop) for _ in photos])
    labels = {k: torch.tensor([HEADS[k].index(ident.attributes()[k]) for ident, photos in pop for _ in photos])
              for k in HEADS}
    enc = IdentityEncoder(num_ids=len(pop))
    opt = torch.optim.AdamW(enc.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (ENCODER_BATCH,), generator=gen)
        x = augment(images[idx], gen)
        z = enc.features(x)
        logits = 16.0 * F.normalize(z, dim=-1) @ F.normalize(enc.classes, dim=-1).T
        loss = F.cross_entropy(logits, ids[idx])
        loss = loss + sum(F.cross_entropy(head(z), labels[k][idx]) for k, head in enc.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    quality = encoder_quality(enc, _public(seed, PROBE_IDS, 8, offset=1000))
    refs = _public(seed, REF_IDS, 8, offset=2000)
    with torch.no_grad():
        centroids = torch.stack([F.normalize(enc.embed(to_tensor(p)).mean(0), dim=0) for _, p in refs])
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(dest / "encoder.safetensors"))
    save_file({"centroids": centroids.contiguous()}, str(dest / "refs.safetensors"))
    (dest / "encoder.json").write_text(json.dumps({"num_ids": len(pop), "steps": steps, **quality}, indent=2))
    (dest / MARKER).write_text(json.dumps({"seed": seed, **quality}, indent=2))
    log.info("identity encoder on unseen public identities: %s", quality)


@torch.no_grad()
def encoder_quality(enc: IdentityEncoder, pop: list[tuple[faces.Identity, list[np.ndarray]]]) -> dict[str, float]:
    """Same-identity vs other-identity cosine, and top-1 identification (probe photos against
    gallery centroids of other photos of the same unseen identities; chance = 1 / identities)."""
    half = len(pop[0][1]) // 2
    gallery = torch.stack([F.normalize(enc.embed(to_tensor(p[:half])).mean(0), dim=0) for _, p in pop])
    probes = torch.cat([enc.embed(to_tensor(p[half:])) for _, p in pop])
    truth = torch.tensor([i for i, (_, p) in enumerate(pop) for _ in p[half:]])
    sims = probes @ gallery.T
    same = sims[torch.arange(len(truth)), truth]
    other = (sims.sum(1) - same) / (len(pop) - 1)
    return {"same_cos": float(same.mean()), "other_cos": float(other.mean()),
            "top1": float((sims.argmax(1) == truth).float().mean()), "chance": 1.0 / len(pop),
            "identities": len(pop)}


def load_encoder(path: Path) -> tuple[IdentityEncoder, torch.Tensor]:
    """The frozen encoder and the public reference centroids (its quality: ``cached_encoder_quality``)."""
    info = json.loads((path / "encoder.json").read_text())
    enc = IdentityEncoder(num_ids=int(info["num_ids"]))
    enc.load_state_dict(load_file(str(path / "encoder.safetensors")))
    enc.requires_grad_(False)
    return enc.eval(), load_file(str(path / "refs.safetensors"))["centroids"]
