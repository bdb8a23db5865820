"""User-level DP (DP-FedAvg): clipping to S, noise on the sum, fixed denominator, its own ε.

The definition the tests hold the code to (docs/privacy.md, "User-level DP"): each device's
delta is clipped to norm S; Gaussian noise of std z·S is added to the *sum* (by the server,
or as n shares by the n sampled devices); the sum is divided by n, the number of devices
*sampled* (not the number that replied); ε is the Poisson-subsampled Gaussian at q = n / N
over the rounds run. Noise is measured over many coordinates and compared at 5 standard
errors: a correct implementation fails one such check about once in two million runs.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from fedpgen.server.results import RunRecorder, read_jsonl
from fedpgen.server.strategy import SharedDeltaStrategy
from fedpgen.shared.config import RunConfig
from fedpgen.shared.privacy.user_level import (add_noise_share, calibrate_user_noise, clip_delta, cohort_sample_rate,
                                               noise_survivors, user_epsilon, user_level_mean)
from fedpgen.shared.wire import NO_USABLE_DATA, STATE_TAMPERED, keys_digest

from conftest import Proxy, device, error_bound, secagg_mean, simulation_script

dp_accounting = pytest.importorskip("dp_accounting")

NAMES = ("a.lora_A.shared.weight", "a.lora_B.shared.weight")
WIDE = [(200, 100), (20_000,)]  # 40 000 coordinates: a noise std measured to ±1.8% at 5 standard errors


def reference_epsilon(*, z: float, q: float, rounds: int, delta: float, accountant: str) -> float:
    """ε from Google's dp-accounting, an implementation independent of Opacus: PLD for the
    (near-exact) PRV accountant, its own RDP accountant for RDP."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    if accountant == "prv":
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(delta)
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def strategy_for(make_cfg: Callable[..., RunConfig], tmp_path: Path, *, shapes: list[tuple[int, ...]],
                 completed: int = 0, **overrides: object) -> SharedDeltaStrategy:
    cfg = make_cfg(min_fit_clients=2, num_server_rounds=10, run_dir=str(tmp_path / "run"), **overrides)
    return SharedDeltaStrategy(cfg=cfg, names=NAMES, theta=[np.zeros(s, np.float32) for s in shapes],
                               completed=completed, opt_state={}, recorder=RunRecorder(tmp_path / "run", cfg))


class ExpectedCohort(random.Random):
    """A stand-in for the strategy's coin where a test is about what follows the sampling: of the
    ``available`` devices asked in a round, the first ``n`` are drawn (the expected cohort)."""

    def __init__(self, n: int, available: int) -> None:
        super().__init__()
        self.n, self.available, self.asked = n, available, 0

    def random(self) -> float:
        self.asked += 1
        return 0.0 if (self.asked - 1) % self.available < self.n else 1.0


def sample(strategy: SharedDeltaStrategy, server_round: int, population: int) -> tuple[list[Proxy], int]:
    """Configure a round over ``population`` devices, drawing the expected cohort n = q·N (under
    user-level DP the real draw is Poisson: test_user_level_cohorts_are_poisson_sampled...):
    the sampled ones and the n they are told."""
    manager = SimpleClientManager()
    for i in range(population):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    available = population - len(strategy.refused)
    cfg = strategy.cfg
    q = cohort_sample_rate(population=available, fraction=cfg.fraction_fit, min_clients=cfg.min_fit_clients)
    strategy.coin = ExpectedCohort(round(q * available), available)
    configured = strategy.configure_fit(server_round, None, manager)  # type: ignore[arg-type]
    return [p for p, _ in configured], int(configured[0][1].config["sampled-clients"])  # type: ignore[misc]


def play_round(strategy: SharedDeltaStrategy, server_round: int, population: int,
               shapes: list[tuple[int, ...]]) -> None:
    """Sample a round (:func:`sample`) and aggregate a reply of norm 0.1 from every device drawn."""
    proxies, _ = sample(strategy, server_round, population)
    strategy.aggregate_fit(server_round, [(p, reply(along(shapes, 0, 0.1))) for p in proxies], [])


def reply(arrays: list[np.ndarray]) -> FitRes:
    """A device's reply under user-level DP: its delta at weight 1."""
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {"keys-digest": keys_digest(NAMES)})


def along(shapes: list[tuple[int, ...]], array: int, norm: float) -> list[np.ndarray]:
    """A delta of global norm ``norm``, spread evenly over array ``array`` (zero elsewhere)."""
    size = int(np.prod(shapes[array]))
    return [np.full(s, norm / math.sqrt(size) if i == array else 0.0, np.float32) for i, s in enumerate(shapes)]


def assert_gaussian_around(got: list[np.ndarray], mean: list[np.ndarray], std: float) -> None:
    """``got`` = ``mean`` + i.i.d. N(0, std²) noise: the residual's RMS is ``std`` and each array's
    average residual is 0, each to 5 standard errors (1/√(2D) relative, std/√D absolute)."""
    residual = [g.astype(np.float64) - m for g, m in zip(got, mean, strict=True)]
    coords = sum(r.size for r in residual)
    rms = math.sqrt(sum(float((r**2).sum()) for r in residual) / coords)
    assert rms == pytest.approx(std, rel=5 / math.sqrt(2 * coords))
    for r in residual:
        assert abs(float(r.mean())) < 5 * std / math.sqrt(r.size)


def test_clip_delta_bounds_the_global_norm_and_keeps_small_ones() -> None:
    big = [np.full((3, 4), 2.0, np.float32), np.full(5, -1.0, np.float32)]
    clipped = clip_delta(big, 0.5)
    assert np.sqrt(sum(float((c**2).sum()) for c in clipped)) == pytest.approx(0.5, rel=1e-5)
    scale = float(clipped[0].flat[0] / big[0].flat[0])  # one scale for all arrays: the direction is kept
    for c, b in zip(clipped, big):
        np.testing.assert_allclose(c, b * scale, rtol=1e-6)
    small = [np.full(4, 0.01, np.float32)]
    np.testing.assert_array_equal(clip_delta(small, 0.5)[0], small[0])


