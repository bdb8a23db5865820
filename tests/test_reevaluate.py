"""Re-evaluating a finished run (simulations/reevaluate.py): the same users on the same final
shared base, with only the personal fit's keys changed; a key that made the shared base is
refused, and so is a run whose checkpoint another config wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, device, simulation_script

from fedpgen.server import checkpoint
from fedpgen.server.results import read_clients
from fedpgen.shared.config import RunConfig

EVALUATED = (0, 2)  # the users the run's final evaluation chose (not all: user 1 was not)


@pytest.fixture(scope="module")
def tool():
    return simulation_script("reevaluate")


@pytest.fixture(scope="module")
def finished(tool, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run as a simulation leaves it: one round's shared base checkpointed, users 0
    and 2 evaluated four-way on it (clients.csv), the config beside them."""
    cfg = RunConfig.from_mapping({**TINY, "evaluation": "four-way", "dp": "off", "run-dir": str(tmp_path_factory.mktemp("run"))})
    first = device(cfg, 0)
    delta, _, _ = first.fit(list(first.init_send), server_round=1)
    theta = [a + d for a, d in zip(first.init_send, delta, strict=True)]
    assert any(np.abs(d).max() > 0 for d in delta)  # the base the run ends with is not the initial one
    folder = Path(cfg.run_dir)
    checkpoint.save(folder / "checkpoints", server_round=1, config_hash=cfg.model_hash(), names=first.sets.send,
                    theta=theta, opt_state={})
    rows = [device(cfg, i).evaluate(theta, four_way=True) for i in EVALUATED]
    tool.write_rows(folder, rows, cfg.to_toml_dict())
    return folder


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run for one test (a test may change its config)."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def by_user(folder: Path) -> dict[int, dict[str, Any]]:
    return {int(c["client-index"]): c for c in read_clients(folder)}


def test_the_runs_own_settings_give_the_runs_own_numbers_for_the_same_users(tool, run: Path, tmp_path: Path) -> None:
    before = (run / "clients.csv").read_bytes()
    tool.reevaluate(run, {}, tmp_path / "again", workers=1)
    again, original = by_user(tmp_path / "again"), by_user(run)
    assert set(again) == set(EVALUATED)  # the run's evaluated users, not a new sample
    for index, row in original.items():
        for variant in ("base", "shared", "personal", "local"):
            assert again[index][f"{variant}-ppl"] == pytest.approx(row[f"{variant}-ppl"], rel=1e-9)
    assert (run / "clients.csv").read_bytes() == before  # the run's own folder is never written


def test_a_personal_setting_changes_the_personal_variants_and_not_the_shared_base(
        tool, run: Path, tmp_path: Path) -> None:
    tool.reevaluate(run, {"personal-lr": "0.05"}, tmp_path / "lr", workers=1)
    changed, original = by_user(tmp_path / "lr"), by_user(run)
    for index, row in original.items():
        assert changed[index]["base-ppl"] == pytest.approx(row["base-ppl"], rel=1e-9)
        assert changed[index]["shared-ppl"] == pytest.approx(row["shared-ppl"], rel=1e-9)
    assert any(changed[i]["local-ppl"] != pytest.approx(original[i]["local-ppl"], rel=1e-6) for i in EVALUATED)
    assert json.loads((tmp_path / "lr" / "config.json").read_text())["personal-lr"] == 0.05


@pytest.mark.parametrize("key, value", [("user-noise-multiplier", "0.1"), ("lora-rank", "8"), ("lr", "0.1")])
def test_a_key_that_made_the_shared_base_or_its_privacy_is_refused(tool, run: Path, key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"cannot re-evaluate with {key} changed"):
        tool.new_config(run, {key: value})


def test_a_bad_value_and_the_runs_own_folder_as_out_are_refused(tool, run: Path) -> None:
    with pytest.raises(ValueError, match="personal-max-steps"):
        tool.new_config(run, {"personal-max-steps": "-1"})
    with pytest.raises(ValueError, match="--out must differ from --run"):
        tool.reevaluate(run, {}, run, workers=1)


def test_a_run_whose_checkpoint_another_config_wrote_is_refused(tool, run: Path, tmp_path: Path) -> None:
    values = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**values, "lr": values["lr"] * 2}))
    with pytest.raises(ValueError, match="different configuration"):
        tool.reevaluate(run, {}, tmp_path / "other", workers=1)


def test_another_runs_users_are_evaluated_when_it_is_the_same_population(tool, run: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(run, tmp_path / "other"))
    rows = [c for c in read_clients(run) if int(c["client-index"]) == 0]
    tool.write_rows(other, [{**rows[0], "client-index": 1}], json.loads((run / "config.json").read_text()))
    tool.reevaluate(run, {}, tmp_path / "on-other-users", workers=1, users=other)
    assert set(by_user(tmp_path / "on-other-users")) == {1}  # user 1, whom only the other run evaluated
    values = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**values, "num-users": values["num-users"] + 1}))
    with pytest.raises(ValueError, match="another population .*num-users"):
        tool.reevaluate(run, {}, tmp_path / "refused", workers=1, users=other)
