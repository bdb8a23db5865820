"""Issue 17: one schedule per preset — what the device executes is what the DP plan counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedpgen.client.device import Device
from fedpgen.shared.adapters import get_tensors
from fedpgen.shared.population import ensure_population
from fedpgen.shared.presets import PERSONAL_AFTER, PRESETS, SHARED_ALONE
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.shared.privacy.mechanism import PlainSession


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


def test_a_private_phase_draws_batch_size_records_the_plan_calibrated_for() -> None:
    # The DP plan's sampling rate is batch-size / records: a private phase on any other key would
    # be accounted for a rate it does not use.
    with pytest.raises(ValueError, match="batch-size"):
        dataclasses.replace(PERSONAL_AFTER, private=True)
    assert dataclasses.replace(PERSONAL_AFTER, private=True, batch="batch-size").private


def test_a_batch_of_at_least_every_record_takes_each_record_once_without_drawing() -> None:
    records = torch.arange(12).reshape(6, 2)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    session = PlainSession([torch.nn.Parameter(torch.zeros(1))], records, batch_size=6, lr=0.1, gen=gen)
    assert torch.equal(session.next_batch(), records)
    assert torch.equal(gen.get_state(), state), "a full batch drew from the generator"
    smaller = PlainSession([torch.nn.Parameter(torch.zeros(1))], records, batch_size=4, lr=0.1, gen=gen)
    assert smaller.next_batch().shape == (4, 2) and not torch.equal(gen.get_state(), state)


@pytest.mark.parametrize(("personal_batch", "seen"), [(0, 8), (3, 3)])
def test_the_personal_fit_takes_personal_batch_size_and_the_shared_phase_batch_size(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, personal_batch: int, seen: int) -> None:
    import fedpgen.client.device as device_module

    sizes: list[tuple[tuple[str, ...], int]] = []
    real = device_module.train

    def spy(model, params, records, **kw):  # type: ignore[no-untyped-def]
        sizes.append((tuple(sorted({n.split(".")[-2] for n in kw["names"]})), kw["batch_size"]))
        return real(model, params, records, **kw)

    monkeypatch.setattr(device_module, "train", spy)
    cfg = make_cfg(batch_size=8, personal_batch_size=personal_batch, dp="off")
    d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=tmp_path / "state")
    d.fit(d.init_send, server_round=1)
    assert sizes == [(("shared",), 8), (("personal",), seen)]


def test_a_full_batch_personal_fit_does_not_depend_on_the_generator(make_cfg, tmp_path: Path) -> None:
    def fitted(personal_batch: int, seed: int) -> dict[str, torch.Tensor]:
        cfg = make_cfg(personal_batch_size=personal_batch, val_fraction=0.0, personal_max_steps=3, dp="off")
        d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=tmp_path / f"s-{personal_batch}-{seed}")
        d.personalize(torch.Generator().manual_seed(seed))
        return get_tensors(d.model, d.sets.keep)

    full_a, full_b = fitted(10_000, 1), fitted(10_000, 2)
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)
    sampled_a, sampled_b = fitted(2, 1), fitted(2, 2)
    assert any(not torch.equal(sampled_a[k], sampled_b[k]) for k in sampled_a), "sampled batches did not differ"
    assert any(not torch.equal(full_a[k], sampled_a[k]) for k in full_a)
