"""Every reader of a user's folder is total, fuzzed with hostile folders (Hypothesis).

Whatever a folder holds (random bytes, random JSON with deep nesting, huge numbers and
NaN/Infinity literals, text that is not UTF-8, empty and oversized files, symlinks to files
and folders outside it, dangling or looping symlinks, FIFOs, odd file names), a reader
returns what it could use and skip counts by reasons from ``shared.wire.SKIP_REASONS``, and
never raises; a task's ``read_user`` raises nothing but ``NoUsableDataError``. The files
outside the user folder that symlinks point to carry a secret that must never come back.

Examples per test: read_documents 150, read_profile 150, read_log 150, read_photos 100,
and read_user 50 for each task (text, behavior, image): 700 folders in all.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TASK_CASES, TINY
from fedpgen.shared.config import RunConfig
from fedpgen.shared.data.behavior_log import CATALOG_FILE, LOG_FILE, read_log, write_catalog
from fedpgen.shared.data.photos import read_photos
from fedpgen.shared.data.safe_read import USER_MAX_BYTES, UserBudget
from fedpgen.shared.data.user_folder import PROFILE_FILE, read_documents, read_profile
from fedpgen.shared.tasks import NoUsableDataError, get_task
from fedpgen.shared.tasks.behavior import LAYOUT_FILE, Layout
from fedpgen.shared.tasks.text_tokenizer import ByteTokenizer
from fedpgen.shared.wire import SKIP_REASONS

SIZE = 32  # photos are read at the image model's resolution
SECRET = "SECRET-9f2c41"  # in every file outside the user folder; never read through a symlink
CATALOG = [f"i{k:04d}" for k in range(20)]
INDEX = {item: k for k, item in enumerate(CATALOG)} | {SECRET: len(CATALOG)}
OVERSIZED = USER_MAX_BYTES + 1  # a sparse file over every per-file cap


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


_rng = np.random.default_rng(0)
GOOD_PHOTO = png(_rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
SECRET_PHOTO = np.full((SIZE, SIZE, 3), (255, 0, 255), np.uint8)  # no generated photo is this magenta
PHOTOS = [GOOD_PHOTO, png(_rng.integers(0, 255, (48, 40, 3), dtype=np.uint8), "JPEG"),
          png(np.zeros((8, 8, 3), np.uint8)), png(np.zeros((20, 5000, 3), np.uint8)), GOOD_PHOTO[:60],
          b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, png(np.zeros((32, 32), np.uint8), "TIFF"),
          png(np.zeros((32, 32, 3), np.uint8), "BMP")]
DOCUMENT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 6).encode()


def fuzz(examples: int) -> settings:
    """Hypothesis settings: ``examples`` folders, no per-example deadline (file systems vary),
    no example database (failures are not replayed from disk: a run is its own record)."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pick(values: list[Any]) -> st.SearchStrategy[Any]:
    """``sampled_from(values)`` that draws an index: the strategy's repr stays short with large values."""
    def value(i: int) -> Any:
        return values[i]

    return st.sampled_from(range(len(values))).map(value)


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def event(item: str, ts: Any) -> str:
    return json.dumps({"item": item, "ts": ts, "event": "play"})


GOOD_LOG = "\n".join(event(CATALOG[k % len(CATALOG)], k) for k in range(40)).encode()


# -- what a file may hold ------------------------------------------------------------------
JSON_LEAF = (st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats() | st.text(max_size=12))


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)


JSON = st.recursive(JSON_LEAF, _containers, max_leaves=10)
ODD_BYTES = [b"", b" \n\t \n", b"\xff\xfe\x00\x01", "café crème".encode("latin-1"), b"\x00" * 16,
             b'{"a": NaN}', b'{"a": Infinity, "b": -Infinity}', b"1" * 5000, b"\xef\xbb\xbf{}",
             b'{"a": 1e400}', b'{"a": ' + b"9" * 4000 + b"}", deep(30_000), b"{" * 2000,
             json.dumps({"name": "Margaret Holloway", "occupation": "retired schoolteacher", "city": "Portland",
                         "interests": "gardening, birdwatching, mystery novels", "tone": "warm"}).encode()]
