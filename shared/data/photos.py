"""A user's photos: ``<user>/faces/*.png|jpg`` and ``<user>/subjects/<name>/*.png|jpg``.

Read on the device only. Every photo is decoded with Pillow (as PNG or JPEG only), converted
to RGB, centre-cropped to a square and resized to the model's resolution. Skipped and
counted, never fatal: files that are not images (by extension or content), unreadable or
truncated images, images smaller than ``MIN_SIDE`` pixels, images larger than ``MAX_SIDE``
pixels a side or ``MAX_BYTES`` on disk (decompression bombs included), and what every user
file is checked for (``shared/data/safe_read.py``): symlinks, empty files, the user's cap.

Faces and subjects are returned apart, so no subject folder name (``subjects/face``
included) can stand in for the user's faces.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fedpgen.shared.data.safe_read import PHOTO_MAX_BYTES, UserBudget, count, list_folder, read_file

log = logging.getLogger(__name__)

EXTENSIONS = {".png", ".jpg", ".jpeg"}
FORMATS = ("PNG", "JPEG")  # the decoders tried, whatever the content claims to be
MIN_SIDE, MAX_SIDE, MAX_BYTES = 16, 4096, PHOTO_MAX_BYTES


def write_photos(folder: Path, photos: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{i:04d}.png")


def load_photo(path: Path, size: int, *, budget: UserBudget | None = None) -> tuple[np.ndarray | None, str]:
    """``(H x W x 3 uint8, "")`` or ``(None, skip reason)``; ``budget`` is charged with the file's bytes."""
    if path.suffix.lower() not in EXTENSIONS:
        return None, "not-an-image"
    raw, reason = read_file(path, cap=MAX_BYTES, budget=budget if budget is not None else UserBudget(),
                            too_large="huge-image")
    if raw is None:
        return None, reason
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=FORMATS) as img:
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
    except Exception as exc:  # Pillow's decoders raise many types on hostile bytes (struct.error, IndexError, ...)
        log.warning("skipping unreadable photo %s: %s", path.name, exc)
        return None, "unreadable-file"


def read_photos(user_dir: Path, size: int, *, budget: UserBudget | None = None
                ) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], dict[str, int]]:
    """``(faces, {subject: photos}, skipped counts by reason)``, files in name order.

    A subject is a folder under ``subjects/`` with at least one usable photo.
    """
    budget = budget if budget is not None else UserBudget()
    face_files, _, skipped = list_folder(user_dir / "faces")
    _, subject_dirs, subject_skipped = list_folder(user_dir / "subjects")
    for reason, n in subject_skipped.items():
        count(skipped, reason, n)

    def load_all(paths: list[Path]) -> list[np.ndarray]:
        photos = []
        for path in paths:
            photo, reason = load_photo(path, size, budget=budget)
            if photo is None:
                count(skipped, reason)
            else:
                photos.append(photo)
        return photos

    face = load_all(face_files)
    subjects: dict[str, list[np.ndarray]] = {}
    for folder in subject_dirs:
        files, _, folder_skipped = list_folder(folder)
        for reason, n in folder_skipped.items():
            count(skipped, reason, n)
        if photos := load_all(files):
            subjects[folder.name] = photos
    return face, subjects, skipped
