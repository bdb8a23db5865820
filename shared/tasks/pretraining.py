"""The pre-training loop of every task's built-in base model: AdamW with linear warm-up and
cosine decay, gradient clipping, a progress bar. Tasks supply the loss.

The image task's identity encoder is not a base model and trains with its own loop
(``train_encoder`` in ``shared/tasks/image_base.py``; why: docs/architecture.md,
"Training loops")."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from rich.progress import Progress

WARMUP = 50


def pretrain_loop(params: list[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], *, steps: int, lr: float,
                  description: str, weight_decay: float = 0.01, clip: float = 1.0) -> float:
    """Run ``steps`` optimizer steps on ``loss_fn()`` (which draws its own batch); return the last loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    last = math.nan
    with Progress(transient=True) as progress:
        bar = progress.add_task(description, total=steps)
        for _ in range(steps):
            loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            last = float(loss.detach())
            progress.advance(bar)
    return last
