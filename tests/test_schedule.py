"""Issue 17: one schedule per preset — what the device executes is what the DP plan counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedpgen.client.device import Device
from fedpgen.shared.population import ensure_population
from fedpgen.shared.presets import PERSONAL_AFTER, PRESETS, SHARED_ALONE
from fedpgen.shared.privacy.ledger import PrivacyLedger


def one_private_round(cfg, tmp_path: Path) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(DP steps the plan calibrated σ for per round, DP steps Opacus counted in a real round)."""
    user = ensure_population(cfg)[0]
    d = Device(cfg, user_dir=user, state_dir=tmp_path / cfg.preset / "state")
    d.fit(d.init_send, server_round=1)
    ledger = PrivacyLedger(tmp_path / cfg.preset / "state")
    (event,) = ledger.events()
    return int(ledger.plan()["steps_per_round"]), event.steps


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_plan_counts_the_dp_steps_the_device_takes(make_cfg, tmp_path: Path, preset: str) -> None:
    cfg = make_cfg(preset=preset, local_steps=3, personal_max_steps=4, dp_epsilon=50.0)
    planned, taken = one_private_round(cfg, tmp_path)
    # FedRep's head phase is private (it sits in the shared forward pass); the others' personal phase is not
    assert planned == taken == {"fedrep": 7}.get(preset, 3)


def test_changing_a_schedule_changes_both_the_plan_and_the_steps(make_cfg, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    preset = PRESETS["fedavg-lora"]
    # Two private shared phases, then the personal fit: 2 × local-steps DP steps, counted by both
    monkeypatch.setitem(PRESETS, "fedavg-lora",
                        dataclasses.replace(preset, schedule=(SHARED_ALONE, SHARED_ALONE, PERSONAL_AFTER)))
    cfg = make_cfg(preset="fedavg-lora", local_steps=3, personal_max_steps=4, dp_epsilon=50.0)
    planned, taken = one_private_round(cfg, tmp_path)
    assert planned == taken == 6
