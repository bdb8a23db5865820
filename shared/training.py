"""The device's training loop and evaluation loop, for every task and every preset phase.

Tasks vary the loss (``per_record_loss``) and the records; privacy mechanisms vary how
batches are drawn and how a step is taken (``shared/privacy/mechanism.py``). The loop
itself never changes. Pre-training the built-in bases (``shared/tasks/pretraining.py``)
and the image task's identity encoder have loops of their own (docs/architecture.md,
"Training loops").
"""

from __future__ import annotations

import dataclasses
import math
import torch

from fedpgen.shared.accelerator import precision
from fedpgen.shared.adapters import get_tensors, set_tensors
from fedpgen.shared.privacy.mechanism import NoPrivacy, RecordDP
from fedpgen.shared.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    best_step: int = -1  # the step whose state was kept by early stopping (-1: no early stopping)
    val_curve: tuple[tuple[int, float], ...] = ()  # (step, mean validation loss) at each validation, step 0 first


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


VAL_SEED = 20250101


@torch.no_grad()
def mean_loss(model: torch.nn.Module, records: torch.Tensor, *, task: Task, chunk: int = 64,
              dtype: torch.dtype | None = None, memory: torch.Tensor | None = None) -> float:
    """Mean per-record loss over ``records`` (the early-stopping criterion).

    Deterministic: a stochastic loss (diffusion's timestep and noise) is scored on the same
    draws at every call (``task.val_draws`` per record, from a fixed seed in a forked RNG,
    so training's random stream is untouched). Otherwise two checkpoints would be compared
    on different noise and early stopping would pick one at random. With ``memory``, the loss
    of a personal fit that consults it (``Task.fit_loss``; ``records`` are not in it)."""
    model.eval()
    device = model_device(model)
    records = records.repeat(max(1, task.val_draws), *([1] * (records.dim() - 1)))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"), precision(device, dtype):
        torch.default_generator.manual_seed(VAL_SEED)  # only the forked generators: never other GPUs'
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(VAL_SEED)  # the current device's generator only
        losses = [_loss(task, model, records[i : i + chunk].to(device), memory, counted=False).float()
                  for i in range(0, records.shape[0], chunk)]
    return float(torch.cat(losses).mean())


