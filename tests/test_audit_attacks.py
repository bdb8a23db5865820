"""Issue 13: the empirical attacks — planted canaries (exposure, black-box one-run bound) and
membership inference as each observer sees the run (final model, aggregate, per-device update)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from fedpgen.audit import canaries
from fedpgen.audit.runner import audit_run
from fedpgen.shared.config import RunConfig
from fedpgen.shared.population import ensure_population


def test_exposure_is_log2_of_the_space_over_the_rank() -> None:
    rng = np.random.default_rng(0)
    cands = rng.normal(3.0, 0.2, 2000)
    # In the middle of the candidates: rank about |R|/2, exposure about 1 bit
    middle = canaries.exposure(3.0, cands, repetitions=1)
    assert middle.exposure_empirical == pytest.approx(1.0, abs=0.1)
    assert middle.exposure_fit == pytest.approx(1.0, abs=0.1)
    # Below every candidate: the empirical rank is capped at log2(2001); the fit extrapolates
    # (a normal's tail at 8 standard deviations: -log2(Φ(-8)) = 50.5 bits, capped at log2 10^6)
    low = canaries.exposure(1.4, cands, repetitions=100)
    assert low.exposure_empirical == pytest.approx(math.log2(2001))
    assert low.exposure_fit == pytest.approx(math.log2(canaries.SPACE))


def test_planting_writes_documents_and_keeps_the_secret_off_the_devices(tmp_path: Path) -> None:
    users = []
    for name in ("u-a", "u-b", "u-c"):
        (tmp_path / "users" / name / "documents").mkdir(parents=True)
        users.append(tmp_path / "users" / name)
    run = tmp_path / "run"
    secret = canaries.plant(users, run_dir=run, one_run=400, per_repetition=2, chosen_users=2)
    planted = canaries.load(run)
    assert secret == run / "audit" / "canaries.json"
    exposure = planted.of("exposure")
    assert sorted(c.copies for c in exposure) == [1, 1, 10, 10, 100, 100]
    assert {c.user for c in exposure} == {"u-a", "u-b"}  # the chosen users only
    for c in exposure:
        texts = {(planted.users_dir / f).read_text() for f in c.files}
        assert texts == {canaries.canary_text(c.secret)} and len(c.files) == c.copies
    one_run = planted.of("one-run")
    assert len(one_run) == 400 and 140 < sum(c.included for c in one_run) < 260  # coins of 1/2
    assert all(c.copies in (0, 1) for c in one_run) and len({c.secret for c in planted.canaries}) == 406
    assert not any("canaries" in str(p) for p in (tmp_path / "users").rglob("*"))  # the secret is not in them
    # Planting twice would lose the first secret; a changed canary file makes the secret useless
    with pytest.raises(FileExistsError, match="already planted"):
        canaries.plant(users, run_dir=run)
    (planted.users_dir / exposure[0].files[0]).write_text("edited")
    with pytest.raises(ValueError, match="missing or changed since planting"):
        canaries.load(run)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real simulation without DP or SecAgg+, every message recorded, canaries planted first."""
    from fedpgen.simulate import simulate

    root = tmp_path_factory.mktemp("plain")
    cfg = RunConfig.from_mapping({**TINY, "run-dir": str(root / "run"), "num-users": 2, "min-fit-clients": 2,
                                  "num-server-rounds": 1, "dp": "off", "secure-aggregation": False,
                                  "wire-transcript": True, "personal-max-steps": 0})
    canaries.plant(ensure_population(cfg), run_dir=Path(cfg.run_dir), one_run=40, per_repetition=1,
                   repetitions=(1, 100), chosen_users=1)
    simulate(cfg)
    return Path(cfg.run_dir)


