"""Planning a user-level DP cohort (simulations/cohort_plan.py): the common part of the devices'
clipped deltas, the noise on the mean, and the population a sampling rate needs, each checked
against values computed by hand or by the accountant the sweep uses."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, simulation_script

from fedpgen.shared.config import RunConfig

@pytest.fixture(scope="module")
def tool():
    return simulation_script("cohort_plan")


def test_agreement_of_identical_orthogonal_and_mixed_deltas(tool) -> None:
    same = [np.full(4, 1.5)] * 4  # norm 3 each, clipped to 1: they agree on everything
    a = tool.agreement(same, clip=1.0)
    assert a["common"] == pytest.approx(1.0) and a["rms"] == pytest.approx(1.0)
    assert a["cosine"] == pytest.approx(1.0) and a["common-se"] == pytest.approx(0.0, abs=1e-9)
    assert a["median-norm"] == pytest.approx(3.0) and a["numbers"] == 4 and a["devices"] == 4

    apart = list(np.eye(5)[:4] * 0.5)  # nothing in common: their mean shrinks as 1/n
    b = tool.agreement(apart, clip=1.0)
    assert b["common"] == pytest.approx(0.0, abs=1e-9) and b["cosine"] == pytest.approx(0.0)
    assert b["rms"] == pytest.approx(0.5)

    # A shared direction 0.3 plus an own orthogonal one 0.4 per device: the common part is 0.3,
    # the cosine 0.09 / 0.25 (not clipped at S = 1: each norm is 0.5).
    mixed = [0.3 * np.eye(6)[0] + 0.4 * np.eye(6)[i] for i in range(1, 6)]
    c = tool.agreement(mixed, clip=1.0)
    assert c["common"] == pytest.approx(0.3) and c["cosine"] == pytest.approx(0.36)
    with pytest.raises(ValueError, match="at least 3"):
        tool.agreement(mixed[:2], clip=1.0)


def test_noise_norm_and_plan_rows(tool) -> None:
    assert tool.noise_norm(multiplier=2.0, clip=0.5, numbers=400, cohort=10) == pytest.approx(2.0)
    from fedpgen.shared.privacy.user_level import calibrate_user_noise

    cfg = RunConfig.from_mapping({**TINY, "num-users": 200, "fraction-fit": 0.1, "min-fit-clients": 2,
                                  "num-server-rounds": 5, "user-clip": 0.5})
    stats = {"numbers": 1024, "common": 0.2}
    rows = tool.plan(cfg, stats, epsilons=(8.0,), fractions=(0.05, 1.0))
    assert [r["cohort"] for r in rows] == [10.0, 20.0, 200.0] and [r["config"] for r in rows] == [False, True, False]
    own = rows[1]
    z = calibrate_user_noise(target_epsilon=8.0, sample_rate=0.1, rounds=5, delta=cfg.dp_delta,
                             accountant=cfg.dp_accountant)
    assert own["z"] == pytest.approx(z)
    assert own["ratio"] == pytest.approx(0.2 / (z * 0.5 * 32 / 20))


def test_needed_population_reaches_signal_equal_to_noise(tool) -> None:
    cfg = RunConfig.from_mapping({**TINY, "num-users": 100, "fraction-fit": 0.2, "min-fit-clients": 2,
                                  "num-server-rounds": 10, "user-clip": 1.0})
    stats = {"numbers": 2048, "common": 0.3}
    need = tool.needed_population(cfg, stats, epsilon=8.0)
    assert need["sample-rate"] == pytest.approx(0.2) and need["population"] > 100

    def ratio(population: int) -> float:
        grown = RunConfig.from_mapping({**cfg.to_toml_dict(), "num-users": population})
        return next(r["ratio"] for r in tool.plan(grown, stats, epsilons=(8.0,), fractions=()) if r["config"])

    assert ratio(need["population"]) >= 1.0 > ratio(math.floor(need["population"] * 0.95))
    assert tool.needed_population(cfg, {**stats, "common": 0.0}, epsilon=8.0)["population"] is None


def test_main_measures_real_devices_and_writes_its_report(tool, tmp_path: Path) -> None:
    sets = [f"--set={k}={v}" for k, v in {**TINY, "num-users": 4, "user-dp": "distributed"}.items()]
    out = tmp_path / "plan"
    result = tool.main([*sets, "--devices", "3", "--epsilons", "8", "--out", str(out)])
    stats = result["agreement"]
    cfg = RunConfig.from_mapping({**TINY, "run-dir": str(tmp_path / "x")})
    from conftest import device

    assert stats["numbers"] == sum(a.size for a in device(cfg, 0).init_send)  # the numbers a device sends
    assert stats["devices"] == 3 and len(result["train-seconds"]) == 3 and stats["median-norm"] > 0
    own = next(r for r in result["rows"] if r["config"])
    assert own["ratio"] == pytest.approx(stats["common"] / own["noise"])
    assert next(r for r in result["clips"] if r["config"])["ratio"] == pytest.approx(own["ratio"])
    import torch

    threads = torch.get_num_threads()
    saved = json.loads((out / "cohort_plan.json").read_text())
    report = (out / "cohort_plan.md").read_text()
    assert saved["agreement"] == stats and "| ε | population | devices per round |" in report and "(config)" in report
    # Measured from fresh devices: a second run redraws nothing stale (the same users, round 1 again).
    torch.set_num_threads(2)
    again = tool.main([*sets, "--devices", "3", "--epsilons", "8", "--out", str(out)])
    assert torch.get_num_threads() == 2  # the caller's thread count is given back
    torch.set_num_threads(threads)
    assert again["agreement"]["numbers"] == stats["numbers"] and len(again["train-seconds"]) == 3


def test_a_second_plan_into_a_folder_in_use_stops_before_touching_it(tool, tmp_path: Path) -> None:
    import subprocess

    from fedpgen.shared.locking import FolderLockedError

    out = tmp_path / "plan"
    script = ("import time; from fedpgen.shared.locking import exclusive\n"
              f"with exclusive({str(out)!r}, what='x'):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        sets = [f"--set={k}={v}" for k, v in {**TINY, "num-users": 4}.items()]
        with pytest.raises(FolderLockedError, match="cohort plan folder .* is in use"):
            tool.main([*sets, "--devices", "3", "--out", str(out)])
        assert not (out / "run").exists() and not (out / "cohort_plan.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_by_clip_rates_other_clips_from_the_same_deltas(tool) -> None:
    cfg = RunConfig.from_mapping({**TINY, "num-users": 100, "fraction-fit": 0.2, "min-fit-clients": 2,
                                  "num-server-rounds": 10, "user-clip": 1.0})
    # Four devices: a shared direction 0.3 and an own one, norms 0.5, 0.5, 1.0 and 2.0.
    deltas = [0.3 * np.eye(6)[0] + 0.4 * np.eye(6)[1], 0.3 * np.eye(6)[0] + 0.4 * np.eye(6)[2],
              2 * (0.3 * np.eye(6)[0] + 0.4 * np.eye(6)[3]), 4 * (0.3 * np.eye(6)[0] + 0.4 * np.eye(6)[4])]
    rows = tool.by_clip(cfg, deltas, epsilons=(8.0,))
    norms = [0.5, 0.5, 1.0, 2.0]
    assert {r["clip"] for r in rows} == {1.0, *(float(f"{np.quantile(norms, p):.3g}") for p in (0.25, 0.5, 0.75, 0.9))}
    assert [r["config"] for r in rows].count(True) == 1 and all(r["cohort"] == 20 for r in rows)
    z = tool.multiplier(cfg, epsilon=8.0, sample_rate=0.2)
    for r in rows:
        assert r["clipped"] == pytest.approx(sum(n > r["clip"] for n in norms) / 4)
        assert r["noise"] == pytest.approx(z * r["clip"] * math.sqrt(6) / 20)
        assert r["ratio"] == pytest.approx(tool.agreement(deltas, r["clip"])["common"] / r["noise"])
    at_half = next(r for r in rows if r["clip"] == 0.5)  # every delta clipped to 0.5: common part 0.3
    assert at_half["common"] == pytest.approx(0.3) and at_half["clipped"] == 0.5
    # Below every norm the ratio no longer changes: all deltas are scaled to S alike.
    assert at_half["ratio"] == pytest.approx(0.3 / (z * 0.5 * math.sqrt(6) / 20))


@pytest.mark.parametrize(("args", "message"), [(["--devices", "2"], "--devices must be >= 3"),
                                               (["--epsilons", "inf"], "finite and > 0"),
                                               (["--set", "user-clip"], "--set takes key=value, got: user-clip")])
def test_bad_arguments_get_a_clear_error_before_any_training(tool, tmp_path: Path, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as stop:
        tool.main([*args, "--out", str(tmp_path / "plan")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()