def _loss(task: Task, model: torch.nn.Module, batch: torch.Tensor, memory: torch.Tensor | None, *,
          counted: bool) -> torch.Tensor:
    if memory is None:
        return task.per_record_loss(model, batch)
    return task.fit_loss(model, batch, memory, counted=counted)


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], records: torch.Tensor, *, task: Task,
          steps: int, batch_size: int, lr: float, gen: torch.Generator, privacy: NoPrivacy | RecordDP = NoPrivacy(),
          val: torch.Tensor | None = None, names: tuple[str, ...] = (), eval_every: int = 0,
          micro_batch: int = 0, dtype: torch.dtype | None = None, memory: torch.Tensor | None = None) -> TrainResult:
    """Train ``params`` for up to ``steps`` steps on batches of ``records`` drawn by ``privacy``.

    Batches are drawn on the CPU and moved to the model's device in ``micro_batch``-record
    chunks (0: whole batches), a memory cap that leaves the gradient unchanged. ``dtype``:
    autocast for phases without DP (DP-SGD always runs in fp32, see shared/accelerator.py).

    With ``val`` (records carved from the user's *training* split, never the held-out
    one), validate every ``eval_every`` steps and restore the best state of ``names``,
    step 0 included: personal data is small and fixed step counts overfit (docs/architecture.md,
    "Early stopping of the personal part").
    Validation-based selection is not differentially private, so it is refused under DP.
    ``memory``: the user's memory, which a personal fit's loss may consult (``Task.fit_loss``,
    in training and validation); refused under DP (DP-SGD's loss is the model's alone).
    """
    if not params or steps == 0:
        return TrainResult(mean_loss=math.nan)
    early_stop = val is not None and val.shape[0] > 0 and eval_every > 0
    if early_stop and privacy.private:
        raise ValueError("early stopping on validation data is not differentially private; train fixed steps")
    if memory is not None and privacy.private:
        raise ValueError("a private phase's loss is the model's alone: the user's memory never enters DP-SGD")
    if early_stop:
        best = (mean_loss(model, val, task=task, dtype=dtype, memory=memory), 0, get_tensors(model, names))
        curve = [(0, best[0])]
    device = model_device(model)
    autocast = None if privacy.private else dtype

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:
        with precision(device, autocast):
            return _loss(task, model, batch.to(device), memory, counted=True).float()

    model.train()
    session = privacy.open(model, params, records, batch_size=batch_size, lr=lr, gen=gen, micro_batch=micro_batch)
    losses = []
    try:
        for step in range(1, steps + 1):
            losses.append(session.step(loss_fn, session.next_batch()))  # .item() inside: a sync point, cheap on CPU
            if early_stop and (step % eval_every == 0 or step == steps):
                val_loss = mean_loss(model, val, task=task, dtype=dtype, memory=memory)
                model.train()  # mean_loss left it in eval mode; train() walks every module, so only here
                curve.append((step, val_loss))
                if val_loss < best[0]:
                    best = (val_loss, step, get_tensors(model, names))
    finally:
        session.close()
        model.eval()
    finite = [v for v in losses if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else math.nan
    if not early_stop:
        return TrainResult(mean_loss=mean)
    set_tensors(model, best[2])
    return TrainResult(mean_loss=mean, best_step=best[1], val_curve=tuple(curve))


def train_cross_validated(model: torch.nn.Module, params: list[torch.nn.Parameter], records: torch.Tensor, *,
                          folds: int, names: tuple[str, ...], steps: int, eval_every: int, gen: torch.Generator,
                          extra: torch.Tensor | None = None, **kwargs) -> TrainResult:
    """Early stopping by ``folds``-fold cross-validation, then one fit on every record.

    ``records`` are all of the user's records a fit may see (training and validation: never
    the held-out ones). Each fold in turn is scored, every ``eval_every`` steps and at step 0,
    while ``names`` train from their starting state on the other folds; the step with the
    lowest loss summed over every record (each scored once, by the fit that did not see it)
    is then trained on all of them from the same start. Step 0 wins when no step helps, as in
    ``train``'s early stopping. ``extra`` records (e.g. prior-preservation images) join every
    fit's training records and are never scored. Not private: refused under DP, like any
    selection on validation (docs/architecture.md, "Early stopping of the personal part").
    ``kwargs``: ``train``'s other arguments (task, batch_size, lr, privacy, dtype, ...)."""
    if kwargs.get("privacy", NoPrivacy()).private:
        raise ValueError("cross-validated early stopping is not differentially private; train fixed steps")
    if kwargs.get("memory") is not None:
        raise ValueError("cross-validation scores records by the model's loss alone: no user memory")
    k = min(folds, records.shape[0])
    if k < 2 or steps == 0 or not params:
        raise ValueError(f"cross-validation needs at least 2 records, 2 folds and a step (got {records.shape[0]}, "
                         f"{folds}, {steps})")
    start = get_tensors(model, names)
    seeds = torch.randint(0, 2**62, (k,), generator=gen).tolist()  # drawn first: the final fit's stream follows
    total: dict[int, float] = {}
    for fold, seed in enumerate(seeds):
        held = torch.arange(records.shape[0]) % k == fold
        fit_on = records[~held] if extra is None else torch.cat([records[~held], extra])
        set_tensors(model, start)
        res = train(model, params, fit_on, val=records[held], names=names, steps=steps, eval_every=eval_every,
                    gen=torch.Generator().manual_seed(seed), **kwargs)
        for step, loss in res.val_curve:
            total[step] = total.get(step, 0.0) + loss * int(held.sum())
    best = min(total, key=lambda s: (total[s], s))
    set_tensors(model, start)
    every = records if extra is None else torch.cat([records, extra])
    final = train(model, params, every, steps=best, gen=gen, **kwargs)
    curve = tuple((s, total[s] / records.shape[0]) for s in sorted(total))
    return TrainResult(mean_loss=final.mean_loss, best_step=best, val_curve=curve)