def test_distributed_noise_shares_sum_to_the_central_noise() -> None:
    rng = np.random.default_rng(0)
    n, std = 16, 0.3
    total = sum(add_noise_share([np.zeros(20_000)], std=std, num_clients=n, rng=rng)[0] for _ in range(n))
    assert float(np.std(total)) == pytest.approx(std, rel=0.03)


def test_user_level_mean_uses_the_fixed_denominator() -> None:
    deltas = [[np.array([1.0, 2.0])], [np.array([3.0, 0.0])]]
    got = user_level_mean(deltas, num_sampled=4, central_std=0.0, rng=np.random.default_rng())
    np.testing.assert_allclose(got[0], [1.0, 0.5])


def test_user_epsilon_of_no_rounds_is_zero_and_of_no_noise_infinite() -> None:
    assert user_epsilon(noise_multiplier=1.0, sample_rate=0.1, rounds=0, delta=1e-5, accountant="prv") == 0.0
    assert user_epsilon(noise_multiplier=0.0, sample_rate=0.1, rounds=5, delta=1e-5, accountant="prv") == math.inf


@pytest.mark.parametrize(("z", "q", "rounds", "accountant"), [
    (1.0, 0.1, 50, "prv"), (1.0, 0.5, 3, "prv"), (0.8, 0.2, 20, "rdp"), (1.0, 0.5, 3, "rdp"),
])
def test_user_epsilon_agrees_with_an_independent_accountant(z: float, q: float, rounds: int, accountant: str) -> None:
    # Tolerances: PRV and PLD are both near-exact for the subsampled Gaussian and differ by their
    # discretizations (measured <= 0.3% on these cases); the two RDP accountants bound the same
    # Rényi divergences on different grids of orders (measured <= 0.2%).
    got = user_epsilon(noise_multiplier=z, sample_rate=q, rounds=rounds, delta=1e-5, accountant=accountant)
    want = reference_epsilon(z=z, q=q, rounds=rounds, delta=1e-5, accountant=accountant)
    assert got == pytest.approx(want, rel=0.02 if accountant == "prv" else 0.01)


CENTRAL_Z1 = {"user_dp": "central", "user_noise_multiplier": 1.0, "secure_aggregation": False, "fraction_fit": 0.2}