CONTENT = st.one_of(
    st.binary(max_size=200),
    pick(ODD_BYTES),
    st.text(max_size=200).map(str.encode),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 50_000).map(deep),
    pick(PHOTOS),
    pick([DOCUMENT]),
)
LOG_LINE = st.one_of(
    st.builds(event, st.sampled_from(CATALOG + ["unknown"]), st.integers(0, 10**6)),
    st.builds(event, st.sampled_from(CATALOG + ["", "unknown", "i9999"]),
              st.one_of(st.floats(), st.integers(-10**30, 10**30), st.text(max_size=12), st.booleans(), st.none())),
    pick(['{"item": "i0001", "ts": Infinity}', '{"item": "i0001", "ts": NaN}', '{"item": 3, "ts": 1}',
                     '{"item": "i0001", "ts": "1700000000"}', '{"item": "i0001", "ts": 1e400}', "[]", "null",
                     '{"item": "i0001", "ts": ' + "9" * 5000 + "}"]),
    JSON.map(json.dumps),
    st.integers(1, 50_000).map(lambda d: deep(d).decode()),
    st.text(max_size=60),
)
LOG = st.one_of(CONTENT, st.lists(LOG_LINE, max_size=40).map(lambda lines: "\n".join(lines).encode()),
                pick([GOOD_LOG]))

# -- names and kinds of entries ------------------------------------------------------------
ODD_NAMES = ["a", " ", "-", "..txt", ".hidden", "x" * 200, "new\nline", "tab\tname", "ünïcødé", "😀",
             os.fsdecode(b"\xff\xfe-not-utf8"), "*?<>|", "back\\slash", "face", "profile.json", "CON"]
STEM = st.one_of(st.sampled_from(ODD_NAMES),
                 st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                         min_size=1, max_size=16))
NAME = st.builds(lambda stem, suffix: stem + suffix, STEM,
                 st.sampled_from(["", ".txt", ".png", ".jpg", ".JPEG", ".json"])).filter(lambda n: n not in {".", ".."})
FILE_KINDS = ["file"] * 6 + ["link-secret", "link-dir", "dangling", "loop", "dir", "fifo", "oversized"]
ENTRIES = st.lists(st.tuples(st.sampled_from(FILE_KINDS), NAME, CONTENT), max_size=6, unique_by=lambda e: e[1])
FOLDER = st.one_of(st.tuples(st.just("dir"), ENTRIES),
                   st.tuples(st.sampled_from(["absent", "link-dir", "file", "dangling"]), st.just([])))
