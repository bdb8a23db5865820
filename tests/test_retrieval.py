"""Retrieval over the user's own history (``retrieval-k``): what it conditions on, what it never
reads (held-out text), what it never scores (the context), and that the wire does not change."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import device

from fedpgen.shared.config import RunConfig
from fedpgen.shared.tasks.retrieval import History, context_ids
from fedpgen.shared.tasks.text import CONTEXT_OFFSET, context_budget, profile_prefix
from fedpgen.shared.tasks.text_tokenizer import ByteTokenizer


def test_history_ranks_by_similarity_never_returns_the_own_or_an_empty_document() -> None:
    history = History(["the river keeps the light", "a red door hides", "", "the river follows the light",
                       "my garden"])
    assert history.top_k("river light", 2, exclude=3) == [0, 4]  # 0 matches; among the ties 4 is nearest 3
    assert history.top_k("river light", 5, exclude=0) == [3, 1, 4]  # never 0 (own) nor 2 (not retrievable)
    assert history.top_k("", 2, exclude=1) == [0, 3]  # no query: the nearest documents, the earlier first
    assert history.top_k("garden", 1) == [4]


def test_context_ids_give_each_document_an_equal_share_within_the_budget() -> None:
    assert context_ids([[1] * 50, [2] * 50], budget=20, sep=[9]) == [1] * 9 + [9] + [2] * 9 + [9]
    assert context_ids([[1, 1], [2] * 50], budget=20, sep=[9]) == [1, 1, 9] + [2] * 9 + [9]
    assert context_ids([], budget=20, sep=[9]) == []
    assert context_ids([[1] * 5] * 3, budget=4, sep=[9]) == []  # no room for any of them


def _users(root: Path) -> Path:
    """One user whose documents are each unique (a marker per document) and topical."""
    user = root / "u"
    (user / "documents").mkdir(parents=True)
    topics = ["boats sail the sea", "gardens grow roses", "trains run north"]
    for i in range(24):
        (user / "documents" / f"{i:03d}.txt").write_text(f"doc{i:02d}x {topics[i % 3]} and more {topics[i % 3]}. "
                                                         f"Then doc{i:02d}y ends here, quietly.")
    (user / "profile.json").write_text(json.dumps({"home": "harbour"}))
    return root


def _read(make_cfg, tmp_path: Path, k: int):  # type: ignore[no-untyped-def]
    cfg = make_cfg(data="dir", data_dir=str(_users(tmp_path / f"users{k}")), retrieval_k=k, seq_len=64, dp="off")
    d = device(cfg)
    return d.task, d.data, cfg


def _context_and_text(row: torch.Tensor, pad: int) -> tuple[list[str], str]:
    """The retrieved pieces and the scored text of one record (byte tokenizer)."""
    ids = row.tolist()
    ctx = bytes(t - CONTEXT_OFFSET for t in ids if t >= CONTEXT_OFFSET).decode()
    text = bytes(t for t in ids if t < 256 and t != pad).decode()
    return [p for p in ctx.split("\n") if p], text


def _doc(text: str) -> int | None:
    found = re.search(r"doc(\d\d)[xy]", text)
    return int(found.group(1)) if found else None


def test_records_hold_retrieved_context_from_training_text_only(make_cfg, tmp_path: Path) -> None:
    # Prepare / Execute
    task, data, cfg = _read(make_cfg, tmp_path, k=2)
    pad = task.pad_id
    rows = torch.cat([data.train, data.val, data.heldout])
    train_text = [_context_and_text(r, pad)[1] for r in torch.cat([data.train, data.val])]
    held_text = [_context_and_text(r, pad)[1] for r in data.heldout]
    # Assert: every record carries two pieces within a quarter of the record, none from its own document
    same_topic = second_chunks = 0
    for r in rows:
        pieces, text = _context_and_text(r, pad)
        assert len(pieces) == 2 and int((r >= CONTEXT_OFFSET).sum()) <= context_budget(cfg.seq_len, 2)
        own = _doc(text)
        assert own is None or own not in {_doc(p) for p in pieces}, "a record's own document is its context"
        # The attack: held-out text reaching any record as context (a held-out first chunk is the only
        # place its document's "docNNx" marker appears). Every piece is training text.
        for piece in pieces:
            assert any(piece in t for t in train_text), f"{piece!r} is not training text"
        if "y" in text[:8] or text.startswith("Then") or (own is not None and f"doc{own:02d}x" not in text):
            second_chunks += 1  # its query is its document's start: the topic
            first = _doc(pieces[0])
            same_topic += first is not None and own is not None and first % 3 == own % 3
    assert any(_doc(t) is not None and f"doc{_doc(t):02d}x" in t for t in held_text), "no first chunk held out"
    assert second_chunks > 0 and same_topic / second_chunks > 0.6


def test_context_is_never_scored_and_off_keeps_the_records_as_they_were(make_cfg, tmp_path: Path) -> None:
    task, data, cfg = _read(make_cfg, tmp_path, k=2)
    batch = data.train[:4]
    stored = batch[:, 1:]
    model = device(cfg).model
    _, mask, _ = task._token_losses(model, batch)
    assert torch.equal(mask.sum(1).long(), ((stored != task.pad_id) & (stored < CONTEXT_OFFSET)).sum(1))
    assert int(((stored >= CONTEXT_OFFSET).float() * mask).sum()) == 0
    # The model reads the context: blanking it changes the loss, not the tokens scored
    blank = torch.where(batch >= CONTEXT_OFFSET, torch.full_like(batch, CONTEXT_OFFSET + ord(" ")), batch)
    assert torch.equal(mask, task._token_losses(model, blank)[1])
    assert not torch.allclose(task.per_record_loss(model, batch), task.per_record_loss(model, blank))
    # retrieval-k = 0: records are the profile prefix and a window of text, nothing else
    off_task, off, off_cfg = _read(make_cfg, tmp_path, k=0)
    rows = torch.cat([off.train, off.val, off.heldout])
    assert int((rows >= CONTEXT_OFFSET).sum()) == 0
    prefix, _ = profile_prefix(ByteTokenizer(), {"home": "harbour"}, off_cfg.seq_len)
    assert all(r[: len(prefix)].tolist() == prefix for r in rows)
    docs = [p.read_bytes() for p in sorted((tmp_path / "users0" / "u" / "documents").iterdir())]
    text_len = off_cfg.seq_len - len(prefix)
    windows = sorted(d[s : s + text_len] for d in docs for s in range(0, len(d), text_len)
                     if len(d[s : s + text_len]) >= 8)
    assert sorted(bytes(t for t in r[len(prefix):].tolist() if t != off_task.pad_id) for r in rows) == windows


def test_retrieval_changes_nothing_on_the_wire(make_cfg, tmp_path: Path) -> None:
    """What a device sends is the same with and without retrieval: the same arrays (names,
    shapes, dtypes) and the same metric keys; the context stays in the device's records."""
    sent = {}
    for k in (0, 2):
        cfg = make_cfg(data="dir", data_dir=str(_users(tmp_path / f"u{k}")), retrieval_k=k, seq_len=64, dp="off",
                       run_dir=str(tmp_path / f"run{k}"))
        d = device(cfg)
        delta, n, metrics = d.fit(d.init_send, server_round=1)
        sent[k] = ([(x.shape, x.dtype) for x in delta], sorted(metrics), list(d.sets.send))
        assert all(np.isfinite(x).all() for x in delta)
    assert sent[0] == sent[2]