def test_each_rounds_user_epsilon_is_at_q_sampled_over_population_and_survives_a_resume(make_cfg,
                                                                                         tmp_path: Path) -> None:
    # Prepare: z = 1, 2 of 10 devices sampled each round (q = 0.2)
    settings, shapes = CENTRAL_Z1, [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, **settings)
    # Execute: two rounds, then a new strategy resumed after them (as from the round-2 checkpoint)
    for r in (1, 2):
        play_round(strategy, r, 10, shapes)
    play_round(strategy_for(make_cfg, tmp_path, shapes=shapes, completed=2, **settings), 1, 10, shapes)
    # Assert: round r's ε is that of r subsampled Gaussian rounds at q = 0.2, by another accountant
    rows = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [row["round"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert row["client-sample-rate"] == 0.2
        want = reference_epsilon(z=1.0, q=0.2, rounds=row["round"], delta=1e-5, accountant="prv")
        assert row["user-epsilon"] == pytest.approx(want, rel=0.02)



def test_each_round_is_accounted_at_its_own_q_when_refusals_change_it_and_after_a_resume(make_cfg,
                                                                                        tmp_path: Path) -> None:
    # Prepare: 9 devices, fraction 0.2, min-fit-clients 2: round 1 draws at q = 2/9; then a device
    # refuses, and from round 2 on q = 2/8 (where min-fit-clients binds, a cap reached, a spent
    # budget or a refusal moves q)
    settings, shapes = CENTRAL_Z1, [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, **settings)
    play_round(strategy, 1, 9, shapes)
    strategy.mark_refused({8: NO_USABLE_DATA}, 1)
    play_round(strategy, 2, 9, shapes)
    # Execute: a server restarted from the round-2 checkpoint runs round 3
    resumed = strategy_for(make_cfg, tmp_path, shapes=shapes, completed=2, **settings)
    resumed.mark_refused({8: NO_USABLE_DATA}, 2)
    play_round(resumed, 1, 9, shapes)
    # Assert: ε composes each round at its own q, by another accountant (not every round at the last q)
    rows = read_jsonl(tmp_path / "run" / "rounds.jsonl")
    assert [(row["round"], row["client-sample-rate"]) for row in rows] == [(1, 2 / 9), (2, 0.25), (3, 0.25)]
    for row in rows:
        rates = [2 / 9] + [0.25] * (row["round"] - 1)
        gaussian = dp_accounting.GaussianDpEvent(1.0)
        event = dp_accounting.ComposedDpEvent([dp_accounting.PoissonSampledDpEvent(q, gaussian) for q in rates])
        want = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-5)
        assert row["user-epsilon"] == pytest.approx(want, rel=0.02), row["round"]


def test_a_restarted_server_reads_past_rates_past_a_torn_line_and_charges_what_it_cannot_read(tmp_path: Path) -> None:
    from fedpgen.server.strategy import past_user_rates

    rows = [{"round": 1, "client-sample-rate": 0.3, "user-epsilon": 1.0},
            {"round": 2, "out-of-bounds": "refused"},  # a refused round: no row of ε, counted in the checkpoint
            {"round": 3, "client-sample-rate": 0.2, "user-epsilon": 1.5},
            {"round": 5, "client-sample-rate": 0.2, "user-epsilon": 2.0}]  # after the checkpoint: not yet
    path = tmp_path / "rounds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 4, "client-sam')
    assert past_user_rates(path, 4) == [0.3, 0.2, None, None]
    assert past_user_rates(tmp_path / "none.jsonl", 2) == [None, None]


def test_q_is_over_the_devices_that_can_be_sampled_not_over_all_registered(make_cfg, tmp_path: Path) -> None:
    # Prepare: 10 registered, 2 of them refused in an earlier round (never sampled again)
    strategy = strategy_for(make_cfg, tmp_path, shapes=[(2, 3), (3,)], user_dp="central", fraction_fit=0.2,
                            secure_aggregation=False)
    strategy.mark_refused({0: NO_USABLE_DATA, 1: STATE_TAMPERED}, 0)
    # Execute: round 1 samples ceil(0.2 * 8) = 2 of the 8 that can be sampled
    proxies, n = sample(strategy, 1, population=10)
    strategy.aggregate_fit(1, [(p, reply(along([(2, 3), (3,)], 0, 0.1))) for p in proxies], [])
    # Assert: each of the 8 was in the cohort with probability 2/8, not 2/10: that q is accounted
    assert n == 2 and not {p.node_id for p in proxies} & {0, 1}
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert row["client-sample-rate"] == 0.25
    assert row["user-epsilon"] == pytest.approx(reference_epsilon(z=1.0, q=0.25, rounds=1, delta=1e-5,
                                                                  accountant="prv"), rel=0.02)

@pytest.mark.parametrize(("target", "population", "fraction", "rounds"), [(8.0, 300, 0.1, 10), (1.0, 1000, 0.1, 10)])
def test_calibrated_user_noise_spends_the_target_by_another_accountant(target: float, population: int,
                                                                         fraction: float, rounds: int) -> None:
    q = cohort_sample_rate(population=population, fraction=fraction, min_clients=2)
    z = calibrate_user_noise(target_epsilon=target, sample_rate=q, rounds=rounds, delta=1e-5, accountant="prv")
    spent = reference_epsilon(z=z, q=q, rounds=rounds, delta=1e-5, accountant="prv")
    assert spent <= target * 1.02  # within the accountants' 2% (above)
    assert spent >= target * 0.97  # not a needlessly large z: Opacus' search stops within 0.01 of the target
    assert reference_epsilon(z=z * 0.95, q=q, rounds=rounds, delta=1e-5, accountant="prv") > target


def test_cohort_sample_rate_is_what_the_strategy_accounts(make_cfg, tmp_path: Path) -> None:
    # 7 % of 30 devices, at least 2: each drawn with probability 0.07 (an expected 2.1), the rate accounted
    shapes = [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, user_dp="central", fraction_fit=0.07,
                            secure_aggregation=False)
    proxies, _ = sample(strategy, 1, population=30)
    strategy.aggregate_fit(1, [(p, reply(along(shapes, 0, 0.01))) for p in proxies], [])
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert row["client-sample-rate"] == cohort_sample_rate(population=30, fraction=0.07, min_clients=2) == 0.07
    assert cohort_sample_rate(population=30, fraction=0.01, min_clients=2) == 2 / 30  # min-fit-clients wins
    with pytest.raises(ValueError, match="cannot be sampled"):
        cohort_sample_rate(population=3, fraction=0.5, min_clients=5)


def test_the_dp_sweep_sets_a_user_level_point_that_the_server_accounts_as_its_target() -> None:
    sweep = simulation_script("dp_sweep")
    base = {"task": "behavior", "data": "synthetic", "num-users": 300, "fraction-fit": 0.1, "min-fit-clients": 10,
            "num-server-rounds": 10}
    point = sweep.privacy_overrides(base, 8.0, "user")
    assert point["dp"] == "off" and point["user-dp"] == "distributed"  # no DP-SGD: the unit is the user
    cfg = RunConfig.from_mapping({**base, **point})
    # What the server reports after the run's 10 rounds at q = 30 / 300 (strategy._record)
    spent = user_epsilon(noise_multiplier=cfg.user_noise_multiplier, sample_rate=0.1, rounds=10,
                         delta=cfg.dp_delta, accountant=cfg.dp_accountant)
    assert 7.8 < spent <= 8.0 * 1.001
    assert sweep.privacy_overrides(base, 8.0, "record") == {"dp": "epsilon", "dp-epsilon": 8.0, "user-dp": "off"}
    assert sweep.privacy_overrides(base, math.inf, "user") == {"dp": "off", "user-dp": "off"}


def test_central_noise_has_std_z_s_over_n_around_the_clipped_mean(make_cfg, tmp_path: Path) -> None:
    # Prepare: S = 1, z = 0.1, 5 of 10 devices sampled, 4 reply. Two deltas of norm 10 (clipped to
    # S by the server) and two of norm 0.25 (kept). z is small so that the clipped mean stands
    # 20 standard errors above zero: the noise hides one user's share, as it should, when z ~ 1.
    z, clip = 0.1, 1.0
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp="central", user_noise_multiplier=z,
                            user_clip=clip, secure_aggregation=False, fraction_fit=0.5)
    proxies, n = sample(strategy, 1, population=10)
    assert n == len(proxies) == 5
    deltas = [along(WIDE, 0, 10.0), along(WIDE, 0, 10.0), along(WIDE, 1, -0.25), along(WIDE, 1, -0.25)]
    # Execute
    params, _ = strategy.aggregate_fit(1, [(p, reply(d)) for p, d in zip(proxies, deltas)], [])
    # Assert: θ (from 0) = (Σ clipped Δ_i) / n + N(0, (z·S/n)²) per coordinate
    clipped_sum = [a + b for a, b in zip(along(WIDE, 0, 2 * clip), along(WIDE, 1, -0.5), strict=True)]
    assert_gaussian_around(parameters_to_ndarrays(params), [s.astype(np.float64) / n for s in clipped_sum],
                           std=z * clip / n)


