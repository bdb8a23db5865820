"""The ``shakespeare-all`` text population: every play's roles are users, the base learns from
the poems alone, and no user's text is ever pre-training text (issue 15: cohorts large
enough for user-level DP)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedpgen.shared.data import shakespeare
from fedpgen.shared.tasks import text_base
from fedpgen.shared.tasks.registry import TASKS
from fedpgen.shared.tasks.text import TextTask

MIN_BYTES = 20 * 128  # simulations/text_cohort.toml: min-records 20 of seq-len 128


def test_every_play_gives_users_and_none_of_their_text_is_public() -> None:
    users = shakespeare.users(num_users=1000, min_bytes=MIN_BYTES, population="shakespeare-all")
    plays = {name.split("--")[0] for name in users}
    assert len(users) >= 360  # the cohort config's 360 roles exist
    assert len(plays) > len(shakespeare.USER_PLAYS) + 20  # roles from far more than the 8 plays
    assert not plays & set(shakespeare.POEMS)
    public = shakespeare.public_text("shakespeare-all")
    assert 150_000 < len(public) < 300_000  # the poems alone (0.2 MB), not the plays (4 MB)
    for name, docs in users.items():
        long = [d for d in docs if len(d) > 60]
        assert long, name
        for doc in long[:3]:  # a user's own lines never reach pre-training
            assert doc[:60] not in public, name
    for play in shakespeare.user_plays("shakespeare-all"):
        assert shakespeare.play_texts()[play][5000:5200] not in public, play


def test_the_default_population_is_unchanged_and_disjoint_from_its_public_text() -> None:
    users = shakespeare.users(num_users=20, min_bytes=60 * 128)
    assert {name.split("--")[0] for name in users} <= set(shakespeare.USER_PLAYS)
    public = shakespeare.public_text()
    assert len(public) > 3_000_000  # the other plays
    assert shakespeare.play_texts()["sonnets"][1000:1200] in public  # the poems are public there too
    for doc in next(iter(users.values()))[:5]:
        assert doc[:60] not in public


def test_an_unknown_population_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown Shakespeare population 'shakespeare-some'.*shakespeare-all"):
        shakespeare.users(num_users=3, min_bytes=1000, population="shakespeare-some")


def test_each_population_has_its_own_base_and_the_default_keeps_its_cache_key(monkeypatch: Any) -> None:
    built: list[tuple[dict[str, Any], Any]] = []
    monkeypatch.setattr(text_base, "ensure_built", lambda kind, key, build: built.append((key, build)) or Path("x"))
    text_base.ensure_base(steps=400, seq_len=128, seed=0)
    text_base.ensure_base(steps=400, seq_len=128, seed=0, population="shakespeare-all")
    default_key, all_key = built[0][0], built[1][0]
    assert default_key == {"arch": text_base.ARCH, "steps": 400, "seq_len": 128, "seed": 0,
                           "batch": text_base.PRETRAIN_BATCH, "lr": text_base.PRETRAIN_LR, "v": 1}
    assert all_key == {**default_key, "public": "shakespeare-all"}

    pretrained: list[str] = []
    monkeypatch.setattr(text_base, "pretrain", lambda dest, **kw: pretrained.append(kw["population"]))
    built[1][1](Path("dest"))
    assert pretrained == ["shakespeare-all"]


@pytest.mark.parametrize(("data", "population"), [("shakespeare", "shakespeare"),
                                                  ("shakespeare-all", "shakespeare-all"),
                                                  ("synthetic", "shakespeare")])
def test_the_text_task_asks_for_its_populations_base(make_cfg: Any, monkeypatch: Any, data: str,
                                                      population: str) -> None:
    import fedpgen.shared.tasks.text as text

    asked: list[str] = []
    monkeypatch.setattr(text, "ensure_base", lambda **kw: asked.append(kw["population"]) or Path("x"))
    TextTask().base_model_path(make_cfg(data=data))
    assert asked == [population]


def test_shakespeare_all_is_a_text_dataset_only(make_cfg: Any) -> None:
    assert make_cfg(data="shakespeare-all").data == "shakespeare-all"
    # the registry's text datasets and the populations the data module builds are the same set
    # (the text task builds synthetic users for any data value it does not find among these)
    assert set(TASKS["text"].datasets) - {"synthetic"} == set(shakespeare.POPULATIONS)
    assert "shakespeare-all" not in TASKS["behavior"].datasets
    with pytest.raises(ValueError, match="data"):
        make_cfg(task="behavior", data="shakespeare-all")