def test_retrieval_k_is_validated() -> None:
    with pytest.raises(ValueError, match="'retrieval-k'.*>= 0"):
        RunConfig.from_mapping({"retrieval-k": -1})
    with pytest.raises(ValueError, match="'retrieval-k'.*text task only"):
        RunConfig.from_mapping({"retrieval-k": 2, "task": "behavior", "data": "synthetic"})
    with pytest.raises(ValueError, match="'seq-len'.*retrieval-k"):
        RunConfig.from_mapping({"retrieval-k": 2, "seq-len": 16, "dp": "off"})
    # A record holding other records' text breaks record-level DP: refused, not silently weakened
    for record_dp in ({}, {"dp": "sigma", "dp-noise-multiplier": 0.5}):
        with pytest.raises(ValueError, match="'retrieval-k'.*record-level DP.*user-dp"):
            RunConfig.from_mapping({"retrieval-k": 2, **record_dp})
    # User-level DP bounds the device's whole delta, whatever its records read as context
    cfg = RunConfig.from_mapping({"retrieval-k": 2, "dp": "off", "user-dp": "distributed"})
    assert (cfg.retrieval_k, cfg.record_dp, cfg.user_dp) == (2, False, "distributed")


def test_generation_retrieves_from_the_users_documents_by_the_prompt(make_cfg, tmp_path: Path) -> None:
    task, _, cfg = _read(make_cfg, tmp_path, k=1)
    model = device(cfg).model
    seen: list[torch.Tensor] = []
    real = model.generate

    def spy(*, input_ids: torch.Tensor, **kw):  # type: ignore[no-untyped-def]
        seen.append(input_ids)
        return real(input_ids=input_ids, **kw)

    model.generate = spy  # type: ignore[method-assign]
    base = Path(device(cfg).base_path)
    task.generate(model, base, "trains", profile={"home": "harbour"}, max_new_tokens=2,
                  history=["boats sail the sea", "trains run north tonight"])
    text = bytes(t for t in seen[0][0].tolist() if t < 256).decode()
    assert "trains run nort" in text and "boats" not in text
