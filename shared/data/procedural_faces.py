"""Procedural faces with explicit identity parameters, for pre-training, the identity
encoder, simulated users and tests. No photo of anyone is involved.

Identity (what a personal token must learn): face shape, skin tone, eye colour and
spacing, hair colour and style, mouth width, glasses, beard. Nuisance per photo (what
must not matter): position shift, scale, lighting (brightness and a gradient), background
colour, pixel noise. Users' photos may carry a population-wide colour cast that the public
pre-training photos lack: only federation can learn it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIZE = 32
HAIR = {"black": (30, 25, 20), "brown": (110, 70, 35), "blond": (220, 190, 110), "red": (170, 60, 30),
        "grey": (150, 150, 150), "blue": (40, 80, 190)}
SKIN = {"light": (240, 205, 180), "tan": (205, 160, 120), "brown": (150, 100, 70), "dark": (95, 65, 45)}
EYES = ((40, 90, 160), (70, 45, 25), (50, 120, 60), (20, 20, 20))
STYLES = ("short", "long", "bangs", "bald")


@dataclasses.dataclass(frozen=True)
class Identity:
    aspect: float       # face height / width
    skin: str
    eye: int
    eye_gap: float      # eye spacing, fraction of face width
    hair: str
    style: str
    mouth: float        # mouth width, fraction of face width
    glasses: bool
    beard: bool

    def attributes(self) -> dict[str, str]:
        """The prompt-like attributes (what a profile may ask for and the encoder checks)."""
        return {"hair": self.hair, "glasses": "yes" if self.glasses else "no", "beard": "yes" if self.beard else "no"}


def random_identity(rng: np.random.Generator) -> Identity:
    return Identity(aspect=float(rng.uniform(1.05, 1.45)), skin=str(rng.choice(list(SKIN))), eye=int(rng.integers(4)),
                    eye_gap=float(rng.uniform(0.28, 0.46)), hair=str(rng.choice(list(HAIR))),
                    style=str(rng.choice(STYLES)), mouth=float(rng.uniform(0.25, 0.55)),
                    glasses=bool(rng.random() < 0.35), beard=bool(rng.random() < 0.3))


def render(ident: Identity, rng: np.random.Generator, *, cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
           ) -> np.ndarray:
    """One ``SIZE x SIZE x 3`` uint8 photo of ``ident`` with random nuisance."""
    scale = rng.uniform(0.9, 1.1)
    cx, cy = SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-1.5, 2.5)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    bg = rng.uniform(60, 230, 3)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = bg
    w = 8.5 * scale
    h = w * ident.aspect
    face = ((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2 <= 1.0
    hair_c = np.array(HAIR[ident.hair], np.float32)
    if ident.style == "long":  # hair behind the face, down to the shoulders
        back = ((xx - cx) / (w * 1.35)) ** 2 + ((yy - cy + 0.2 * h) / (h * 1.25)) ** 2 <= 1.0
        img[back] = hair_c
    img[face] = SKIN[ident.skin]
    top = ((xx - cx) / (w * 1.08)) ** 2 + ((yy - cy + 0.35 * h) / (h * 0.72)) ** 2 <= 1.0
    if ident.style in {"short", "long", "bangs"}:
        cut = cy - 0.45 * h if ident.style != "bangs" else cy - 0.15 * h
        img[top & (yy < cut)] = hair_c
    if ident.beard:
        img[face & (yy > cy + 0.35 * h)] = hair_c * 0.9
    ey = cy - 0.1 * h
    for side in (-1, 1):
        ex = cx + side * ident.eye_gap * w
        eye = (xx - ex) ** 2 + (yy - ey) ** 2 <= (1.3 * scale) ** 2
        img[eye] = EYES[ident.eye]
        if ident.glasses:
            ring = np.abs(np.sqrt((xx - ex) ** 2 + (yy - ey) ** 2) - 2.6 * scale) <= 0.55
            img[ring] = (15, 15, 15)
    my = cy + 0.45 * h
    mouth = (np.abs(xx - cx) <= ident.mouth * w) & (np.abs(yy - my - 0.08 * (xx - cx) ** 2 / w) <= 0.7)
    img[mouth] = (150, 40, 50)
    light = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(-0.15, 0.15) * (xx - SIZE / 2) / SIZE)
    img = img * light[..., None] * np.asarray(cast, np.float32) + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def population(*, num_identities: int, photos: int, seed: int, public: bool,
               cast: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[tuple[Identity, list[np.ndarray]]]:
    """Identities (public ones and users' ones never coincide: separate seed streams) and their photos."""
    out = []
    for i in range(num_identities):
        rng = np.random.default_rng([seed, 11, int(public), i])
        ident = random_identity(rng)
        out.append((ident, [render(ident, rng, cast=cast) for _ in range(photos)]))
    return out
