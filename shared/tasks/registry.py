"""The task registry: what each task is called, takes and measures, importable without torch.

The config layer validates ``task`` and ``data`` against these entries, the server builds
its evaluation schema from ``metric_names`` and the summary ranks variants by ``primary``,
all without importing a task's code (and with it torch, transformers or diffusers). A task
class reads its metadata from its entry (``class TextTask(Task, task="text")``), so each
fact lives here once; ``get_task`` imports the class only when a task is used.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedpgen.shared.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One task's metadata.

    Parameters
    ----------
    name
        The ``task`` config value.
    datasets
        Built-in populations it can materialize (``data``), besides ``"dir"``.
    metric_names
        What the task's ``metrics`` returns, in display order.
    primary
        The metric the summary ranks variants by; one of ``metric_names``.
    higher_is_better
        The primary metric's direction.
    primary_label
        The primary metric in words, e.g. ``"held-out perplexity"``.
    target
        ``"module:Class"`` of the ``Task`` that implements it.
    tie_free
        Where the primary metric is a coarse rate that ties often between two models of one
        user (HR@10 over a few dozen events), a continuous metric of ``metric_names`` and its
        direction, for per-user comparisons that a tie cannot hide; ``None`` if the primary is.
    """

    name: str
    datasets: tuple[str, ...]
    metric_names: tuple[str, ...]
    primary: str
    higher_is_better: bool
    primary_label: str
    target: str
    tie_free: tuple[str, bool] | None = None

    def __post_init__(self) -> None:
        if self.primary not in self.metric_names:
            raise ValueError(f"task {self.name!r}: primary {self.primary!r} is not one of {self.metric_names}")
        if self.tie_free is not None and self.tie_free[0] not in self.metric_names:
            raise ValueError(f"task {self.name!r}: tie_free {self.tie_free[0]!r} is not one of {self.metric_names}")
        if "dir" in self.datasets:
            raise ValueError(f"task {self.name!r}: 'dir' is every task's data, not a built-in dataset")
        module, _, cls = self.target.partition(":")
        if not module or not cls:
            raise ValueError(f"task {self.name!r}: target {self.target!r} is not 'module:Class'")

    def better(self, a: float, b: float) -> bool:
        """Whether primary-metric value ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def load(self) -> type[Task]:
        """Import the module that implements this task and return its class."""
        module, _, cls = self.target.partition(":")
        task_class: type[Task] = getattr(importlib.import_module(module), cls)
        return task_class


_ENTRIES = (
    TaskInfo(name="text", datasets=("shakespeare", "shakespeare-all", "synthetic"), metric_names=("ppl", "acc"),
             primary="ppl", higher_is_better=False, primary_label="held-out perplexity",
             target="fedpgen.shared.tasks.text:TextTask"),
    TaskInfo(name="behavior", datasets=("synthetic",), metric_names=("hr10", "ndcg10", "cov10", "nll"),
             primary="hr10", higher_is_better=True, primary_label="held-out HR@10",
             target="fedpgen.shared.tasks.behavior:BehaviorTask", tie_free=("nll", False)),
    TaskInfo(name="image", datasets=("synthetic",), metric_names=("top1", "idsim", "align", "fd", "edit"),
             primary="top1", higher_is_better=True, primary_label="identification of generated samples (top-1 of 10)",
             target="fedpgen.shared.tasks.image:ImageTask", tie_free=("idsim", True)),
)

TASKS: Mapping[str, TaskInfo] = MappingProxyType({info.name: info for info in _ENTRIES})


def task_info(name: str) -> TaskInfo:
    """The registry entry of task ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def get_task(name: str) -> Task:
    """Instantiate the task registered as ``name``, importing its module now (and only its module)."""
    return task_info(name).load()()
