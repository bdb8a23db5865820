"""Issue 13: the audit recomputes every ε independently, bounds ε empirically, catches a lie,
and says clearly what it could not check."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedpgen.client.device import Device
from conftest import TINY
from fedpgen.audit.accounting import audit_device
from fedpgen.audit.membership import analyse, clopper_pearson, roc
from fedpgen.audit.one_run import epsilon_lower_bound, max_provable
from fedpgen.audit.runner import audit_run
from fedpgen.audit.whitebox import UnderstatedNoise, audit_mechanism, canary_layout
from fedpgen.cli import cli
from fedpgen.shared.config import RunConfig
from fedpgen.shared.population import ensure_population, state_dir
from fedpgen.shared.privacy.accounting import calibrate_sigma
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.shared.store import device_sealer




def test_the_one_run_bound_matches_the_papers_worked_example() -> None:
    # Steinke, Nasr & Jagielski (2023): m = 1000 canaries, r = 100 guesses, v = 75 right, δ = 1e-4
    assert epsilon_lower_bound(m=1000, r=100, v=75, delta=1e-4) == pytest.approx(0.67, abs=0.01)
    assert epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-4) == 0.0  # chance: nothing proven
    assert max_provable(m=1000, r=100, delta=1e-5) > epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-5)


def test_the_whitebox_audit_passes_the_honest_mechanism_and_catches_a_lie() -> None:
    # Prepare: σ calibrated so that 60 steps at q = 0.1 claim ε = 1
    sigma = calibrate_sigma(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=60, accountant="prv")
    params = dict(noise_multiplier=sigma, clip=1.0, sample_rate=0.1, steps=60, delta=1e-5, canaries=1000)
    # Execute
    honest = audit_mechanism(**params)
    lie = audit_mechanism(**params, mechanism=UnderstatedNoise)
    # Assert: both claim ε ≈ 1; only the lie is refuted (its bound is above its claim)
    assert honest.claimed_epsilon == pytest.approx(1.0, abs=0.02) and lie.claimed_epsilon == honest.claimed_epsilon
    assert honest.passed and honest.lower_bound < honest.claimed_epsilon
    assert not lie.passed and lie.lower_bound > 2 * lie.claimed_epsilon


def fake_run(root: Path, rounds: int = 2, **overrides: object) -> Path:
    """A run folder as a simulation leaves it (config, users, device state-dirs, the server's
    rows), made by the devices themselves without Flower: the audit reads files only."""
    values = {**TINY, "run-dir": str(root / "run"), "local-steps": 2, "personal-max-steps": 0,
              "num-server-rounds": rounds, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    cfg = RunConfig.from_mapping(values)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_toml_dict()))
    rows = []
    for i, user in enumerate(ensure_population(cfg)):
        d = Device(cfg, user_dir=user, state_dir=state_dir(cfg, user), client_index=i)
        for r in range(1, rounds + 1):
            _, n, metrics = d.fit(d.init_send, server_round=r)
            rows.append({"round": r, "num-examples": n, **metrics})
    (run / "client_rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run(tmp_path_factory.mktemp("honest"))


@pytest.fixture
def run_copy(honest_run: Path, tmp_path: Path) -> Path:
    """A copy of the honest run folder that a test may damage."""
    return Path(shutil.copytree(honest_run, tmp_path / "run"))


def test_a_ledger_rewritten_and_resealed_with_the_key_is_caught_by_recomputation(honest_run: Path,
                                                                                  tmp_path: Path) -> None:
    # Prepare: a device's ledger, copied and rewritten with a smaller ε, re-sealed with the key
    run = honest_run
    honest = sorted((run / "devices").iterdir())[0]
    forged = tmp_path / "forged"
    forged.mkdir()
    for name in ("device.key", "dp_plan.json.sealed", "device.json.sealed"):
        shutil.copy(honest / name, forged / name)
    events = PrivacyLedger(honest).events()
    ledger = PrivacyLedger(forged, device_sealer(forged, create=False))
    for e in events:
        ledger.append(dataclasses.replace(e, epsilon=e.epsilon / 2))
    assert [e.epsilon for e in ledger.events()] == [e.epsilon / 2 for e in events]  # the chain verifies
    cfg = json.loads((run / "config.json").read_text())
    # Execute
    checks = audit_device(forged, cfg=cfg)
    # Assert: the chain passes (the key holder re-sealed it), the arithmetic does not
    status = {(c.name, c.subject.split()[-1]): c.status for c in checks}
    assert status[("ledger chain", "forged")] == "pass"
    assert [c.status for c in checks if c.name == "ledger event: ε recomputed"] == ["fail", "fail"]
    assert not [c for c in audit_device(honest, cfg=cfg) if c.status == "fail"]


def test_a_user_level_ledger_past_its_participation_cap_fails_the_audit(tmp_path: Path) -> None:
    # Prepare: user-level DP only; one device's sealed plan says at most 2 rounds, its ledger holds 3
    # (a device built without the check, or a plan rewritten with the key: the auditor counts)
    run = fake_run(tmp_path, rounds=3, num_users=2, dp="off", user_dp="distributed", dp_max_participations=3)
    cfg = json.loads((run / "config.json").read_text())
    honest, lying = sorted((run / "devices").iterdir())[:2]
    ledger = PrivacyLedger(lying, device_sealer(lying, create=False))
    ledger.save_user_plan({**ledger.user_plan(), "dp-max-participations": 2})
    # Execute
    checks = {c.subject: c for c in audit_device(lying, cfg=cfg) + audit_device(honest, cfg=cfg)
              if c.name == "never past the participation cap"}
    # Assert
    assert checks[lying.name].status == "fail" and "3 participations" in checks[lying.name].detail
    assert checks[honest.name].status == "pass"


def test_user_level_ledger_events_are_recomputed_and_a_halved_one_is_caught(tmp_path: Path) -> None:
    # Prepare: user-level DP only, 2 rounds; one device's ledger copied with each user-level ε halved,
    # re-sealed with its key (what a device or operator holding the key could write)
    run = fake_run(tmp_path, rounds=2, num_users=2, dp="off", user_dp="distributed", user_noise_multiplier=0.8)
    cfg = json.loads((run / "config.json").read_text())
    honest = sorted((run / "devices").iterdir())[0]
    rows = [json.loads(x) for x in (run / "client_rounds.jsonl").read_text().splitlines()]
    forged = tmp_path / "forged"
    forged.mkdir()
    for name in ("device.key", "device.json.sealed", "user_dp_plan.json.sealed"):
        shutil.copy(honest / name, forged / name)
    ledger = PrivacyLedger(forged, device_sealer(forged, create=False))
    for e in PrivacyLedger(honest).events():
        ledger.append(dataclasses.replace(e, epsilon=e.epsilon / 2))
    # Execute
    mine = [r for r in rows if r["client-index"] == 0]
    good, bad = audit_device(honest, cfg=cfg, server_rows=mine), audit_device(forged, cfg=cfg)
    # Assert: each participation's ε against the server is recomputed (two more accountants, one of
    # them Google's) and agrees with the wire (no record-level mechanism: ε = ∞); halved, it fails
    name = "user-level ledger event (vs server): ε recomputed"
    assert [c.status for c in good if c.name == name] == ["pass", "pass"]
    assert not [c for c in good if c.status == "fail"], [c for c in good if c.status == "fail"]
    assert {c.name for c in good} >= {"ledger vs server rows", "user-level ledger event (vs server): PRV vs PLD"}
    assert [c.status for c in bad if c.name == name] == ["fail", "fail"]


def test_the_audit_command_passes_an_honest_run_and_names_what_fails(run_copy: Path) -> None:
    run = run_copy
    ok = CliRunner().invoke(cli, ["audit", str(run), "--attacks", "accounting,whitebox", "--canaries", "200"])
    assert ok.exit_code == 0, ok.output
    report = json.loads((run / "audit" / "audit.json").read_text())
    assert report["passed"] and report["counts"]["pass"] >= 20
    assert "<img src='data:image/png;base64," in (run / "audit" / "report.html").read_text()
    # A device's state-dir tampered on disk: the chain fails, named in the output and the exit code
    ledger_file = sorted((run / "devices").iterdir())[1] / "ledger.jsonl.sealed"
    ledger_file.write_text(ledger_file.read_text().splitlines()[0] + "\n")
    bad = CliRunner().invoke(cli, ["audit", str(run), "--attacks", "accounting"])
    assert bad.exit_code == 1 and "ledger chain" in bad.output


def test_the_product_mechanism_under_audit_is_the_one_the_run_uses(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug in the product's DP-SGD (σ/10 added, σ accounted) at ε = 1: the run's audit fails
    run = fake_run(tmp_path, rounds=3, dp_epsilon=1.0, local_steps=20, min_records=40)
    monkeypatch.setattr("fedpgen.audit.whitebox.RecordDP", UnderstatedNoise)
    result = audit_run(run, attacks=("whitebox",), canaries=1000)
    assert [c.status for c in result.checks] and all(c.status == "fail" for c in result.checks)
    assert all(w.lower_bound > w.claimed_epsilon for w in result.whitebox)


def test_bad_inputs_say_what_could_not_be_checked(run_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        audit_run(tmp_path / "nowhere")
    run = run_copy
    shutil.rmtree(run / "devices")  # a deployment server's folder: no device state
    result = audit_run(run, attacks=("accounting",))
    notes = {c.name: c for c in result.checks if c.status == "not-checked"}
    assert "no device state-dirs" in notes["device ledgers"].detail
    assert any(c.name.startswith("server view") and c.status == "pass" for c in result.checks)
    with pytest.raises(ValueError, match="unknown audit"):
        audit_run(run, attacks=("telepathy",))


@pytest.mark.parametrize(("canaries", "rate"), [(1000, 1 / 51), (1000, 1 / 13), (7, 1 / 3), (1000, 1.0)])
def test_canaries_are_laid_out_at_exactly_the_devices_sample_rate(canaries: int, rate: float) -> None:
    records, batch = canary_layout(canaries, rate)
    assert records >= canaries and 1 / math.ceil(records / batch) == pytest.approx(rate, rel=1e-12)


def test_clopper_pearson_and_the_membership_statistics_match_hand_values() -> None:
    low, high = clopper_pearson(0, 10)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    members, nonmembers = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.5])
    r = analyse(members, nonmembers, epsilon=1.0, delta=1e-5, view="hand")
    assert r.auc == pytest.approx(8 / 9)  # of 9 (member, non-member) pairs, 8 rank the member higher
    fpr, tpr = roc(members, nonmembers)
    assert fpr[-1] == tpr[-1] == 1.0 and fpr[0] == tpr[0] == 0.0
    # A record and its copy, one trained on and one held out, score alike: no threshold separates them
    fpr, tpr = roc(np.array([2.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 0.0]))
    assert fpr.tolist() == [0.0, 0.0, 2 / 3, 1.0] and tpr.tolist() == [0.0, 0.25, 1.0, 1.0]
    ties = analyse(np.full(3000, 0.5), np.full(3000, 0.5), epsilon=0.01, delta=1e-5, view="copies")
    assert ties.worst_excess <= 0 and ties.tpr_at[0.001][0] == 0.0 and ties.auc == 0.5


def test_membership_inference_refutes_only_a_claim_it_beats() -> None:
    rng = np.random.default_rng(0)
    # Members' losses far below non-members': a perfect attack, 2000 each
    separable = analyse(rng.normal(5, 1, 2000), rng.normal(-5, 1, 2000), epsilon=1.0, delta=1e-5, view="leak")
    assert separable.auc > 0.99 and separable.worst_excess > 0  # refutes ε = 1
    assert analyse(rng.normal(5, 1, 2000), rng.normal(-5, 1, 2000), epsilon=20.0, delta=1e-5,
                   view="leak").worst_excess <= 0  # but not ε = 20
    chance = analyse(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), epsilon=1.0, delta=1e-5, view="none")
    assert chance.auc_ci[0] < 0.5 < chance.auc_ci[1] and chance.worst_excess <= 0


def test_membership_without_a_checkpoint_is_not_checked(run_copy: Path) -> None:
    result = audit_run(run_copy, attacks=("membership",))
    (check,) = result.checks
    assert check.status == "not-checked" and "no shared base" in check.detail


def test_the_server_view_of_a_run_without_dp_says_not_private() -> None:
    from fedpgen.audit.accounting import audit_server_view

    rows = [{"round": r, "client-index": 0, "dp-epsilon": math.inf, "dp-sigma": 0.0, "dp-sample-rate": 0.0,
             "dp-steps": 0, "dp-delta": 1e-5, "dp-accountant": "none"} for r in (1, 2)]
    (check,) = audit_server_view(rows, cfg={})
    assert (check.name, check.status) == ("server view: not private", "pass")
    rows[1]["dp-epsilon"] = 0.5  # a noiseless round claiming a finite ε
    assert audit_server_view(rows, cfg={})[0].status == "fail"


def user_level_rounds(z: float, q: float, rounds: int) -> list[dict[str, float]]:
    """rounds.jsonl's user-level rows as the server writes them: the accountant's ε after each round."""
    from fedpgen.shared.privacy.user_level import user_epsilon

    return [{"round": r, "client-sample-rate": q,
             "user-epsilon": user_epsilon(noise_multiplier=z, sample_rate=q, rounds=r, delta=1e-5, accountant="prv")}
            for r in range(1, rounds + 1)]


def test_the_user_level_epsilon_of_rounds_and_of_the_summary_is_recomputed_and_a_lie_fails() -> None:
    from fedpgen.audit.accounting import audit_summary_user_level, audit_user_level

    # Prepare: a distributed DP-FedAvg run's config and the server's honest rows (z = 0.77, q = 0.2, 4 rounds;
    # the wide text cohort's ε = 8 point has 10)
    cfg = {"user-dp": "distributed", "user-noise-multiplier": 0.77, "dp-delta": 1e-5, "dp-accountant": "prv"}
    rounds = user_level_rounds(0.77, 0.2, 4)
    honest = rounds[-1]["user-epsilon"]
    assert 5.7 < honest < 5.9  # the wide text cohort's ε = 8 run wrote 5.78 after round 4 (z = 0.7715)
    # Execute / Assert: honest rows pass every recomputation (3 checks, each round)
    checks = audit_user_level(rounds, cfg=cfg)
    assert len(checks) == 12 and {c.status for c in checks} == {"pass"}
    # a round's ε understated: that round's same-accountant recomputation fails
    lied = [dict(r) for r in rounds]
    lied[-1]["user-epsilon"] = honest / 2
    assert [c.subject for c in audit_user_level(lied, cfg=cfg) if c.status == "fail"] == ["round 4"]
    # the summary's user-level ε must be the accountant's after the last round
    (ok,) = audit_summary_user_level({"user-epsilon": honest}, rounds, cfg=cfg)
    assert ok.status == "pass"
    for claim in (honest / 2, None, rounds[0]["user-epsilon"]):
        (bad,) = audit_summary_user_level({"user-epsilon": claim}, rounds, cfg=cfg)
        assert bad.status == "fail" and f"{honest:.4f}" in bad.detail
    (old,) = audit_summary_user_level({"epsilon-by-client": {}}, rounds, cfg=cfg)  # written before the field
    assert old.status == "not-checked" and "fedpgen summary" in old.detail
    assert audit_summary_user_level({"user-epsilon": None}, rounds, cfg={"user-dp": "off"}) == []


def test_a_distributed_round_applied_with_fewer_noise_shares_than_sized_for_fails_the_audit() -> None:
    from fedpgen.audit.accounting import audit_noise_shares

    # Prepare: distributed DP-FedAvg, 48 sampled per round, 4 may drop out (0.1: shares sized for 44)
    cfg = {"user-dp": "distributed", "user-noise-multiplier": 0.77, "user-noise-dropouts": 0.1}
    rounds = [{**row, "sampled": 48, "clients": 48 - row["round"]} for row in user_level_rounds(0.77, 0.2, 4)]
    # Execute / Assert: 47, 46, 45, 44 contributors: every round carried at least the accounted noise
    (ok,) = audit_noise_shares(rounds, cfg=cfg)
    assert ok.status == "pass" and "4 rounds" in ok.detail
    # a round applied with 43 (a server that went on after too many dropouts): named, and how short
    rounds[2]["clients"] = 43
    rounds.append({**rounds[-1], "round": 5, "sampled": 0, "clients": 0})  # an empty draw: the server's noise
    (short,) = audit_noise_shares(rounds, cfg=cfg)
    assert short.status == "fail" and "round 3: 43 of 48" in short.detail and short.values == {"3": 43 / 44}
    # rows written before the field, central noise (the server adds all of it), no user-level DP
    (old,) = audit_noise_shares([{k: v for k, v in r.items() if k != "sampled"} for r in rounds], cfg=cfg)
    assert old.status == "not-checked"
    assert audit_noise_shares(rounds, cfg={**cfg, "user-dp": "central"}) == []
    assert audit_noise_shares(rounds, cfg={"user-dp": "off"}) == []


def test_the_user_level_epsilon_against_the_server_is_recomputed_and_an_amplified_one_in_its_place_fails() -> None:
    import dp_accounting

    from fedpgen.audit.accounting import audit_user_level_vs_server

    # Prepare: distributed DP-FedAvg under SecAgg+ at z = 0.77, 10 rounds at q = 0.2 (amplified ε 8.0);
    # the server received replies from node 7 in 3 rounds, from node 8 in 1
    cfg = {"user-dp": "distributed", "user-noise-multiplier": 0.77, "dp-delta": 1e-5, "dp-accountant": "prv",
           "secure-aggregation": True}
    rounds = [{**row, "sampled": 48} for row in user_level_rounds(0.77, 0.2, 10)]
    replies = [{"round": r, "node-id": 7} for r in (1, 4, 9)] + [{"round": 2, "node-id": 8}]
    honest = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(
        dp_accounting.GaussianDpEvent(0.77), 3).get_epsilon(1e-5)
    assert 11.0 < honest < 12.0
    # Execute / Assert: the summary's figure (the server's PRV) passes; the amplified ε in its place fails
    (ok,) = audit_user_level_vs_server({"user-epsilon-vs-server": honest * 1.001}, rounds, replies, cfg=cfg)
    assert ok.status == "pass" and "node 7, 3 replies" in ok.detail
    (bad,) = audit_user_level_vs_server({"user-epsilon-vs-server": rounds[-1]["user-epsilon"]}, rounds, replies,
                                        cfg=cfg)
    assert bad.status == "fail"
    # central noise: the server saw the deltas before its noise; only ∞ passes
    central = {**cfg, "user-dp": "central"}
    (central_fails,) = audit_user_level_vs_server({"user-epsilon-vs-server": honest}, rounds, replies, cfg=central)
    assert central_fails.status == "fail"
    assert audit_user_level_vs_server({"user-epsilon-vs-server": math.inf}, rounds, replies,
                                      cfg=central)[0].status == "pass"
    (old,) = audit_user_level_vs_server({}, rounds, replies, cfg=cfg)
    assert old.status == "not-checked"