def test_under_distributed_dp_the_server_neither_clips_nor_adds_noise(make_cfg, tmp_path: Path) -> None:
    # Prepare: deltas of norm 1 > S = 0.5, as devices send them (clipped, plus their noise shares)
    shapes = [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, user_dp="distributed", user_noise_multiplier=1.0,
                            user_clip=0.5, secure_aggregation=False, fraction_fit=0.5, user_noise_dropouts=0.2)
    proxies, n = sample(strategy, 1, population=10)
    rng = np.random.default_rng(0)
    raw = [[rng.normal(size=s) for s in shapes] for _ in range(4)]
    deltas = [[(x / math.sqrt(sum(float((y**2).sum()) for y in d))).astype(np.float32) for x in d] for d in raw]
    # Execute: 4 of the 5 sampled devices reply (one dropout tolerated: user-noise-dropouts = 0.2)
    params, _ = strategy.aggregate_fit(1, [(p, reply(d)) for p, d in zip(proxies, deltas)], [])
    # Assert: exactly their sum over the n = 5 sampled; the shares carry the noise already
    for i, got in enumerate(parameters_to_ndarrays(params)):
        np.testing.assert_allclose(got, sum(d[i].astype(np.float64) for d in deltas) / n, rtol=1e-6, atol=1e-7)


def test_a_distributed_dp_device_clips_to_s_and_adds_its_share_of_the_noise(make_cfg, tmp_path: Path) -> None:
    # Prepare: the same user on two devices, without record-level DP (so both train identically):
    # one adds its noise share (distributed), the other does not (central: the server would).
    # n = 4 sampled, half may drop out: the share is sized for t = 2 survivors.
    z, clip, n = 1.0, 0.05, 4
    settings = {"dp": "off", "user_noise_multiplier": z, "user_clip": clip, "personal_max_steps": 0}
    noisy = device(make_cfg(user_dp="distributed", user_noise_dropouts=0.5, **settings), state=tmp_path / "distributed")
    plain = device(make_cfg(user_dp="central", **settings), state=tmp_path / "central")
    # Execute
    with_share, _, _ = noisy.fit(noisy.init_send, server_round=1, sampled_clients=n)
    clipped, weight, _ = plain.fit(plain.init_send, server_round=1, sampled_clients=n)
    # Assert: the delta is clipped to S (training moved it further), weight 1; the difference is
    # this device's share N(0, z²S²/t) of the noise on the sum, t = 2 of the n = 4
    assert math.sqrt(sum(float((c.astype(np.float64) ** 2).sum()) for c in clipped)) == pytest.approx(clip, rel=1e-4)
    assert weight == 1
    assert_gaussian_around(with_share, [c.astype(np.float64) for c in clipped], std=z * clip / math.sqrt(2))


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_secagg_with_user_level_dp_divides_the_aggregate_sum_by_the_sampled_n(make_cfg, tmp_path: Path,
                                                                               mode: str) -> None:
    # Prepare: SecAgg+ hands every reply the same unmasked mean of the k = 4 replies (weight 1 each);
    # 5 devices were sampled (distributed: one dropout tolerated). Two deltas at norm S along one
    # array, two at S/2 along the other.
    z, clip, k = 0.1, 1.0, 4
    tolerated = {"user_noise_dropouts": 0.2} if mode == "distributed" else {}
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp=mode, user_noise_multiplier=z, user_clip=clip,
                            secure_aggregation=True, fraction_fit=0.5, **tolerated)
    cfg = strategy.cfg
    proxies, n = sample(strategy, 1, population=10)
    deltas = [[a.astype(np.float64) for a in d] for d in
              (along(WIDE, 0, clip), along(WIDE, 0, clip), along(WIDE, 1, -clip / 2), along(WIDE, 1, -clip / 2))]
    bounds = {"clipping_range": cfg.secagg_clipping_range, "quantization_range": cfg.secagg_quantization,
              "max_weight": cfg.secagg_max_weight}
    aggregate = secagg_mean(deltas, [1] * k, **bounds)
    bound = error_bound(num_clients=k, weights=[1.0] * k, max_abs_delta=clip, **bounds)
    for a, *ds in zip(aggregate, *deltas, strict=True):  # a real SecAgg+ mean of these deltas
        assert float(np.abs(a - sum(ds) / k).max()) <= bound
    # Execute
    params, _ = strategy.aggregate_fit(1, [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(aggregate), 1,
                                                      {"keys-digest": keys_digest(NAMES)})) for p in proxies[:k]], [])
    # Assert: θ (from 0) = k·mean / n (the sum over the fixed denominator), plus z·S/n noise if central
    got = parameters_to_ndarrays(params)
    expected = [a * k / n for a in aggregate]
    if mode == "central":
        assert_gaussian_around(got, expected, std=z * clip / n)
    else:
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-9)
    assert read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]["user-epsilon"] < math.inf


# -- Dropouts under distributed noise: n devices are told to share the noise, fewer may answer ----
# Each share is N(0, z²S²/t), sized for t = n − ⌊dropouts·n⌋ survivors (``user-noise-dropouts``):
# k ≥ t shares sum to noise of std ≥ z·S; with k < t the sum carries z·S·√(k/t) only, and the
# round's ε, accounted at z, would be understated. Such a round is refused, never applied.


def test_a_distributed_round_with_fewer_devices_than_its_noise_was_sized_for_is_refused(make_cfg,
                                                                                      tmp_path: Path) -> None:
    # Prepare: 5 of 10 devices sampled, each adds its share sized for all 5 (dropouts 0, the default)
    z, clip, shapes = 1.0, 0.5, [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, user_dp="distributed", user_noise_multiplier=z,
                            user_clip=clip, secure_aggregation=False, fraction_fit=0.5)
    proxies, n = sample(strategy, 1, population=10)
    rng = np.random.default_rng(0)
    deltas = [add_noise_share(along(shapes, 0, clip), std=z * clip, num_clients=n, rng=rng) for _ in range(4)]
    # Execute: one device drops out, 4 shares of 5 reach the server
    params, _ = strategy.aggregate_fit(1, [(p, reply(d)) for p, d in zip(proxies, deltas)], [])
    # Assert: the base is unchanged, the round is refused and says why; no user-level ε is charged for it
    for got in parameters_to_ndarrays(params):
        np.testing.assert_array_equal(got, 0.0)
    assert strategy.refused_rounds == [1] and strategy.user_rounds == 0
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert "4 of 5" in row["out-of-bounds"] and "user-noise-dropouts" in row["out-of-bounds"]


