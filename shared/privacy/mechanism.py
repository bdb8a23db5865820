"""How a training phase samples batches and steps: without privacy, or DP-SGD with Opacus.

"No privacy" is an explicit object, not an ``if`` in the loop. The training loop asks a
mechanism for a session and only ever calls ``next_batch``, ``step`` and ``close``.
Noise is added in Opacus' ``DPOptimizer.add_noise`` (per-sample clip to C, then N(0, σ²C²)
on the sum, then division by the expected batch size).

Where the randomness of DP comes from (docs/privacy.md): the Gaussian noise and the Poisson
sampling of every DP session draw from generators seeded with 64 fresh bits of OS entropy
(``os.urandom``), per session, never from the run seed, the user's folder or the round.
No one, the device's owner included, can reproduce them. Everything else (initializations,
plain training batches, evaluation draws) stays seeded for reproducibility.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch.utils.data import DataLoader, TensorDataset

from fedpgen.shared.privacy.accounting import History, compose
from fedpgen.shared.privacy.per_sample import OutputGradHooks


def micro_batches(batch: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``batch`` in chunks of at most ``size`` records (``size`` 0: one chunk): a memory cap."""
    return [batch] if size <= 0 or size >= batch.shape[0] else list(batch.split(size))


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from 64 bits of OS entropy: unknown to anyone, reproducible by no one.

    Not a CSPRNG (torch's Philox/MT19937 behind it); what protects the noise is that its seed
    is secret and fresh per session. Opacus' ``secure_mode`` would use torchcsprng, which does
    not install with current torch (docs/privacy.md)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


class PlainSession:
    """Uniform random batches of fixed size and AdamW: not private. A batch size of at least
    the number of records takes every record once per step (full batch, no sampling: the
    step does not depend on the generator)."""

    def __init__(self, params: list[torch.nn.Parameter], records: torch.Tensor, *, batch_size: int, lr: float,
                 gen: torch.Generator, micro_batch: int = 0) -> None:
        self.records, self.batch_size, self.gen, self.micro_batch = records, batch_size, gen, micro_batch
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def next_batch(self) -> torch.Tensor:
        n = self.records.shape[0]
        if self.batch_size >= n:
            return self.records
        return self.records[torch.randint(0, n, (self.batch_size,), generator=self.gen)]

    def step(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in micro_batches(batch, self.micro_batch):  # gradient accumulation: the same mean gradient
            loss = loss_fn(chunk).sum() / batch.shape[0]
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        return total

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class NoPrivacy:
    """Explicitly no differential privacy."""

    private = False

    def open(self, model: torch.nn.Module, params: list[torch.nn.Parameter], records: torch.Tensor, *,
             batch_size: int, lr: float, gen: torch.Generator, micro_batch: int = 0) -> PlainSession:
        return PlainSession(params, records, batch_size=batch_size, lr=lr, gen=gen, micro_batch=micro_batch)


class DPSession:
    """Opacus DP-SGD: Poisson sampling, per-sample gradients by hooks (``OutputGradHooks``), clip + noise in
    DPOptimizer."""

    # How per-sample gradients are captured; benchmarks/dp_overhead.py swaps in Opacus' own
    # ``GradSampleHooks`` (full backward hooks) to measure both side by side.
    hooks_class: type[GradSampleHooks] = OutputGradHooks

    def __init__(self, owner: RecordDP, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 records: torch.Tensor, *, batch_size: int, lr: float, micro_batch: int = 0) -> None:
        self.owner, self.params, self.micro_batch = owner, params, micro_batch
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        # Poisson sampling (Opacus' DPDataLoader takes the loader's generator) and the noise
        # (on the parameters' device) each draw from a secret, freshly seeded generator.
        loader = DataLoader(TensorDataset(records), batch_size=batch_size, generator=secret_generator())
        noise = secret_generator(params[0].device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # stated in the audit, see docs/privacy.md
            self.engine = PrivacyEngine(accountant=owner.accountant, secure_mode=False)
            # Opacus' DPOptimizer, Poisson loader and accountant hook; its model side attaches
            # nothing ("no_op": it only sets and removes the parameters' grad_sample attributes):
            # the per-sample gradients come from hooks_class, Opacus' hooks mode without full
            # backward hooks (shared/privacy/per_sample.py, why).
            self._noop_hooks, self.optimizer, self.loader = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=owner.noise_multiplier,
                max_grad_norm=owner.clip, poisson_sampling=True, grad_sample_mode="no_op", wrap_model=False,
                noise_generator=noise)
        try:
            self.hooks = self.hooks_class(model, batch_first=True, loss_reduction="mean")
        except BaseException:
            self._noop_hooks.cleanup()
            raise
        self.hooks.forbid_grad_accumulation()  # Poisson sampling: one backward pass per step (as make_private does)
        self._it = iter(self.loader)

    def next_batch(self) -> torch.Tensor:
        try:
            (batch,) = next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            (batch,) = next(self._it)
        return batch

    def step(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        if batch.shape[0] == 0:
            # An empty Poisson batch still takes a (noise-only) step, and it is accounted.
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            loss_value = float("nan")
        else:
            # Per-record losses: no record's gradient depends on another's. Micro-batches follow
            # Opacus' BatchMemoryManager: each chunk's per-sample gradients are clipped and summed
            # by a skipped step; the last step adds the one noise draw for the whole Poisson
            # batch and the accountant counts one step.
            loss_value = 0.0
            chunks = micro_batches(batch, self.micro_batch)
            for i, chunk in enumerate(chunks):
                loss = loss_fn(chunk).mean()
                loss.backward()
                loss_value += loss.item() * chunk.shape[0] / batch.shape[0]
                if i < len(chunks) - 1:
                    self.optimizer.signal_skip_step(do_skip=True)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()
        return loss_value

    def close(self) -> None:
        self.hooks.cleanup()  # one model object serves many phases and rounds
        self._noop_hooks.cleanup()
        # What Opacus' own accountant hook counted (every optimizer step, empty batches included).
        for sigma, sample_rate, steps in self.engine.accountant.history:
            self.owner.record(sigma=sigma, sample_rate=sample_rate, steps=steps)


class RecordDP:
    """Record-level DP-SGD. Collects the (σ, q, steps) it spends in ``history``."""

    private = True

    def __init__(self, *, noise_multiplier: float, clip: float, accountant: str, history: History) -> None:
        if clip <= 0 or noise_multiplier < 0:
            raise ValueError(f"RecordDP: clip {clip} must be > 0 and noise multiplier {noise_multiplier} >= 0")
        self.noise_multiplier, self.clip, self.accountant = noise_multiplier, clip, accountant
        self.history: History = list(history)
        self.spent: History = []

    def record(self, *, sigma: float, sample_rate: float, steps: int) -> None:
        self.history = compose(self.history, sigma=sigma, sample_rate=sample_rate, steps=steps)
        self.spent = compose(self.spent, sigma=sigma, sample_rate=sample_rate, steps=steps)

    def open(self, model: torch.nn.Module, params: list[torch.nn.Parameter], records: torch.Tensor, *,
             batch_size: int, lr: float, gen: torch.Generator, micro_batch: int = 0) -> DPSession:
        del gen  # seeded: never for DP. Poisson sampling and noise draw from secret generators (above)
        return DPSession(self, model, params, records, batch_size=batch_size, lr=lr, micro_batch=micro_batch)
