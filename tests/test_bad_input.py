"""Bad input: a clear error or a counted skip, never a traceback or a silent default."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, EvaluateIns, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

from client.app import DeviceClient
from client.device import Device
from server.results import RunRecorder
from server.strategy import SharedDeltaStrategy
from shared.data.user_folder import list_user_dirs, read_documents, read_profile
from shared.wire import NO_USABLE_DATA, keys_digest


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
    assert metrics["skipped-unreadable-file"] == 1


def test_a_device_without_usable_data_refuses_and_is_never_sampled_again(make_cfg, tmp_path: Path) -> None:
    # Prepare: one user folder with nothing usable in it
    (tmp_path / "users" / "bob").mkdir(parents=True)
    cfg = make_cfg(data="dir", data_dir=str(tmp_path / "users"), min_fit_clients=1)
    client = DeviceClient(lambda: Device(cfg, user_dir=tmp_path / "users" / "bob", state_dir=tmp_path / "s"),
                          primary="ppl")
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
    assert strategy.refused == {1: NO_USABLE_DATA} and strategy.exhausted == set()
    assert {c.node_id for c, _ in strategy.configure_fit(2, None, manager)} == {0}  # type: ignore[arg-type]
    strategy.completed = cfg.num_server_rounds  # the final evaluation round
    assert {c.node_id for c, _ in strategy.configure_evaluate(1, None, manager)} == {0}  # type: ignore[arg-type]