ONE_FILE = st.tuples(st.sampled_from(FILE_KINDS + ["absent"]), CONTENT)
BUDGET = st.one_of(st.none(), st.integers(0, 3000))


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid user folder outside the fuzzed ones, full of the secret: what symlinks point to."""
    root = tmp_path_factory.mktemp("outside")
    (root / "documents").mkdir()
    (root / "documents" / "secret.txt").write_text(f"{SECRET} " * 40)
    (root / PROFILE_FILE).write_text(json.dumps({"secret": SECRET}))
    (root / LOG_FILE).write_text("\n".join(event(SECRET, k) for k in range(40)))
    for folder in (root / "faces", root / "subjects" / "secret"):
        folder.mkdir(parents=True)
        for i in range(4):
            (folder / f"{i}.png").write_bytes(png(SECRET_PHOTO))
    return root


def put(path: Path, kind: str, content: bytes, *, secret_file: Path, secret_dir: Path) -> None:
    """Create one entry of a hostile folder."""
    if kind == "file":
        path.write_bytes(content)
    elif kind == "oversized":
        with open(path, "wb") as f:
            f.truncate(OVERSIZED)
    elif kind == "link-secret":
        path.symlink_to(secret_file)
    elif kind == "link-dir":
        path.symlink_to(secret_dir, target_is_directory=True)
    elif kind == "dangling":
        path.symlink_to(path.parent / "no-such-file")
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)


def put_folder(path: Path, folder: tuple[str, list], *, secret_file: Path, secret_dir: Path) -> None:
    kind, entries = folder
    if kind == "absent":
        return
    if kind != "dir":
        put(path, kind, DOCUMENT, secret_file=secret_file, secret_dir=secret_dir)
        return
    path.mkdir(parents=True)
    for entry_kind, name, content in entries:
        put(path / name, entry_kind, content, secret_file=secret_file, secret_dir=secret_dir)


def budget_of(total: int | None) -> UserBudget:
    return UserBudget() if total is None else UserBudget(total)


def assert_counts(skipped: dict[str, int]) -> None:
    """Skip counts: reasons the wire knows, each a positive int (listed only when it happened)."""
    assert set(skipped) <= set(SKIP_REASONS), f"reasons outside SKIP_REASONS: {set(skipped) - set(SKIP_REASONS)}"
    assert all(type(n) is int and n > 0 for n in skipped.values()), skipped


def assert_photos(photos: list[np.ndarray]) -> None:
    for photo in photos:
        assert photo.shape == (SIZE, SIZE, 3) and photo.dtype == np.uint8
        assert not np.array_equal(photo, SECRET_PHOTO), "a photo was read through a symlink"


@fuzz(150)
@given(documents=FOLDER, total=BUDGET)
def test_read_documents_never_raises_and_counts_every_skip(outside: Path, documents: tuple, total: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare
        user = Path(tmp) / "user"
        user.mkdir()
        put_folder(user / "documents", documents, secret_file=outside / "documents" / "secret.txt",
                   secret_dir=outside / "documents")
        # Execute
        texts, skipped = read_documents(user, budget=budget_of(total))
        # Assert
        assert_counts(skipped)
        assert all(isinstance(t, str) and t.strip() and SECRET not in t for t in texts)


@fuzz(150)
@given(profile=ONE_FILE, total=BUDGET)
def test_read_profile_never_raises_and_keeps_only_scalars(outside: Path, profile: tuple, total: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare
        user = Path(tmp) / "user"
        user.mkdir()
        if profile[0] != "absent":
            put(user / PROFILE_FILE, *profile, secret_file=outside / PROFILE_FILE, secret_dir=outside)
        # Execute
        values, skipped = read_profile(user, budget=budget_of(total))
        # Assert
        assert_counts(skipped)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
        assert SECRET not in values.values()


@fuzz(150)
@given(kind=st.sampled_from(FILE_KINDS + ["absent"]), content=LOG, total=BUDGET)
def test_read_log_never_raises_and_returns_catalog_indices(outside: Path, kind: str, content: bytes,
                                                          total: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare
        user = Path(tmp) / "user"
        user.mkdir()
        if kind != "absent":
            put(user / LOG_FILE, kind, content, secret_file=outside / LOG_FILE, secret_dir=outside)
        # Execute
        items, skipped = read_log(user, INDEX, budget=budget_of(total))
        # Assert
        assert_counts(skipped)
        assert all(type(i) is int and 0 <= i < len(CATALOG) for i in items), "an index outside the catalog"
        assert bool(items) != ("empty-log" in skipped)


@fuzz(100)
@given(faces=FOLDER, subjects=st.one_of(st.tuples(st.just("dir"), st.lists(st.tuples(NAME, FOLDER), max_size=3,
                                                                             unique_by=lambda s: s[0])),
                                        st.tuples(st.sampled_from(["absent", "link-dir", "file"]), st.just([]))),
       total=BUDGET)
def test_read_photos_never_raises_and_returns_model_sized_photos(outside: Path, faces: tuple, subjects: tuple,
                                                                  total: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare
        user = Path(tmp) / "user"
        user.mkdir()
        links = {"secret_file": outside / "faces" / "0.png", "secret_dir": outside / "faces"}
        put_folder(user / "faces", faces, **links)
        kind, folders = subjects
        if kind == "dir":
            (user / "subjects").mkdir()
            for name, folder in folders:
                put_folder(user / "subjects" / name, folder, **links)
        elif kind != "absent":
            put(user / "subjects", kind, b"", secret_file=links["secret_file"], secret_dir=outside / "subjects")
        # Execute
        face, by_subject, skipped = read_photos(user, SIZE, budget=budget_of(total))
        # Assert
        assert_counts(skipped)
        assert_photos(face)
        assert all(isinstance(name, str) and photos for name, photos in by_subject.items())
        for photos in by_subject.values():
            assert_photos(photos)


# -- a task's read_user: the readers together, then records --------------------------------
TASK_OVERRIDES = {**TASK_CASES,
                  "image": {"task": "image", "min-records": 12, "heldout-fraction": 0.25, "val-fraction": 0.0}}


@pytest.fixture(scope="module")
def stand_in_bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What each task's read_user reads from its base folder, without a model: the byte
    tokenizer (text), the token layout and catalog (behavior), nothing (image)."""
    root = tmp_path_factory.mktemp("bases")
    for name in TASK_OVERRIDES:
        (root / name).mkdir()
    ByteTokenizer().save(root / "text")
    layout = Layout(num_items=len(CATALOG), seq_len=TASK_OVERRIDES["behavior"]["seq-len"])
    (root / "behavior" / LAYOUT_FILE).write_text(json.dumps(dataclasses.asdict(layout)))
    write_catalog(root / "behavior" / CATALOG_FILE, [{"item": item} for item in CATALOG])
    return root


