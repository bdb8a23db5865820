"""Bad input: a clear error or a counted skip, never a traceback or a silent default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.device import Device
from shared.data.user_folder import list_user_dirs, read_documents, read_profile


def write_docs(user: Path, n: int = 12) -> None:
    (user / "documents").mkdir(parents=True)
    for i in range(n):
        (user / "documents" / f"{i:03d}.txt").write_text(f"doc {i} of {user.name}: " + "the quick brown fox " * 8)


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path: Path) -> None:
    user = tmp_path / "alice"
    write_docs(user)
    (user / "documents" / "photo.txt").write_bytes(b"\x89PNG\x00\x00\x01binary")
    (user / "documents" / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (user / "documents" / "notes.docx").write_bytes(b"PK\x03\x04")
    texts, skipped = read_documents(user)
    assert len(texts) == 12 and skipped == 3


def test_malformed_profile_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_text("{not json")
    assert read_profile(tmp_path) == ({}, 1)
    (tmp_path / "profile.json").write_text(json.dumps({"tone": "formal"}))
    assert read_profile(tmp_path) == ({"tone": "formal"}, 0)


def test_missing_or_empty_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data dir not found"):
        list_user_dirs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no user folders"):
        list_user_dirs(tmp_path / "empty")


def test_empty_user_folder_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "users" / "bob").mkdir(parents=True)
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"))
    with pytest.raises(ValueError, match="user bob: 0 usable records"):
        Device(cfg, user_dir=tmp_path / "users" / "bob", state_dir=tmp_path / "state")


def test_device_counts_skipped_files_in_its_report(make_cfg, tmp_path: Path) -> None:
    user = tmp_path / "users" / "carol"
    write_docs(user)
    (user / "documents" / "bad.txt").write_bytes(b"\xff\xfe\x00garbage")
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"))
    d = Device(cfg, user_dir=user, state_dir=tmp_path / "state")
    _, _, metrics = d.fit(d.init_send, server_round=1)
    assert metrics["skipped-files"] == 1
