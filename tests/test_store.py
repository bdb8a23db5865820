"""The sealed on-device store: encrypted at rest, tampering detected and refused, restarts lose nothing."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Code, FitIns, ndarrays_to_parameters

from fedpgen.client.app import DeviceClient
from fedpgen.client.device import Device, verify_state
from fedpgen.client.node import NodeSettings
from fedpgen.shared.population import ensure_population
from fedpgen.shared.privacy.ledger import PrivacyEvent, PrivacyLedger
from fedpgen.shared.sealing import Sealer, TamperedStateError, load_or_create_key
from fedpgen.shared.store import PASSPHRASE_ENV, DeviceStore
from fedpgen.shared.wire import STATE_TAMPERED


def trained_device(make_cfg, state: Path) -> Device:  # type: ignore[no-untyped-def]
    cfg = make_cfg(dp="sigma", dp_noise_multiplier=1.0, dp_epsilon=1000.0)
    d = Device(cfg, user_dir=ensure_population(cfg)[0], state_dir=state)
    d.fit(d.init_send, server_round=1)
    return d


def test_the_personal_part_is_not_findable_in_plaintext_on_disk(make_cfg, tmp_path: Path) -> None:
    # Prepare / Execute: one round writes the personal part
    d = trained_device(make_cfg, tmp_path / "state")
    personal = d.store.load_personal()
    # Assert: every personal tensor's bytes (and its name) are absent from every file in the state-dir
    assert personal and any(float(t.abs().max()) > 0 for t in personal.values())
    blobs = [p.read_bytes() for p in (tmp_path / "state").iterdir() if p.name != "device.key"]
    for name, tensor in personal.items():
        raw = tensor.contiguous().numpy().tobytes()
        for blob in blobs:
            assert raw[:64] not in blob and name.encode() not in blob
    assert b'"epsilon"' not in (tmp_path / "state" / "ledger.jsonl.sealed").read_bytes()
    mode = stat.S_IMODE((tmp_path / "state" / "device.key").stat().st_mode)
    assert mode == 0o600


def test_a_tampered_personal_part_is_refused_not_trained_on(make_cfg, tmp_path: Path) -> None:
    d = trained_device(make_cfg, tmp_path / "state")
    path = tmp_path / "state" / "personal.safetensors.sealed"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(blob))
    with pytest.raises(TamperedStateError, match="authentication failed"):
        verify_state(DeviceStore(tmp_path / "state"), PrivacyLedger(tmp_path / "state"))
    # The device replies with a refusal naming the reason; nothing was trained or written.
    ledger_before = (tmp_path / "state" / "ledger.jsonl.sealed").read_bytes()
    client = DeviceClient(d.cfg, NodeSettings(user_dir=ensure_population(d.cfg)[0], state_dir=tmp_path / "state"))
    res = client.fit(FitIns(ndarrays_to_parameters(d.init_send), {"server-round": 2, "sampled-clients": 2}))
    assert res.status.code != Code.OK and res.status.message.startswith(STATE_TAMPERED)
    assert (tmp_path / "state" / "ledger.jsonl.sealed").read_bytes() == ledger_before


@pytest.mark.parametrize("attack", ["edit", "drop-last", "drop-first", "swap-files"])
def test_ledger_edits_removals_and_swaps_are_detected(tmp_path: Path, attack: str) -> None:
    ledger = PrivacyLedger(tmp_path)
    for r in (1, 2, 3):
        event = PrivacyEvent(round=r, unit="record", mechanism="m", noise_multiplier=1.0, clip=1.0, sample_rate=0.1,
                             steps=5, delta=1e-5, epsilon=float(r), accountant="prv", private=True)
        ledger.append(event)
    assert [e.round for e in ledger.events()] == [1, 2, 3]
    path = tmp_path / "ledger.jsonl.sealed"
    lines = path.read_text().splitlines()
    if attack == "edit":
        lines[1] = lines[1][:-8] + ("A" if lines[1][-8] != "A" else "B") + lines[1][-7:]
    elif attack == "drop-last":
        lines = lines[:-1]
    elif attack == "drop-first":
        lines = lines[1:]
    if attack == "swap-files":  # the personal-part file replaced by the accountant state: another role
        (tmp_path / "personal.safetensors.sealed").write_bytes((tmp_path / "accountant.json.sealed").read_bytes())
        with pytest.raises(TamperedStateError):
            DeviceStore(tmp_path).load_personal()
        return
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TamperedStateError):
        PrivacyLedger(tmp_path).events()


def test_a_group_readable_key_or_another_key_is_refused(tmp_path: Path) -> None:
    store = DeviceStore(tmp_path / "a")
    store.save_meta({"rounds_trained": 3})
    (tmp_path / "a" / "device.key").chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        DeviceStore(tmp_path / "a")
    (tmp_path / "a" / "device.key").chmod(0o600)
    assert DeviceStore(tmp_path / "a").load_meta() == {"rounds_trained": 3}
    other = load_or_create_key(tmp_path / "other.key")
    assert other != (tmp_path / "a" / "device.key").read_bytes()
    with pytest.raises(TamperedStateError):
        DeviceStore(tmp_path / "a", sealer=Sealer(other)).load_meta()


def test_a_passphrase_derived_key_opens_only_with_the_passphrase(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    DeviceStore(tmp_path).save_personal({"w": torch.arange(4.0)})
    assert not (tmp_path / "device.key").exists() and (tmp_path / "key.salt").is_file()
    np.testing.assert_array_equal(DeviceStore(tmp_path).load_personal()["w"].numpy(), np.arange(4.0))
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(TamperedStateError):
        DeviceStore(tmp_path).load_personal()


def test_the_ledger_command_verifies_and_prints_and_refuses_tampering(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedpgen.cli import cli

    ledger = PrivacyLedger(tmp_path / "s")
    for r in (1, 2):
        ledger.append(PrivacyEvent(round=r, unit="record", mechanism="DP-SGD", noise_multiplier=1.2, clip=1.0,
                                   sample_rate=0.25, steps=15, delta=1e-5, epsilon=2.5 * r, accountant="prv",
                                   private=True))
    out = CliRunner().invoke(cli, ["ledger", str(tmp_path / "s")], terminal_width=200)
    assert out.exit_code == 0 and "chain verified" in out.output and "5.000" in out.output
    ledger.save_user_plan({"user-dp": "distributed", "user-clip": 0.5, "user-noise-multiplier": 0.77,
                           "user-noise-dropouts": 0.0, "dp-max-participations": 3})  # what check_user_plan stores
    for r in (1, 2):  # both units protect these rounds: one event each, one participation
        ledger.append(PrivacyEvent(round=r, unit="user", mechanism="DP-FedAvg", noise_multiplier=0.77, clip=0.5,
                                   sample_rate=1.0, steps=1, delta=1e-5, epsilon=4.25 * r, accountant="prv",
                                   private=True))
    out = CliRunner().invoke(cli, ["ledger", str(tmp_path / "s")], terminal_width=200)
    said = " ".join(out.output.split())  # rich wraps lines
    assert "z=0.77" in said and "2 participations of at most 3" in said and "8.500 vs server" in said
    out = CliRunner().invoke(cli, ["ledger", str(tmp_path / "s"), "--json"])
    got = json.loads(out.output)  # strict JSON: a tool reads it
    assert [(e["round"], e["unit"], e["epsilon"]) for e in got["events"]] == [
        (1, "record", 2.5), (2, "record", 5.0), (1, "user", 4.25), (2, "user", 8.5)]
    assert got["participations"] == 2 and got["user-plan"]["dp-max-participations"] == 3
    lines = (tmp_path / "s" / "ledger.jsonl.sealed").read_text().splitlines()
    (tmp_path / "s" / "ledger.jsonl.sealed").write_text(lines[0] + "\n")
    out = CliRunner().invoke(cli, ["ledger", str(tmp_path / "s")])
    assert isinstance(out.exception, TamperedStateError)
    out = CliRunner().invoke(cli, ["ledger", str(tmp_path / "nokey")])
    assert isinstance(out.exception, FileNotFoundError)


def test_a_crash_between_a_ledger_line_and_its_count_loses_no_event(tmp_path: Path) -> None:
    # Prepare: two events, then the count of the second is never written (a crash inside append)
    ledger = PrivacyLedger(tmp_path)

    def event(r: int) -> PrivacyEvent:
        return PrivacyEvent(round=r, unit="record", mechanism="m", noise_multiplier=1.0, clip=1.0, sample_rate=0.1,
                            steps=5, delta=1e-5, epsilon=float(r), accountant="prv", private=True)

    ledger.append(event(1))
    count_after_one = (tmp_path / "accountant.json.sealed").read_bytes()
    ledger.append(event(2))
    (tmp_path / "accountant.json.sealed").write_bytes(count_after_one)
    # Execute / Assert: the authentic second event stands (it is charged), the next append goes on
    assert [e.round for e in ledger.events()] == [1, 2] and ledger.history() == [(1.0, 0.1, 10)]
    ledger.append(event(3))
    assert [e.round for e in PrivacyLedger(tmp_path).events()] == [1, 2, 3]


def test_participations_count_rounds_trained_whatever_units_wrote_them(tmp_path: Path) -> None:
    from fedpgen.shared.privacy.ledger import participations

    def event(r: int, unit: str, attempt: int = 1) -> PrivacyEvent:
        return PrivacyEvent(round=r, unit=unit, mechanism="m", noise_multiplier=1.0, clip=1.0, sample_rate=1.0,
                            steps=1, delta=1e-5, epsilon=1.0, accountant="prv", private=True, attempt=attempt)

    # both units in round 1: one participation; a state-dir written before user-level events
    # (round 2's "none" at record level) then one after (round 3's user-level event): two more
    assert participations([event(1, "record"), event(1, "user"), event(2, "record"), event(3, "user")]) == 3
    # a crash between round 4's two events, then its retry: round 4 trained twice
    assert participations([event(4, "record"), event(4, "record", 2), event(4, "user")]) == 2
    assert participations([]) == 0
