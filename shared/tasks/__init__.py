"""Task registry: a task plugs a modality into the one training/evaluation machinery."""

from __future__ import annotations

from shared.tasks.base import NoUsableDataError, Task, UserData
from shared.tasks.behavior import BehaviorTask
from shared.tasks.image import ImageTask
from shared.tasks.text import TextTask

TASKS: dict[str, type[Task]] = {"text": TextTask, "behavior": BehaviorTask, "image": ImageTask}


def get_task(name: str) -> Task:
    """Instantiate the task registered as ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


__all__ = ["TASKS", "NoUsableDataError", "Task", "UserData", "get_task"]
