"""Bad input: a clear error or a counted skip, never a traceback or a silent default."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
)
from flwr.server.client_manager import SimpleClientManager

from fedpgen.client.app import DeviceClient
from fedpgen.client.device import Device
from fedpgen.client.node import NodeSettings
from fedpgen.server.results import RunRecorder
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.data.safe_read import DOCUMENT_MAX_BYTES, UserBudget, read_file
from fedpgen.shared.data.user_folder import list_user_dirs, read_documents, read_profile
from fedpgen.shared.tasks.text import TextTask, profile_line
from fedpgen.shared.tasks.text_tokenizer import ByteTokenizer
from fedpgen.shared.wire import NO_USABLE_DATA, keys_digest


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
    assert len(texts) == 12 and skipped == {"unreadable-file": 3}


def test_malformed_profile_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_text("{not json")
    assert read_profile(tmp_path) == ({}, {"malformed-profile": 1})
    (tmp_path / "profile.json").write_text(json.dumps({"tone": "formal"}))
    assert read_profile(tmp_path) == ({"tone": "formal"}, {})


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
    assert metrics["skipped-unreadable-file"] == 1


def test_a_device_without_usable_data_refuses_and_is_never_sampled_again(make_cfg, tmp_path: Path) -> None:
    # Prepare: one user folder with nothing usable in it
    (tmp_path / "users" / "bob").mkdir(parents=True)
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), min_fit_clients=1)
    client = DeviceClient(cfg, NodeSettings(user_dir=tmp_path / "users" / "bob", state_dir=tmp_path / "s"))
    # Execute
    res = client.fit(FitIns(Parameters([], ""), {"server-round": 1, "sampled-clients": 2}))
    ev = client.evaluate(EvaluateIns(Parameters([], ""), {}))
    # Assert: a refusal naming the reason, not an exception; the server then skips the node
    assert res.status.code != Code.OK and res.status.message.startswith(NO_USABLE_DATA)
    assert ev.status.code != Code.OK and ev.status.message.startswith(NO_USABLE_DATA)
    assert "bob" not in res.status.message and str(tmp_path) not in res.status.message, "no name or path on the wire"
    names = ("a.lora_A.shared.weight",)
    strategy = SharedDeltaStrategy(cfg=cfg, names=names, theta=[np.zeros(2, np.float32)], completed=0,
                                   opt_state={}, recorder=RunRecorder(tmp_path / "run", cfg))
    manager = SimpleClientManager()
    proxies = [types.SimpleNamespace(node_id=i, cid=str(i)) for i in range(2)]
    for p in proxies:
        manager.register(p)  # type: ignore[arg-type]
    ok = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.ones(2, np.float32)]), 5,
                {"keys-digest": keys_digest(names)})
    strategy.aggregate_fit(1, [(proxies[0], ok)], [(proxies[1], res)])  # type: ignore[list-item]
    assert strategy.refused == {1: NO_USABLE_DATA}  # refused for its data, not for its budget
    assert {c.node_id for c, _ in strategy.configure_fit(2, None, manager)} == {0}  # type: ignore[arg-type]
    strategy.completed = cfg.num_server_rounds  # the final evaluation round
    assert {c.node_id for c, _ in strategy.configure_evaluate(1, None, manager)} == {0}  # type: ignore[arg-type]


# -- a user's folder is hostile input: every reader is total (issue 12, finding 5) ------------

SIX_FIELDS = {"name": "Margaret Holloway", "occupation": "retired schoolteacher", "city": "Portland, Oregon",
              "interests": "gardening, birdwatching, mystery novels", "tone": "warm and chatty",
              "audience": "grandchildren"}


def text_base(path: Path) -> Path:
    """A stand-in text base: the byte tokenizer is all ``TextTask.read_user`` reads from it."""
    path.mkdir(parents=True)
    ByteTokenizer().save(path)
    return path


def test_a_realistic_six_field_profile_is_cut_to_a_quarter_of_the_record_and_counted(make_cfg, tmp_path: Path) -> None:
    # Prepare: default seq-len, a profile line of ~190 bytes (more than the record), 12 documents
    user = tmp_path / "users" / "margaret"
    write_docs(user)
    (user / "profile.json").write_text(json.dumps(SIX_FIELDS))
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), seq_len=128)
    # Execute
    data = TextTask().read_user(user, cfg, base_path=text_base(tmp_path / "base"))
    # Assert: usable records, each starting with the same cut profile prefix that ends the line
    records = torch.cat([data.train, data.val, data.heldout])
    prefix = records[0, : 128 // 4].tolist()
    assert prefix[-1] == ord("\n") and bytes(prefix[:-1]) == profile_line(SIX_FIELDS).encode()[: 128 // 4 - 1]
    assert all(row[: 128 // 4].tolist() == prefix for row in records)
    assert data.skipped == {"truncated-profile": 1}


def test_a_profile_line_of_exactly_seq_len_tokens_does_not_crash_the_text_reader(make_cfg, tmp_path: Path) -> None:
    # Prepare: a profile whose line ("k=vvv...\n") is exactly seq-len bytes
    user = tmp_path / "users" / "long"
    write_docs(user)
    (user / "profile.json").write_text(json.dumps({"k": "v" * (128 - 3)}))
    assert len(profile_line({"k": "v" * (128 - 3)}).encode()) == 128
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), seq_len=128)
    # Execute
    data = TextTask().read_user(user, cfg, base_path=text_base(tmp_path / "base"))
    # Assert
    assert data.num_train > 0 and data.skipped == {"truncated-profile": 1}


class RecordingModel(torch.nn.Module):
    """Stands in for a causal LM in generation: records the prompt ids it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompts: list[list[int]] = []

    def generate(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.prompts.append(input_ids[0].tolist())
        return input_ids


def test_generation_is_conditioned_on_the_same_cut_profile_as_training(make_cfg, tmp_path: Path) -> None:
    # Prepare: a user with a profile too long for the record, read for training
    user = tmp_path / "users" / "margaret"
    write_docs(user)
    (user / "profile.json").write_text(json.dumps(SIX_FIELDS))
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), seq_len=128)
    task, base, model = TextTask(), text_base(tmp_path / "base"), RecordingModel()
    data = task.read_user(user, cfg, base_path=base)
    # Execute
    task.generate(model, base, "Dear ", profile=SIX_FIELDS)
    # Assert: the prompt is the records' prefix, then the text to continue
    assert model.prompts == [data.train[0, : 128 // 4].tolist() + list(b"Dear ")]


def test_deeply_nested_profile_json_is_malformed_not_a_crash(tmp_path: Path) -> None:
    # Prepare: 20,000 levels (40 KB, under the profile's size cap)
    (tmp_path / "profile.json").write_text('{"a": ' + "[" * 20_000 + "]" * 20_000 + "}")
    # Execute
    profile, skipped = read_profile(tmp_path)
    # Assert
    assert (profile, skipped) == ({}, {"malformed-profile": 1})


def test_profile_values_must_be_scalars_nested_ones_are_dropped_and_counted(tmp_path: Path) -> None:
    # Prepare: scalars of each JSON type, two nested values, a null, a NaN literal elsewhere
    values = {"tone": "formal", "age": 71, "height": 1.62, "retired": True, "pets": ["cat"],
              "address": {"city": "Lyon"}, "middle": None}
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "profile.json").write_text(json.dumps(values))
    (tmp_path / "nan").mkdir()
    (tmp_path / "nan" / "profile.json").write_text('{"tone": "formal", "age": NaN}')
    # Execute
    profile, skipped = read_profile(tmp_path / "ok")
    # Assert
    assert profile == {"tone": "formal", "age": "71", "height": "1.62", "retired": "True"}
    assert skipped == {"malformed-profile": 3}
    assert read_profile(tmp_path / "nan") == ({}, {"malformed-profile": 1})


def test_a_document_over_the_size_cap_is_skipped_and_counted(tmp_path: Path) -> None:
    # Prepare: 12 good documents and one valid text document one byte over the cap
    user = tmp_path / "alice"
    write_docs(user)
    (user / "documents" / "huge.txt").write_bytes(b"a" * (DOCUMENT_MAX_BYTES + 1))
    # Execute
    texts, skipped = read_documents(user)
    # Assert
    assert len(texts) == 12 and skipped == {"too-large": 1}


def test_a_file_that_grows_after_its_size_was_checked_is_still_cut_at_the_cap(tmp_path: Path, monkeypatch) -> None:
    # Prepare: a 1000-byte file whose stat says 10 bytes (it grew between stat and read)
    path = tmp_path / "growing.txt"
    path.write_bytes(b"x" * 1000)
    real_lstat, real_fstat = os.lstat, os.fstat

    def shrink(st: os.stat_result) -> os.stat_result:
        return os.stat_result((*st[:6], 10, *st[7:10]))

    monkeypatch.setattr(os, "lstat", lambda p: shrink(real_lstat(p)))
    monkeypatch.setattr(os, "fstat", lambda fd: shrink(real_fstat(fd)))
    # Execute
    data, reason = read_file(path, cap=100, budget=UserBudget())
    # Assert
    assert (data, reason) == (None, "too-large")


def test_once_a_users_total_cap_is_reached_the_remaining_files_are_counted(tmp_path: Path) -> None:
    # Prepare: 12 documents of ~190 bytes each, a budget for 5 of them
    user = tmp_path / "alice"
    write_docs(user)
    size = (user / "documents" / "000.txt").stat().st_size
    # Execute
    texts, skipped = read_documents(user, budget=UserBudget(5 * size + size // 2))
    # Assert: the first five in name order, then the cap is hit and stays hit
    assert texts == [(user / "documents" / f"{i:03d}.txt").read_text() for i in range(5)]
    assert skipped == {"user-cap": 7}


def test_symlinks_in_a_user_folder_are_never_followed(tmp_path: Path) -> None:
    # Prepare: a secret outside the folder, linked as a document, the profile and a documents folder
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash " * 10)
    outside = tmp_path / "outside"
    write_docs(outside)
    (outside / "profile.json").write_text(json.dumps({"tone": "formal"}))
    users = tmp_path / "users"
    write_docs(users / "alice")
    (users / "alice" / "documents" / "passwd.txt").symlink_to(secret)
    (users / "alice" / "profile.json").symlink_to(outside / "profile.json")
    (users / "bob").mkdir(parents=True)
    (users / "bob" / "documents").symlink_to(outside / "documents", target_is_directory=True)
    (users / "carol").symlink_to(outside, target_is_directory=True)
    # Execute
    alice_texts, alice_skipped = read_documents(users / "alice")
    bob_texts, bob_skipped = read_documents(users / "bob")
    # Assert
    assert len(alice_texts) == 12 and alice_skipped == {"symlink": 1}
    assert read_profile(users / "alice") == ({}, {"symlink": 1})
    assert (bob_texts, bob_skipped) == ([], {"symlink": 1})
    assert [p.name for p in list_user_dirs(users)] == ["alice", "bob"]


def test_empty_documents_and_profile_are_counted(tmp_path: Path) -> None:
    # Prepare: 12 good documents, a zero-byte one and a whitespace-only one; a zero-byte profile
    user = tmp_path / "alice"
    write_docs(user)
    (user / "documents" / "zero.txt").write_bytes(b"")
    (user / "documents" / "blank.txt").write_text(" \n\t\n")
    (user / "profile.json").write_bytes(b"")
    # Execute
    texts, skipped = read_documents(user)
    # Assert
    assert len(texts) == 12 and skipped == {"empty-file": 2}
    assert read_profile(user) == ({}, {"empty-file": 1})
