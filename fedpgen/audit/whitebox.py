"""White-box audit of the DP-SGD mechanism as implemented, with gradient (Dirac) canaries.

Threat model: the strongest observer of one device — it sees every noised gradient step of
the device's DP session (more than the per-round update a server without SecAgg+ sees) and
may plant canaries whose gradients it chooses (allowed in Steinke et al. 2023, §6). Canary i
owns coordinate i of a parameter vector; when included its gradient is a vector along that
coordinate, larger than C (so clipped to exactly C); when excluded it is absent (a record
with zero gradient, so the Poisson sample rate is unchanged). Each canary is included with
probability 1/2. The auditor's score of canary i is minus the sum over steps of the noised
gradient's coordinate i; the one-run bound (``one_run.py``) turns guesses into an ε lower
bound at 95% confidence.

The mechanism under audit is FedPGen's own (``RecordDP`` → Opacus ``DPOptimizer`` with the
secret noise generator), run at a device's planned (σ, C, q, steps): a mechanism that adds
less noise than its accountant records shows a bound above its claim and fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedpgen.audit.one_run import Guesses, best_guesses, max_provable
from fedpgen.shared.privacy.accounting import epsilon
from fedpgen.shared.privacy.mechanism import RecordDP

MechanismFactory = Callable[..., RecordDP]


class UnderstatedNoise(RecordDP):
    """A lie for the audit's own tests and benchmark (never built by a run): adds σ/10 of
    noise while its accountant history records σ. The white-box audit must catch it."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        claimed = self.noise_multiplier
        self.noise_multiplier = claimed / 10
        try:
            return super().open(*args, **kwargs)
        finally:
            self.noise_multiplier = claimed

    def record(self, *, sigma: float, sample_rate: float, steps: int) -> None:
        super().record(sigma=self.noise_multiplier, sample_rate=sample_rate, steps=steps)


@dataclasses.dataclass(frozen=True)
class WhiteboxResult:
    noise_multiplier: float  # as claimed by the mechanism's accountant history
    clip: float
    sample_rate: float
    steps: int
    delta: float
    claimed_epsilon: float
    guesses: Guesses
    max_provable: float  # what a perfect attack with these many canaries could show

    @property
    def lower_bound(self) -> float:
        return self.guesses.epsilon

    @property
    def passed(self) -> bool:
        """The mechanism keeps its claim: the measured lower bound does not exceed it."""
        return self.lower_bound <= self.claimed_epsilon


class _CanaryModel(torch.nn.Module):
    """One coordinate per canary, as an embedding row (Opacus computes exact per-sample gradients)."""

    def __init__(self, canaries: int) -> None:
        super().__init__()
        # padding_idx None: exact per-sample gradients (docs/privacy.md, "Exact per-record gradients")
        self.w = torch.nn.Embedding(canaries, 1)

    def per_record_loss(self, batch: torch.Tensor, push: float) -> torch.Tensor:
        # record = (canary index, included): an included canary's gradient is -push along its own row
        return -(batch[:, 1].float() * push) * self.w(batch[:, 0]).squeeze(-1)


def canary_layout(canaries: int, sample_rate: float) -> tuple[int, int]:
    """``(records, batch)``: at least ``canaries`` records, split so that Opacus' Poisson rate
    ``1/⌈records/batch⌉`` is exactly ``sample_rate`` (FedPGen's rates are always 1/k)."""
    batches = round(1.0 / sample_rate)
    if batches < 1 or abs(1.0 / batches - sample_rate) > 1e-12:
        raise ValueError(f"sample rate {sample_rate} is not 1/k for an integer k (FedPGen's rates always are)")
    batch = math.ceil(canaries / batches)
    return batches * batch, batch


def audit_mechanism(*, noise_multiplier: float, clip: float, sample_rate: float, steps: int, delta: float,
                    canaries: int = 1000, accountant: str = "prv", mechanism: MechanismFactory | None = None,
                    seed: int = 0, confidence: float = 0.95) -> WhiteboxResult:
    """Run ``mechanism`` (FedPGen's ``RecordDP``, looked up at each call, by default) for ``steps`` DP steps over ``canaries``
    Dirac canaries and return the one-run lower bound against the ε its accountant claims.

    ``seed`` draws which canaries are included (the auditor's secret); the mechanism's own
    noise and sampling come from its secret generators as in production.
    """
    if canaries < 2 or steps < 1:
        raise ValueError(f"need >= 2 canaries and >= 1 step, got {canaries} and {steps}")
    canaries, batch = canary_layout(canaries, sample_rate)  # rounded up to a whole number of batches
    included = np.random.default_rng(seed).random(canaries) < 0.5
    records = torch.stack([torch.arange(canaries), torch.as_tensor(included, dtype=torch.long)], dim=1)
    model = _CanaryModel(canaries)
    params = list(model.parameters())
    privacy = (mechanism or RecordDP)(noise_multiplier=noise_multiplier, clip=clip, accountant=accountant, history=[])
    session = privacy.open(model, params, records, batch_size=batch, lr=1e-3,
                           gen=torch.Generator().manual_seed(seed))
    scores = torch.zeros(canaries, dtype=torch.float64)
    push = 10.0 * clip  # any gradient norm above C is clipped to C: the canary's full weight
    try:
        for _ in range(steps):
            session.step(lambda b: model.per_record_loss(b, push), session.next_batch())
            scores -= params[0].grad.detach().double().squeeze(-1)  # the noised, clipped sum / expected batch
    finally:
        session.close()
    history = privacy.history
    claimed = epsilon(history, delta=delta, accountant=accountant)
    guesses = best_guesses(scores.numpy(), included, delta=delta, confidence=confidence)
    return WhiteboxResult(noise_multiplier=history[0][0] if history else 0.0, clip=clip, sample_rate=sample_rate,
                          steps=sum(n for _, _, n in history), delta=delta, claimed_epsilon=claimed,
                          guesses=guesses, max_provable=max_provable(m=canaries, r=guesses.r, delta=delta,
                                                                     confidence=confidence))