@pytest.mark.parametrize("task_name", sorted(TASK_OVERRIDES))
@fuzz(50)
@given(good=st.booleans(), profile=ONE_FILE, documents=FOLDER, log=st.tuples(st.sampled_from(FILE_KINDS), LOG),
       faces=FOLDER)
def test_read_user_raises_nothing_but_no_usable_data(outside: Path, stand_in_bases: Path, task_name: str,
                                                     good: bool, profile: tuple, documents: tuple, log: tuple,
                                                     faces: tuple) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Prepare: a hostile folder with every part, on top of enough good data or none
        user = Path(tmp) / "users" / "user"
        user.mkdir(parents=True)
        links = {"secret_file": outside / "documents" / "secret.txt", "secret_dir": outside / "documents"}
        put_folder(user / "documents", documents, **links)
        put_folder(user / "faces", faces, **links)
        if profile[0] != "absent":
            put(user / PROFILE_FILE, *profile, **links)
        log_kind, log_content = log
        put(user / LOG_FILE, log_kind, GOOD_LOG + b"\n" + log_content if good else log_content, **links)
        if good:
            for folder in (user / "documents", user / "faces"):
                if not folder.is_symlink() and not folder.exists():
                    folder.mkdir()
            if (user / "documents").is_dir() and not (user / "documents").is_symlink():
                (user / "documents" / "~good.txt").write_bytes(DOCUMENT * 3)
            if (user / "faces").is_dir() and not (user / "faces").is_symlink():
                for i in range(4):
                    (user / "faces" / f"~good{i}.png").write_bytes(GOOD_PHOTO)
        cfg = RunConfig.from_mapping({**TINY, **TASK_OVERRIDES[task_name], "data": "dir",
                                      "data-dir": str(user.parent), "run-dir": str(Path(tmp) / "run")})
        task = get_task(task_name)
        # Execute
        try:
            data = task.read_user(user, cfg, base_path=stand_in_bases / task_name)
        except NoUsableDataError:
            return
        # Assert
        assert_counts(data.skipped)
        assert data.num_train > 0 and data.heldout.shape[0] > 0
