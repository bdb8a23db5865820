"""Bad config values are rejected with a message naming the field; never a silent default."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedpgen.shared.config import RunConfig


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lr": -0.1}, "'lr'"),
        ({"task": "poetry"}, "'task'"),
        ({"preset": "fedfoo"}, "'preset'"),
        ({"num-users": 0}, "'num-users'"),
        ({"fraction-fit": 0}, "'fraction-fit'"),
        ({"server-optimizer": "sgd"}, "'server-optimizer'"),
        ({"data": "dir"}, "'data-dir'"),
        ({"local-steps": "many"}, "'local-steps'"),
        ({"personal-batch-size": -1}, "'personal-batch-size'"),
        ({"personal-refit": "stored"}, "'personal-refit'"),
        ({"history-mix": 1.0, "task": "behavior", "data": "synthetic"}, "'history-mix'"),
        ({"history-mix": 0.3}, "'history-mix'.*behavior task only"),
        ({"history-mix-fit": True, "task": "behavior", "data": "synthetic"}, "'history-mix-fit'.*history-mix > 0"),
        ({"no-such-key": 1}, "'no-such-key'"),
    ],
)
def test_invalid_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.from_mapping(overrides)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="fedavg-lora.*fedrep|fedrep.*fedavg-lora"):
        RunConfig.from_mapping({"preset": "nope"})


def test_defaults_parse_and_hash_ignores_rounds() -> None:
    a = RunConfig.from_mapping({})
    b = RunConfig.from_mapping({"num-server-rounds": 9})
    c = RunConfig.from_mapping({"lr": 0.01})
    assert a.model_hash() == b.model_hash() != c.model_hash()
    # how the final evaluation refits is not what a checkpoint means; the records per step are
    assert RunConfig.from_mapping({"personal-refit": "fresh"}).model_hash() == a.model_hash()
    assert RunConfig.from_mapping({"personal-batch-size": 64}).model_hash() != a.model_hash()
    behavior = {"task": "behavior", "data": "synthetic"}  # the user's memory is read at evaluation only
    assert RunConfig.from_mapping({**behavior, "history-mix": 0.3}).model_hash() == \
        RunConfig.from_mapping(behavior).model_hash()
    # ... unless the personal fit trains through it: then its weight and the fit are fixed for the run
    fit = {**behavior, "history-mix-fit": True}
    assert len({RunConfig.from_mapping({**behavior, "history-mix": 0.3}).model_hash(),
                RunConfig.from_mapping({**fit, "history-mix": 0.3}).model_hash(),
                RunConfig.from_mapping({**fit, "history-mix": 0.5}).model_hash()}) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lr=-1"], "'lr'"),
        (["--preset", "bogus"], "unknown preset"),
        (["--num-users", "0"], "'num-users'"),
        (["--data-dir", "/nonexistent/users"], "data dir not found"),
    ],
)
def test_cli_reports_errors_without_traceback(args: list[str], message: str, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", "from fedpgen.cli import main; main()", "simulate",
                           "--run-dir", str(tmp_path / "r"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_every_override_file_in_simulations_is_valid() -> None:
    from pathlib import Path

    from fedpgen.shared.config import load_override_file

    files = sorted((Path(__file__).resolve().parent.parent / "simulations").glob("*.toml"))
    assert len(files) >= 3
    tasks = {RunConfig.from_mapping(load_override_file(f)).task for f in files}
    assert tasks == {"text", "behavior", "image"}


@pytest.mark.parametrize("key", ["dp-epsilon", "lr", "user-clip", "secagg-clip", "round-timeout"])
@pytest.mark.parametrize("value", ["inf", "nan", float("inf")])
def test_finding6_infinite_or_nan_settings_are_rejected_naming_the_field(key: str, value: object) -> None:
    # Issue 12, finding 6: dp-epsilon = inf used to train silently with σ = 10 (ε 0.11)
    with pytest.raises(ValueError, match=f"config '{key}'"):
        RunConfig.from_mapping({key: value})


def test_finding6_an_infinite_budget_points_to_dp_off() -> None:
    with pytest.raises(ValueError, match="dp = 'off'"):
        RunConfig.from_mapping({"dp-epsilon": float("inf")})
