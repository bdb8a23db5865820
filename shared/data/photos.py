"""A user's photos: ``<user>/faces/*.png|jpg`` and ``<user>/subjects/<name>/*.png|jpg``.

Read on the device only. Every photo is decoded with Pillow, converted to RGB, centre-
cropped to a square and resized to the model's resolution. Skipped and counted, never
fatal: files that are not images (by extension or content), unreadable or truncated
images, images smaller than ``MIN_SIDE`` pixels, and images larger than ``MAX_SIDE``
pixels a side or ``MAX_BYTES`` on disk (decompression bombs included).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

EXTENSIONS = {".png", ".jpg", ".jpeg"}
MIN_SIDE, MAX_SIDE, MAX_BYTES = 16, 4096, 20 * 2**20


def write_photos(folder: Path, photos: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{i:04d}.png")


def load_photo(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    """``(H x W x 3 uint8, "")`` or ``(None, skip reason)``."""
    if path.suffix.lower() not in EXTENSIONS:
        return None, "not-an-image"
    try:
        if path.stat().st_size > MAX_BYTES:
            return None, "huge-image"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if max(w, h) > MAX_SIDE:
                    return None, "huge-image"
                if min(w, h) < MIN_SIDE:
                    return None, "tiny-image"
                img = img.convert("RGB")
                side = min(w, h)
                box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
                img = img.crop(box).resize((size, size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8).copy(), ""
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "huge-image"
    except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for unreadable/truncated files
        log.warning("skipping unreadable photo %s: %s", path.name, exc)
        return None, "unreadable-file"


def read_photos(user_dir: Path, size: int) -> tuple[dict[str, list[np.ndarray]], dict[str, int]]:
    """``({"face": [...], "<subject>": [...]}, skipped counts by reason)``, files in name order."""
    groups: dict[str, list[Path]] = {}
    faces = user_dir / "faces"
    if faces.is_dir():
        groups["face"] = sorted(p for p in faces.iterdir() if p.is_file())
    subjects = user_dir / "subjects"
    if subjects.is_dir():
        for sub in sorted(p for p in subjects.iterdir() if p.is_dir()):
            groups[sub.name] = sorted(p for p in sub.iterdir() if p.is_file())
    out: dict[str, list[np.ndarray]] = {}
    skipped: dict[str, int] = {}
    for name, paths in groups.items():
        for path in paths:
            photo, reason = load_photo(path, size)
            if photo is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                out.setdefault(name, []).append(photo)
    return out, skipped
