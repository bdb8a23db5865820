"""What to search the wire for: byte patterns ("needles") of each user's raw context.

From a user's device folder, read with the project's safe readers (``shared/data/``): the
folder name, each profile value, windows of every document (UTF-8 and as token ids),
behavior logs (item-id sequences as text, as token ids of every integer width, the log
file's bytes), photos (file bytes, decoded pixel rows as uint8 and as the model's float32
inputs). From a device's state-dir, with its key: windows of the personal part's float32
bytes. Windows are spread evenly over the source, so a scan is reproducible.

A needle shorter than :data:`MIN_BYTES` or with fewer than :data:`MIN_DISTINCT` distinct
byte values (a run of zeros, a uniform background row) would match innocent bytes by
chance; it is not searched and is counted as skipped instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.behavior_log import CATALOG_FILE, LOG_FILE, LOG_MAX_BYTES, read_catalog, read_log
from fedpgen.shared.data.photos import EXTENSIONS, load_photo
from fedpgen.shared.data.procedural_faces import SIZE as PHOTO_SIZE
from fedpgen.shared.data.safe_read import PHOTO_MAX_BYTES, UserBudget, list_folder, read_file
from fedpgen.shared.data.user_folder import read_documents, read_profile
from fedpgen.shared.sealing import TamperedStateError
from fedpgen.shared.store import DeviceStore, device_sealer

MIN_BYTES = 6  # a random 6-byte pattern turns up by chance once in ~10^14 bytes
MIN_DISTINCT = 4  # distinct byte values a needle needs
WINDOW = 24  # bytes of a document or file window
TOKENS = 8  # events of a behavior token-id window (a document's token ids: those of its byte window)
INT_WIDTHS = ("<u1", "<i2", "<i4", "<i8")  # little-endian, every width a serializer could pick
FLOATS = 8  # float32 values of a personal-part window
HEADER = 64  # bytes at the start of a photo file: its format's signature and header, the same for many files
PHOTO_WINDOWS = 8  # file windows and pixel rows per photo
SHORT, LOW = f"shorter than {MIN_BYTES} bytes", f"fewer than {MIN_DISTINCT} distinct byte values"


@dataclasses.dataclass(frozen=True)
class Needle:
    """A byte pattern from ``user``'s raw context; ``what`` says where it comes from, never its content."""

    data: bytes
    user: str
    what: str


@dataclasses.dataclass
class Sources:
    """The needles of one user (or device) and what could not be checked."""

    user: str
    needles: list[Needle] = dataclasses.field(default_factory=list)
    searched: dict[str, int] = dataclasses.field(default_factory=dict)  # source -> needles
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # why -> needles not searched
    problems: list[str] = dataclasses.field(default_factory=list)  # "not checked: ..." sentences

    def add(self, source: str, data: bytes, what: str) -> None:
        """Add a needle, or count it as skipped when it would match innocent bytes by chance."""
        why = SHORT if len(data) < MIN_BYTES else LOW if len(set(data)) < MIN_DISTINCT else ""
        if why:
            self.skipped[why] = self.skipped.get(why, 0) + 1
        else:
            self.needles.append(Needle(data, self.user, what))
            self.searched[source] = self.searched.get(source, 0) + 1


