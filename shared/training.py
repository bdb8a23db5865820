"""The one training loop and the one evaluation loop, for every task.

Tasks vary the loss (``per_record_loss``) and the records; the loop never changes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from shared.adapters import get_tensors, set_tensors
from shared.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    best_step: int = -1
    best_val_loss: float = math.nan


def _batch(records: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, records.shape[0], (min(batch_size, records.shape[0]),), generator=gen)
    return records[idx]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, records: torch.Tensor, *, task: Task, chunk: int = 64) -> float:
    """Mean per-record loss over ``records`` (the early-stopping criterion)."""
    model.eval()
    losses = [task.per_record_loss(model, records[i : i + chunk]) for i in range(0, records.shape[0], chunk)]
    return float(torch.cat(losses).mean())


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], records: torch.Tensor, *, task: Task,
          steps: int, batch_size: int, lr: float, gen: torch.Generator,
          val: torch.Tensor | None = None, names: tuple[str, ...] = (), eval_every: int = 0) -> TrainResult:
    """Train ``params`` for up to ``steps`` AdamW steps on random batches of ``records``.

    With ``val`` (records carved from the user's *training* split, never the held-out
    one), validate every ``eval_every`` steps and restore the best state of ``names``,
    step 0 included: personal data is small and fixed step counts overfit (DESIGN.md §2).
    """
    if not params or steps == 0:
        return TrainResult(steps=0, mean_loss=math.nan)
    early_stop = val is not None and val.shape[0] > 0 and eval_every > 0
    if early_stop:
        best = (mean_loss(model, val, task=task), 0, get_tensors(model, names))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = 0.0
    for step in range(1, steps + 1):
        model.train()
        loss = task.per_record_loss(model, _batch(records, batch_size, gen)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()  # a sync point; cheap next to the step on CPU
        if early_stop and (step % eval_every == 0 or step == steps):
            val_loss = mean_loss(model, val, task=task)
            if val_loss < best[0]:
                best = (val_loss, step, get_tensors(model, names))
    model.eval()
    if not early_stop:
        return TrainResult(steps=steps, mean_loss=total / steps)
    set_tensors(model, best[2])
    return TrainResult(steps=steps, mean_loss=total / steps, best_step=best[1], best_val_loss=best[0])
