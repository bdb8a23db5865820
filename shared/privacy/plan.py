"""The device's DP plan for the whole run: σ for the private steps its preset's schedule takes,
in each of the rounds it may train in (``dp-max-participations``, else every round). Under
user-level DP the device keeps the parameters it first trained with and its participation cap
(:func:`check_user_plan`): the server draws the cohorts, so only the device can hold the cap."""

from __future__ import annotations

import dataclasses

from fedpgen.shared.config import RunConfig
from fedpgen.shared.presets import Preset
from fedpgen.shared.privacy.accounting import calibrate_sigma, compose, epsilon, poisson_sample_rate
from fedpgen.shared.privacy.ledger import PrivacyLedger
from fedpgen.shared.privacy.user_level import epsilon_vs_server_bound


class BudgetExhaustedError(RuntimeError):
    """The next round would spend more than the device's ε budget: the device refuses to train."""


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """Planned once per device for the whole run (σ for participations × steps × q), then stored."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    target_epsilon: float
    participations: int = 0  # rounds it may train in (dp-max-participations); 0 = no cap but the budget

    @classmethod
    def make(cls, cfg: RunConfig, preset: Preset, *, num_records: int) -> DPPlan:
        if not cfg.dp_delta < 1.0 / num_records:
            raise ValueError(f"config 'dp-delta': {cfg.dp_delta} must be < 1/records = 1/{num_records}")
        q = poisson_sample_rate(num_records, cfg.batch_size)
        steps = preset.private_steps(cfg)  # the schedule the device executes: one count
        if cfg.dp == "epsilon":
            sigma = calibrate_sigma(target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta, sample_rate=q,
                                    steps=steps * cfg.planned_participations, accountant=cfg.dp_accountant)
        else:
            sigma = cfg.dp_noise_multiplier
        return cls(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, rounds=cfg.num_server_rounds,
                   target_epsilon=cfg.dp_epsilon,
                   participations=cfg.planned_participations if cfg.dp_max_participations else 0)

    def check_config(self, cfg: RunConfig) -> None:
        """Privacy parameters are never silently changed mid-run: a different config is an error."""
        if cfg.dp == "epsilon" and cfg.dp_epsilon != self.target_epsilon:
            raise ValueError(f"config 'dp-epsilon': {cfg.dp_epsilon} differs from the {self.target_epsilon} this "
                             "device planned its run with; privacy parameters cannot change mid-run")
        if cfg.dp == "sigma" and cfg.dp_noise_multiplier != self.noise_multiplier:
            raise ValueError(f"config 'dp-noise-multiplier': {cfg.dp_noise_multiplier} differs from the "
                             f"{self.noise_multiplier} this device has been using; it cannot change mid-run")
        if cfg.record_dp and (cfg.planned_participations if cfg.dp_max_participations else 0) != self.participations:
            raise ValueError(f"config 'dp-max-participations': this run allows {cfg.planned_participations} "
                             f"participations but the device planned σ for {self.participations}; privacy "
                             "parameters cannot change mid-run")

    def check_budget(self, history: list, *, spent: int, delta: float, accountant: str, budget: float) -> float:
        """Return ε after one more round; raise ``BudgetExhaustedError`` if it would exceed ``budget``
        or if the device has spent all its planned participations (``spent``: its ledger's events)."""
        if self.participations and spent >= self.participations:
            now = epsilon(history, delta=delta, accountant=accountant)
            raise BudgetExhaustedError(f"participation cap reached: trained {spent} of at most {self.participations} "
                                       f"rounds (dp-max-participations; ε spent {now:.3f} of {budget:.3f}, "
                                       f"δ={delta:g}); refusing to train")
        nxt = epsilon(compose(history, sigma=self.noise_multiplier, sample_rate=self.sample_rate,
                              steps=self.steps_per_round), delta=delta, accountant=accountant)
        if nxt > budget * (1 + 1e-6):
            now = epsilon(history, delta=delta, accountant=accountant)
            raise BudgetExhaustedError(f"privacy budget exhausted: ε spent {now:.3f}, the next round would reach "
                                       f"{nxt:.3f} > budget {budget:.3f} (δ={delta:g}); refusing to train")
        return nxt


def user_plan(cfg: RunConfig) -> dict[str, object]:
    """The user-level parameters a device trains with, and its cap (0: every round)."""
    return {"user-dp": cfg.user_dp, "user-clip": cfg.user_clip, "user-noise-multiplier": cfg.user_noise_multiplier,
            "user-noise-dropouts": cfg.user_noise_dropouts,
            "dp-max-participations": cfg.planned_participations if cfg.dp_max_participations else 0}


def check_user_plan(cfg: RunConfig, ledger: PrivacyLedger, *, save: bool = False) -> None:
    """User-level DP: raise ``ValueError`` if ``cfg`` changes the parameters this device first
    trained with (stored sealed; ``save`` stores them the first time), ``BudgetExhaustedError``
    once it has trained in ``dp-max-participations`` rounds (its ledger's events, retries
    included). Enforced here, on the device: the server draws the cohorts and sends the run
    config, so a cap it kept itself would bound nothing against it (docs/privacy.md)."""
    if cfg.user_dp == "off":
        return
    want, stored = user_plan(cfg), ledger.user_plan()
    changed = sorted(k for k in want if stored and stored.get(k) != want[k])
    if changed:
        raise ValueError(f"config {', '.join(repr(k) for k in changed)}: {[want[k] for k in changed]} differs from "
                         f"the {[stored.get(k) for k in changed]} this device trained with; user-level privacy "
                         "parameters cannot change mid-run")
    cap, spent = int(want["dp-max-participations"]), ledger.participations()
    if cap and spent >= cap:
        bound = epsilon_vs_server_bound(mode=cfg.user_dp, secure_aggregation=cfg.secure_aggregation,
                                        noise_multiplier=cfg.user_noise_multiplier, participations=cap,
                                        delta=cfg.dp_delta, accountant=cfg.dp_accountant)
        raise BudgetExhaustedError(f"participation cap reached: trained {spent} of at most {cap} rounds "
                                   f"(dp-max-participations; user-level ε against the server, which knows whom it "
                                   f"sampled, ≤ {bound:.3f}, δ={cfg.dp_delta:g}); refusing to train")
    if save and not stored:
        ledger.save_user_plan(want)


def check_stored_budget(cfg: RunConfig, ledger: PrivacyLedger) -> None:
    """Raise ``BudgetExhaustedError`` if this device's stored plan cannot afford another round
    (record level), or its user-level participation cap is reached (:func:`check_user_plan`).

    Cheap (no model, no data): reads the device's plans and accountant history only.
    """
    check_user_plan(cfg, ledger)
    if not cfg.record_dp:
        return
    stored = ledger.plan()
    if stored:
        DPPlan(**stored).check_budget(ledger.history(), spent=len(ledger.events("record")), delta=cfg.dp_delta,
                                      accountant=cfg.dp_accountant, budget=cfg.dp_epsilon)