def test_shares_sized_for_the_tolerated_dropouts_keep_the_noise_on_the_mean_at_z_s_over_n(make_cfg,
                                                                                        tmp_path: Path) -> None:
    # Prepare: 5 sampled, 2 may drop out (0.4): shares sized for t = 3; exactly 3 answer with zero deltas
    z, clip = 1.0, 1.0
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp="distributed", user_noise_multiplier=z,
                            user_clip=clip, secure_aggregation=False, fraction_fit=0.5, user_noise_dropouts=0.4)
    proxies, n = sample(strategy, 1, population=10)
    survivors = noise_survivors(n, strategy.cfg.user_noise_dropouts)
    assert (n, survivors) == (5, 3)
    rng = np.random.default_rng(1)
    zero = [np.zeros(s, np.float32) for s in WIDE]
    deltas = [add_noise_share(zero, std=z * clip, num_clients=survivors, rng=rng) for _ in range(survivors)]
    # Execute
    params, _ = strategy.aggregate_fit(1, [(p, reply(d)) for p, d in zip(proxies, deltas)], [])
    # Assert: applied, with the calibrated noise z·S on the sum, over the fixed denominator n
    assert strategy.user_rounds == 1
    assert_gaussian_around(parameters_to_ndarrays(params), [np.zeros(s) for s in WIDE], std=z * clip / n)


def test_user_noise_dropouts_is_validated_and_only_means_something_for_distributed_noise(make_cfg) -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="'user-noise-dropouts'"):
            make_cfg(user_dp="distributed", user_noise_dropouts=bad)
    with pytest.raises(ValueError, match="'user-noise-dropouts'.*distributed"):
        make_cfg(user_dp="central", user_noise_dropouts=0.2)
    assert [noise_survivors(n, 0.1) for n in (1, 9, 10, 48)] == [1, 9, 9, 44]
    # at 0 older runs' checkpoints stay theirs (test_cross_validation); any other value is another run
    assert make_cfg(user_dp="distributed", user_noise_dropouts=0.1).model_hash() != \
        make_cfg(user_dp="distributed").model_hash()


