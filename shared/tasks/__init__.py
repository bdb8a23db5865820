"""Tasks: a task plugs a modality into the one training/evaluation machinery.

Importing this package imports no task's code (nor torch): ``TASKS`` holds each task's
metadata (``shared/tasks/registry.py``) and ``get_task`` imports a task when it is used.
"""

from __future__ import annotations

from fedpgen.shared.tasks.base import NoUsableDataError, Task, UserData
from fedpgen.shared.tasks.registry import TASKS, TaskInfo, get_task, task_info

__all__ = ["TASKS", "NoUsableDataError", "Task", "TaskInfo", "UserData", "get_task", "task_info"]