@pytest.mark.slow
def test_every_observer_is_attacked_and_the_per_device_view_is_what_the_server_received(plain_run: Path) -> None:
    from fedpgen.audit.views import VIEWS, Observer
    from fedpgen.server.results import read_jsonl

    result = audit_run(plain_run, attacks=("membership", "canaries"))
    assert {m.view for m in result.membership} == set(VIEWS.values())
    assert all(c.status == "pass" for c in result.checks) and len(result.checks) == 8  # ε = ∞: nothing refuted
    assert sorted(e.repetitions for e in result.exposure) == [1, 100]
    assert all(e.candidates == 1000 and 0 <= e.exposure_empirical <= math.log2(1001) for e in result.exposure)
    assert [o["canaries"] for o in result.one_run] == [40] * 4
    # The per-device updates the observer read from the server's transcript are the ones the server
    # averaged: their example-weighted mean, added to θ_{r-1}, is the checkpoint θ_r
    observer = Observer(plain_run, RunConfig.from_mapping(json.loads((plain_run / "config.json").read_text())))
    rows = read_jsonl(plain_run / "client_rounds.jsonl")
    users = sorted(observer.users)
    for r in (1,):
        mine = [row for row in rows if row["round"] == r]
        deltas = [observer.deltas[(users[row["client-index"]], r)] for row in mine]
        weights = [row["num-examples"] for row in mine]
        for before, after, *ds in zip(observer.theta_after(r - 1), observer.thetas[r], *deltas, strict=True):
            mean = sum(w * d.astype(np.float64) for w, d in zip(weights, ds, strict=True)) / sum(weights)
            np.testing.assert_allclose(before + mean, after, rtol=1e-5, atol=1e-7)
    assert any(np.abs(d).max() > 0 for ds in observer.deltas.values() for d in ds)


class _SeesTheCanaries:
    """An observer for whom every planted canary stands out (a mechanism that leaks them)."""

    def __init__(self, planted: canaries.Planted) -> None:
        self.included = {c.secret: c.included for c in planted.of("one-run")}

    def canary_records(self, user: str, texts: list[str]) -> list[int]:
        return [int(t[len(canaries.PREFIX):-1]) for t in texts]

    def score(self, view: str, user: str, records: list[int], tag: str) -> np.ndarray:
        return np.array([1.0 if self.included[s] else 0.0 for s in records])


def test_the_one_run_canary_audit_refutes_a_claim_an_observer_beats(tmp_path: Path) -> None:
    from fedpgen.audit.runner import AuditResult, _one_run_check

    users = [tmp_path / "users" / n for n in ("a", "b")]
    for u in users:
        (u / "documents").mkdir(parents=True)
    canaries.plant(users, run_dir=tmp_path / "run", one_run=1000, per_repetition=0)
    planted = canaries.load(tmp_path / "run")
    result = AuditResult(run_dir=tmp_path / "run")
    leak = _one_run_check(_SeesTheCanaries(planted), planted, "x", "leaky observer", 1.0, 1e-5, result)
    assert leak.status == "fail" and result.one_run[0]["lower-bound"] > 1.0
    assert result.one_run[0]["correct"] == result.one_run[0]["guesses"]
    claim_8 = _one_run_check(_SeesTheCanaries(planted), planted, "x", "leaky observer", 8.0, 1e-5, result)
    assert claim_8.status == "pass"  # ≤ 4.9 provable with 1000 canaries: ε = 8 cannot be refuted


@pytest.mark.slow
def test_with_secagg_there_is_no_device_update_to_attack_and_bad_inputs_are_named(plain_run: Path,
                                                                                   tmp_path: Path) -> None:
    run = Path(shutil.copytree(plain_run, tmp_path / "run"))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "secure-aggregation": True}))
    result = audit_run(run, attacks=("membership",))
    skipped = [c for c in result.checks if c.status == "not-checked"]
    assert [c.subject for c in skipped] == ["server without SecAgg+: each device's own update"]
    assert "masked vectors" in skipped[0].detail and len(result.membership) == 3
    # A planted canary removed since: the canary audit says why it cannot run, the rest still does
    secret = json.loads((run / canaries.CANARY_FILE).read_text())
    (run / canaries.CANARY_FILE).write_text(json.dumps({**secret, "users-dir": str(run / "users")}))
    (run / "users" / secret["canaries"][0]["files"][0]).unlink()
    result = audit_run(run, attacks=("canaries",))
    (check,) = result.checks
    assert check.status == "not-checked" and "missing or changed" in check.detail