def spread(total: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)`` (all of them when fewer)."""
    if total <= 0 or count <= 0:
        return []
    if total <= count:
        return list(range(total))
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, count)})


def tiles(length: int, width: int) -> list[int]:
    """Starts of windows of ``width`` laid side by side over ``length`` items, the last one flush
    with the end: every run of ``2 * width - 1`` items contains a whole window."""
    if length <= width:
        return [0] if length > 0 else []
    starts = list(range(0, length - width + 1, width))
    return starts if starts[-1] == length - width else [*starts, length - width]


def capped(items: list[Any], cap: int) -> list[Any]:
    """``items``, or ``cap`` of them spread evenly when there are more."""
    return items if len(items) <= cap else [items[i] for i in spread(len(items), cap)]


def packed(ids: Iterable[int]) -> Iterable[tuple[str, bytes]]:
    """``ids`` packed little-endian in every integer width they fit."""
    values = np.asarray(list(ids), dtype=np.int64)
    for width in INT_WIDTHS:
        info = np.iinfo(np.dtype(width))
        if values.size and info.min <= values.min() and values.max() <= info.max:
            yield np.dtype(width).name, values.astype(width).tobytes()


def _documents(src: Sources, user_dir: Path, cfg: RunConfig, cap: int) -> None:
    texts, _ = read_documents(user_dir)
    encoded = [t.encode("utf-8") for t in texts]
    if cfg.task == "text" and cfg.base_model:
        from fedpgen.shared.tasks.text_tokenizer import load_tokenizer

        encode = load_tokenizer(Path(cfg.base_model).expanduser()).encode
    else:  # the project's byte-level tokenizer: a token id is a UTF-8 byte
        def encode(text: str) -> list[int]:
            return list(text.encode("utf-8"))
    for d, o in capped([(d, o) for d, raw in enumerate(encoded) for o in tiles(len(raw), WINDOW)], cap):
        window = encoded[d][o : o + WINDOW]
        where = f"document {d + 1}, bytes {o}-{o + len(window)}"
        src.add("documents", window, where)
        for width, data in packed(encode(window.decode("utf-8", errors="ignore"))):
            if data != window:  # byte tokens as uint8 are the window itself
                src.add("documents", data, f"{where} as {width} token ids")


def _behavior(src: Sources, user_dir: Path, cfg: RunConfig, cap: int) -> None:
    if not os.path.lexists(user_dir / LOG_FILE):
        return
    raw, _ = read_file(user_dir / LOG_FILE, cap=LOG_MAX_BYTES, budget=UserBudget())
    if raw is None:
        return
    for o in capped(tiles(len(raw), WINDOW), cap):
        src.add("behavior", raw[o : o + WINDOW], f"{LOG_FILE} bytes {o}-{o + WINDOW}")
    if cfg.task != "behavior":
        return  # item -> token ids come with the behavior base model
    from fedpgen.shared.tasks import get_task
    from fedpgen.shared.tasks.behavior import load_layout

    try:
        base = get_task("behavior").base_model_path(cfg)
        catalog, layout = read_catalog(base / CATALOG_FILE), load_layout(base)
    except (OSError, ValueError) as exc:
        src.problems.append(f"not checked: behavior token ids ({exc})")
        return
    items, _ = read_log(user_dir, {item: i for i, item in enumerate(catalog)})
    for s in capped(tiles(len(items), TOKENS // 2), cap):  # item-id text: 4 events a window
        text = [catalog[i] for i in items[s : s + TOKENS // 2]]
        for sep in (" ", ","):
            src.add("behavior", sep.join(text).encode("utf-8"), f"events {s}-{s + len(text)} as item ids")
    for s in capped(tiles(len(items), TOKENS), cap):
        seq = items[s : s + TOKENS]
        for width, data in packed(layout.item_base + i for i in seq):
            src.add("behavior", data, f"events {s}-{s + len(seq)} as {width} token ids")


def _photos(src: Sources, user_dir: Path, cap: int) -> None:
    files, _, _ = list_folder(user_dir / "faces")
    for sub in list_folder(user_dir / "subjects")[1]:
        files += list_folder(sub)[0]
    for path in capped([f for f in files if f.suffix.lower() in EXTENSIONS], cap):
        name = str(path.relative_to(user_dir))
        raw, _ = read_file(path, cap=PHOTO_MAX_BYTES, budget=UserBudget())
        if raw is not None:  # past the format's header, the same in many files
            for o in capped([HEADER + x for x in tiles(len(raw) - HEADER, 2 * WINDOW)], PHOTO_WINDOWS):
                src.add("photos", raw[o : o + 2 * WINDOW], f"photo {name} file bytes {o}-{o + 2 * WINDOW}")
        pixels, _ = load_photo(path, PHOTO_SIZE)
        if pixels is None:
            continue
        model_input = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0  # as shared.tasks.image_base
        for row in spread(PHOTO_SIZE, PHOTO_WINDOWS):
            src.add("photos", pixels[row].tobytes(), f"photo {name} pixel row {row} (uint8)")
            src.add("photos", model_input[0, row].tobytes(), f"photo {name} pixel row {row} (float32 model input)")


def user_needles(user_dir: Path, cfg: RunConfig, *, name: str | None = None, cap: int = 4096) -> Sources:
    """The needles of one user's device folder.

    Parameters
    ----------
    user_dir
        The user's device folder (read with the safe readers: no symlink followed, caps).
    cfg
        The run's config: the task says how items map to token ids.
    name
        The user's name in the results (default: the folder name).
    cap
        Most windows per source (documents, log bytes, events, photos); beyond it they are
        spread evenly instead of side by side.

    Returns
    -------
    Sources
        The needles, counts by source, and a "not checked" sentence for a missing folder.
    """
    user_dir = Path(user_dir)
    src = Sources(user=name or user_dir.name)
    if not user_dir.is_dir() or user_dir.is_symlink():
        src.problems.append(f"not checked: user folder {user_dir} is missing or not a folder")
        return src
    src.add("folder name", user_dir.name.encode("utf-8"), "folder name")
    profile, _ = read_profile(user_dir)
    for key, value in profile.items():
        src.add("profile", value.encode("utf-8"), f"profile value of {key!r}")
    _documents(src, user_dir, cfg, cap)
    _behavior(src, user_dir, cfg, cap)
    _photos(src, user_dir, max(1, cap // (4 * PHOTO_WINDOWS)))
    if not src.needles:
        src.problems.append(f"not checked: nothing readable in {user_dir}")
    return src


def personal_needles(state_dir: Path, *, user: str, key_file: Path | None = None, cap: int = 4096) -> Sources:
    """Windows of the float32 bytes of a device's personal part (unsealed in memory with its key),
    side by side over each tensor, at most ``cap`` spread evenly over all of them.

    Returns
    -------
    Sources
        The needles, or a "not checked" sentence when the state-dir, its key or its personal
        part is missing or fails authentication.
    """
    src = Sources(user=user)
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        src.problems.append(f"not checked: no device state-dir at {state_dir}")
        return src
    try:
        tensors = DeviceStore(state_dir, device_sealer(state_dir, key_file, create=False)).load_personal()
    except FileNotFoundError as exc:
        src.problems.append(f"not checked: {exc}")
        return src
    except TamperedStateError as exc:
        src.problems.append(f"not checked: the personal part failed authentication ({exc})")
        return src
    if not tensors:
        src.problems.append(f"not checked: no personal part in {state_dir} (this device never trained?)")
        return src
    flat = {name: t.detach().float().cpu().numpy().ravel().astype("<f4") for name, t in sorted(tensors.items())}
    for name, s in capped([(n, s) for n, values in flat.items() for s in tiles(values.size, FLOATS)], cap):
        window = flat[name][s : s + FLOATS]
        src.add("personal part", window.tobytes(), f"personal part {name} elements {s}-{s + window.size} (float32)")
    return src


class NeedleIndex:
    """Finds every needle in a byte string at once: needles of 8 bytes or more are looked up by
    their first 8 bytes in a sorted table (NumPy, every byte offset), shorter ones with ``in``."""

    def __init__(self, needles: Iterable[Needle]) -> None:
        self.short: list[Needle] = []
        self.by_prefix: dict[int, list[Needle]] = {}
        for needle in needles:
            if len(needle.data) >= 8:
                self.by_prefix.setdefault(int.from_bytes(needle.data[:8], "little"), []).append(needle)
            else:
                self.short.append(needle)
        self.prefixes = np.fromiter(sorted(self.by_prefix), dtype=np.uint64, count=len(self.by_prefix))

    def search(self, data: bytes) -> list[Needle]:
        """The needles found in ``data``, each once."""
        found: dict[int, Needle] = {}
        for shift in range(8):
            count = (len(data) - shift) // 8
            if count <= 0 or not self.prefixes.size:
                break
            words = np.frombuffer(data, dtype="<u8", count=count, offset=shift)
            at = np.minimum(np.searchsorted(self.prefixes, words), self.prefixes.size - 1)
            for i in np.flatnonzero(self.prefixes[at] == words):
                start = shift + 8 * int(i)
                for needle in self.by_prefix[int(words[i])]:
                    if data.startswith(needle.data, start):
                        found[id(needle)] = needle
        for needle in self.short:
            if needle.data in data:
                found[id(needle)] = needle
        return list(found.values())