class NoGrid:
    """A grid no message may go through: the refusal comes before any key share is asked for."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the grid was used ({name}) for a sum that must not be unmasked")


def test_under_secagg_a_masked_sum_with_too_few_noise_shares_is_never_unmasked(make_cfg, tmp_path: Path) -> None:
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedpgen.server.secure_aggregation import _SecAggPlus, secagg_parameters

    # Prepare: 5 sampled under SecAgg+ with distributed noise; 4 masked vectors reached the sum
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp="distributed", secure_aggregation=True,
                            fraction_fit=0.5)
    proxies, n = sample(strategy, 1, population=10)
    workflow = _SecAggPlus(strategy, max_shares=strategy.cfg.secagg_max_shares, **secagg_parameters(strategy.cfg))
    state = WorkflowState(sampled_node_ids={p.node_id for p in proxies},
                          active_node_ids={p.node_id for p in proxies[:4]})
    # Execute: the unmask stage, which would ask the survivors for the dropout's key shares
    unmasked = workflow.unmask_stage(NoGrid(), None, state)  # type: ignore[arg-type]
    # Assert: SecAgg+ halts with the round refused (not a failure), the grid untouched, the base kept
    assert unmasked is False and strategy.refused_rounds == [1] and strategy.user_rounds == 0
    assert "nothing unmasked" in read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]["out-of-bounds"]
    tolerant = strategy_for(make_cfg, tmp_path / "tolerant", shapes=WIDE, user_dp="distributed",
                            secure_aggregation=True, fraction_fit=0.5, user_noise_dropouts=0.2)
    sample(tolerant, 1, population=10)
    assert not tolerant.refuse_if_noise_short(4) and tolerant.refuse_if_noise_short(3)


def test_under_secagg_a_device_that_refuses_at_setup_leaves_the_others_shares_sized_for_those_that_train(
        make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common import FitIns
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    from fedpgen.server.secure_aggregation import _SecAggPlus, secagg_parameters

    # Prepare: 5 drawn under SecAgg+ with distributed noise and no dropout tolerated; one refuses
    # at setup (its participation cap reached, drawn by a server restarted without its counts).
    # Flower's own key-sharing stage is stood in for: what is tested is what follows it.
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp="distributed", secure_aggregation=True,
                            fraction_fit=0.5)
    proxies, n = sample(strategy, 1, population=10)
    ins = FitIns(ndarrays_to_parameters([np.zeros(2, np.float32)]), {"server-round": 1, "sampled-clients": n})
    state = WorkflowState(nid_to_fitins={p.node_id: compat.fitins_to_recorddict(ins, True) for p in proxies},
                          active_node_ids={p.node_id for p in proxies[1:]})
    workflow = _SecAggPlus(strategy, max_shares=strategy.cfg.secagg_max_shares, **secagg_parameters(strategy.cfg))
    monkeypatch.setattr(SecAggPlusWorkflow, "share_keys_stage", lambda self, grid, context, state: True)
    # Execute
    workflow.share_keys_stage(NoGrid(), None, state)  # type: ignore[arg-type]
    # Assert: the 4 that will train are told 4 before they train (each share N(0, z²S²/4)), so their
    # sum carries z·S and is unmasked; a dropout during training is still one too many
    fit_configs = [state.nid_to_fitins[nid].config_records["fitins.config"] for nid in state.active_node_ids]
    told = {config["sampled-clients"] for config in fit_configs}
    assert n == 5 and told == {4}
    assert not strategy.refuse_if_noise_short(4) and strategy.refuse_if_noise_short(3)


# -- Client sampling under user-level DP: Poisson, as the accountant assumes ----------------------
# A fixed-size cohort of n is not Poisson: adding a user swaps another out (the sum moves by up to
# 2·S), and the ε of z at q = n/N understates it (at z = 0.77, q = 0.2, 10 rounds: 8.0 stated,
# 30.0 by the same accountant at sensitivity 2·S). Each device is drawn with probability q.


def test_user_level_cohorts_are_poisson_sampled_from_a_secret_coin(make_cfg, tmp_path: Path) -> None:
    # Prepare: q = 0.2 of 50 devices (n = 10 expected)
    strategy = strategy_for(make_cfg, tmp_path, shapes=[(2,)], user_dp="central", fraction_fit=0.2,
                            secure_aggregation=False)
    manager = SimpleClientManager()
    for i in range(50):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    # Execute: 400 draws (round 1 configured again and again: nothing else changes between them)
    sizes, drawn = [], Counter()
    for _ in range(400):
        configured = strategy.configure_fit(1, None, manager)  # type: ignore[arg-type]
        sizes.append(len(configured))
        drawn.update(p.node_id for p, _ in configured)
        assert all(int(ins.config["sampled-clients"]) == len(configured) for _, ins in configured)
    # Assert: the size is Binomial(50, 0.2) (mean 10, variance 8; a fixed-size cohort's variance is 0)
    # and each device is drawn with probability 0.2, each to 5 standard errors
    assert abs(statistics.mean(sizes) - 10) < 5 * math.sqrt(8 / 400)
    assert abs(statistics.variance(sizes) - 8) < 5 * 8 * math.sqrt(2 / 399)
    assert all(abs(drawn[i] / 400 - 0.2) < 5 * math.sqrt(0.16 / 400) for i in range(50))
    # the coin is not Python's seeded generator: the same seed does not give the same cohort
    cohorts = []
    for _ in range(2):
        random.seed(0)
        cohorts.append(sorted(p.node_id for p, _ in strategy.configure_fit(1, None, manager)))  # type: ignore[arg-type]
    assert cohorts[0] != cohorts[1]


def test_the_mean_divides_by_the_expected_cohort_not_by_the_draw(make_cfg, tmp_path: Path) -> None:
    # Prepare: q = 0.5 of 10 (n = 5 expected); the draw gives 3, all answer (their shares carry the noise)
    shapes = [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, user_dp="distributed", user_clip=1.0,
                            secure_aggregation=False, fraction_fit=0.5)
    manager = SimpleClientManager()
    for i in range(10):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    strategy.coin = ExpectedCohort(3, 10)
    configured = strategy.configure_fit(1, None, manager)  # type: ignore[arg-type]
    assert [int(ins.config["sampled-clients"]) for _, ins in configured] == [3, 3, 3]  # shares sized for 3
    deltas = [along(shapes, i % 2, 0.5) for i in range(3)]
    # Execute
    params, _ = strategy.aggregate_fit(1, [(p, reply(d)) for (p, _), d in zip(configured, deltas)], [])
    # Assert: the sum over the fixed n = 5, whatever the draw (one user moves the mean by S/5 at most)
    for i, got in enumerate(parameters_to_ndarrays(params)):
        np.testing.assert_allclose(got, sum(d[i].astype(np.float64) for d in deltas) / 5, rtol=1e-6)
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert (row["sampled"], row["clients"], row["client-sample-rate"]) == (3, 3, 0.5)


def test_a_draw_of_nobody_releases_the_noise_alone_and_is_accounted(make_cfg, tmp_path: Path) -> None:
    # Prepare: q = 0.5 of 10, z = 0.3, S = 1; the draw is empty
    z, clip = 0.3, 1.0
    strategy = strategy_for(make_cfg, tmp_path, shapes=WIDE, user_dp="distributed", user_noise_multiplier=z,
                            user_clip=clip, secure_aggregation=True, fraction_fit=0.5)
    manager = SimpleClientManager()
    for i in range(10):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    strategy.coin = ExpectedCohort(0, 10)
    # Execute
    configured = strategy.configure_fit(1, None, manager)  # type: ignore[arg-type]
    # Assert: no device asked; θ (from 0) = N(0, (z·S)²) / 5, a checkpoint, and the round's ε at q = 0.5
    assert configured == [] and strategy.user_rounds == 1
    assert_gaussian_around(strategy.theta, [np.zeros(s) for s in WIDE], std=z * clip / 5)
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert (row["round"], row["clients"], row["sampled"]) == (1, 0, 0)
    assert row["user-epsilon"] == pytest.approx(reference_epsilon(z=z, q=0.5, rounds=1, delta=1e-5,
                                                                  accountant="prv"), rel=0.02)
    assert (tmp_path / "run" / "checkpoints" / "round_0001.safetensors").is_file()


def test_against_the_server_which_draws_the_cohorts_the_user_level_epsilon_is_not_amplified(make_cfg,
                                                                                          tmp_path: Path) -> None:
    from fedpgen.server.summary import privacy_lines, user_epsilon_vs_server

    # Prepare: 3 rounds of 4 sampled devices each; node 7 took part in all three, node 8 in one
    run, z = tmp_path / "run", 0.77
    run.mkdir()
    rounds = [{"round": r, "sampled": 4, "client-sample-rate": 0.2,
               "user-epsilon": reference_epsilon(z=z, q=0.2, rounds=r, delta=1e-5, accountant="prv")}
              for r in (1, 2, 3)]
    replies = [{"round": r, "node-id": 7} for r in (1, 2, 3)] + [{"round": 1, "node-id": 8}]
    (run / "client_rounds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in replies))

    def vs_server(**settings: object) -> tuple[float, int]:
        got = user_epsilon_vs_server(run, rounds, make_cfg(user_noise_multiplier=z, **settings))
        assert got is not None
        return got

    # Execute / Assert: distributed under SecAgg+: three Gaussian mechanisms at z, no sampling
    # (the server knew node 7 was in), by another accountant; far above the amplified ε of q = 0.2
    eps, times = vs_server(user_dp="distributed", secure_aggregation=True)
    assert times == 3 and eps == pytest.approx(reference_epsilon(z=z, q=1.0, rounds=3, delta=1e-5, accountant="prv"),
                                               rel=0.02)
    assert eps > 2 * rounds[-1]["user-epsilon"]
    # without SecAgg+ the server sees each delta with its own share: z / sqrt(4) per round
    eps, _ = vs_server(user_dp="distributed", secure_aggregation=False)
    assert eps == pytest.approx(reference_epsilon(z=z / 2, q=1.0, rounds=3, delta=1e-5, accountant="prv"), rel=0.02)
    # ... unless its rounds predate the sampled field: the share size is unknown, no protection is shown
    unsized = [{k: v for k, v in r.items() if k != "sampled"} for r in rounds]
    cfg = make_cfg(user_dp="distributed", user_noise_multiplier=z, secure_aggregation=False)
    assert user_epsilon_vs_server(run, unsized, cfg) == (math.inf, 3)
    # central: the server sees the deltas before it adds the noise
    assert vs_server(user_dp="central", secure_aggregation=True)[0] == math.inf
    assert user_epsilon_vs_server(run, rounds, make_cfg(user_dp="off")) is None
    # and the run's privacy lines say both, plainly
    cfg = make_cfg(user_dp="distributed", user_noise_multiplier=z, secure_aggregation=True, dp="off")
    lines = privacy_lines(run, rounds, cfg=cfg)
    said = vs_server(user_dp="distributed", secure_aggregation=True)[0]
    assert any("against the server" in line and f"{said:.2f}" in line and "3 rounds" in line for line in lines)
    assert any("Poisson-sampled cohorts)" in line for line in lines)
    # a run written before Poisson cohorts (no sampled field) is not said to have had them
    assert any("fixed-size cohorts" in line and "2·S" in line for line in privacy_lines(run, unsized, cfg=cfg))


def test_under_user_level_dp_a_device_refuses_past_its_participation_cap_whatever_the_server_asks(
        make_cfg, tmp_path: Path) -> None:
    from fedpgen.client.device import preflight
    from fedpgen.shared.population import ensure_population
    from fedpgen.shared.privacy.plan import BudgetExhaustedError

    # Prepare: user-level DP only (no DP-SGD), at most 2 participations in 10 rounds. A server
    # that ignores the cap (or lies about it) asks the device a third time.
    settings = {"dp": "off", "user_dp": "distributed", "user_noise_multiplier": 0.8, "num_server_rounds": 10,
                "personal_max_steps": 0}
    cfg = make_cfg(dp_max_participations=2, **settings)
    d = device(cfg, state=tmp_path / "capped")
    # Execute / Assert: it trains twice, then refuses, naming the cap and its bound against the server
    for r in (1, 5):
        d.fit(d.init_send, server_round=r, sampled_clients=4)
    with pytest.raises(BudgetExhaustedError, match=r"participation cap reached: trained 2 of at most 2 .*server"):
        d.fit(d.init_send, server_round=9, sampled_clients=4)
    assert len(d.ledger.events()) == 2
    with pytest.raises(BudgetExhaustedError, match="participation cap"):  # the cheap pre-round check as well
        preflight(cfg, user_dir=ensure_population(cfg)[0], state_dir=tmp_path / "capped")
    # the cap and the user-level parameters it trained with cannot change mid-run (a server's new run config)
    for changed in ({"dp_max_participations": 3}, {"dp_max_participations": 0},
                    {"dp_max_participations": 2, "user_noise_multiplier": 0.4}):
        later = device(make_cfg(**{**settings, **changed}), state=tmp_path / "capped")
        with pytest.raises(ValueError, match="cannot change mid-run"):
            later.fit(later.init_send, server_round=9, sampled_clients=4)
    assert len(d.ledger.events()) == 2


def test_under_user_level_dp_the_server_never_samples_a_device_past_its_participation_cap(make_cfg,
                                                                                         tmp_path: Path) -> None:
    # Prepare: 6 devices, q = 0.5 Poisson cohorts, at most 2 participations each, no DP-SGD
    strategy = strategy_for(make_cfg, tmp_path, shapes=[(2,), (2,)], dp="off", user_dp="distributed",
                            dp_max_participations=2, fraction_fit=0.5)
    manager = SimpleClientManager()
    for i in range(6):
        manager.register(Proxy(i))  # type: ignore[arg-type]
    # Execute
    configure = strategy.configure_fit
    sampled = [[c.node_id for c, _ in configure(r, None, manager)] for r in range(1, 11)]  # type: ignore[arg-type]
    # Assert: nobody past the cap, and the server knows whom it stopped asking
    counts = Counter(node for cohort in sampled for node in cohort)
    assert max(counts.values()) <= 2, counts
    assert strategy.capped() == {node for node, k in counts.items() if k == 2}


def test_the_participation_cap_bounds_the_user_level_epsilon_against_the_server(make_cfg, tmp_path: Path) -> None:
    from fedpgen.server.summary import privacy_lines, user_epsilon_vs_server_bound

    # Prepare: distributed noise under SecAgg+, z = 0.77, at most 2 of 10 rounds per user
    z, run = 0.77, tmp_path / "run"
    run.mkdir()
    capped = make_cfg(dp="off", user_dp="distributed", user_noise_multiplier=z, secure_aggregation=True,
                      dp_max_participations=2)
    # Execute / Assert: two Gaussian mechanisms at z, by another accountant, whoever is drawn how often
    bound = user_epsilon_vs_server_bound(capped)
    assert bound == pytest.approx(reference_epsilon(z=z, q=1.0, rounds=2, delta=1e-5, accountant="prv"), rel=0.02)
    assert any("at most 2 rounds per user" in line and f"{bound:.2f}" in line
               for line in privacy_lines(run, [], cfg=capped))
    # no cap: no bound below the rounds run; central noise: the server sees the deltas; no user-level DP: None
    assert user_epsilon_vs_server_bound(make_cfg(**{**capped.to_toml_dict(), "dp-max-participations": 0})) == \
        pytest.approx(reference_epsilon(z=z, q=1.0, rounds=capped.num_server_rounds, delta=1e-5, accountant="prv"),
                      rel=0.02)
    assert user_epsilon_vs_server_bound(make_cfg(user_dp="central", dp_max_participations=2)) == math.inf
    assert user_epsilon_vs_server_bound(make_cfg(user_dp="off")) is None


def test_q_stays_at_fraction_fit_as_devices_leave_so_the_calibrated_epsilon_is_not_overspent(make_cfg,
                                                                                             tmp_path: Path) -> None:
    # Prepare: z calibrated for q = 0.1 (30 devices, fraction-fit 0.1); then 3 of them leave the
    # population a round can sample (a cap reached, a budget spent, a refusal)
    shapes = [(2, 3), (3,)]
    strategy = strategy_for(make_cfg, tmp_path, shapes=shapes, user_dp="central", user_noise_multiplier=0.0,
                            fraction_fit=0.1, secure_aggregation=False)
    strategy.mark_refused({0: NO_USABLE_DATA, 1: NO_USABLE_DATA, 2: NO_USABLE_DATA}, 0)
    # Execute: a round over the 27 left, every device drawn replying a delta of norm 0.1 along array 0
    proxies, _ = sample(strategy, 1, population=30)
    strategy.aggregate_fit(1, [(p, reply(along(shapes, 0, 0.1))) for p in proxies], [])
    # Assert: each was drawn with probability 0.1, the rate z was calibrated for (old: ⌈2.7⌉/27 = 0.111,
    # an ε above the target at every such round), and the mean divides by the expected cohort 0.1·27 = 2.7
    row = read_jsonl(tmp_path / "run" / "rounds.jsonl")[-1]
    assert row["client-sample-rate"] == pytest.approx(0.1, abs=1e-15)
    assert cohort_sample_rate(population=27, fraction=0.1, min_clients=2) == pytest.approx(0.1, abs=1e-15)
    norm = float(np.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in strategy.theta)))
    assert norm == pytest.approx(len(proxies) * 0.1 / 2.7, rel=1e-4)


@pytest.mark.parametrize(("secagg", "seen"), [(True, 0.8), (False, 0.8 / math.sqrt(4))])
def test_under_user_level_dp_the_device_ledger_charges_each_participation_at_what_the_server_sees(
        make_cfg, tmp_path: Path, secagg: bool, seen: float) -> None:
    # Prepare: user-level DP only (no DP-SGD): distributed noise, z = 0.8, S = 0.05, 4 devices drawn
    cfg = make_cfg(dp="off", user_dp="distributed", user_noise_multiplier=0.8, user_clip=0.05, num_server_rounds=10,
                   personal_max_steps=0, secure_aggregation=secagg)
    d = device(cfg, state=tmp_path / "d")
    # Execute: two participations
    for r in (1, 5):
        _, _, metrics = d.fit(d.init_send, server_round=r, sampled_clients=4)
    # Assert: one user-level event per participation, charged as the server sees it (it drew the
    # cohort: no amplification, q = 1): z under SecAgg+, the lone share's z/√t without (t = 4);
    # ε composed over the participations, by another accountant (old: "none", ε = ∞ NOT PRIVATE)
    events = d.ledger.events()
    assert [(e.round, e.unit, e.private, e.sample_rate, e.steps, e.clip) for e in events] == [
        (1, "user", True, 1.0, 1, 0.05), (5, "user", True, 1.0, 1, 0.05)]
    for k, e in enumerate(events, 1):
        assert e.noise_multiplier == pytest.approx(seen, rel=1e-12)
        event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(seen), k)
        want = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4).compose(event).get_epsilon(1e-5)
        assert e.epsilon == pytest.approx(want, rel=0.02)
    assert d.ledger.participations() == 2 and d.ledger.history() == []  # no record-level event to compose
    # the wire is unchanged: no record-level mechanism (σ = 0, ε = ∞), user-level ε is the server's to state
    assert (metrics["dp-sigma"], metrics["dp-epsilon"], metrics["dp-attempt"]) == (0.0, math.inf, 1)
    # a retry of round 5 (a server restarted before its checkpoint) is charged again, and says so on the wire
    _, _, metrics = d.fit(d.init_send, server_round=5, sampled_clients=4)
    assert [(e.round, e.attempt) for e in d.ledger.events()] == [(1, 1), (5, 1), (5, 2)]
    assert metrics["dp-attempt"] == 2 and d.ledger.participations() == 3


def test_with_record_and_user_level_dp_each_round_is_one_participation_with_an_event_per_unit(make_cfg,
                                                                                               tmp_path: Path) -> None:
    from fedpgen.shared.privacy.plan import BudgetExhaustedError

    # Prepare: DP-SGD on the device and DP-FedAvg on the sum, at most 2 rounds
    cfg = make_cfg(dp="epsilon", dp_epsilon=8.0, user_dp="distributed", user_noise_multiplier=0.8,
                   num_server_rounds=10, dp_max_participations=2, personal_max_steps=0)
    d = device(cfg, state=tmp_path / "both")
    # Execute: two rounds, then a third asked for
    for r in (1, 5):
        _, _, metrics = d.fit(d.init_send, server_round=r, sampled_clients=4)
    with pytest.raises(BudgetExhaustedError, match="participation cap reached"):
        d.fit(d.init_send, server_round=9, sampled_clients=4)
    # Assert: two events a round, one per unit, two participations (not four: the cap is of rounds);
    # each unit composes on its own, and the wire carries the record-level one
    events = d.ledger.events()
    assert [(e.round, e.unit) for e in events] == [(1, "record"), (1, "user"), (5, "record"), (5, "user")]
    assert d.ledger.participations() == 2
    record = [e for e in events if e.unit == "record"]
    assert d.ledger.history() == [(record[0].noise_multiplier, record[0].sample_rate, 2 * record[0].steps)]
    assert d.ledger.history("user") == [(0.8, 1.0, 2)]  # (σ, q, steps): equal entries compose by adding steps
    assert metrics["dp-epsilon"] == record[-1].epsilon < 8.0 * (1 + 1e-6)
