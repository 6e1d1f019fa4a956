"""Tasks: what a package's model does and where its outputs go (segment, detect, classify, embed,
reconstruct, and tasks of other packages). The protocol is ``engine.tasks.base.Task``; the
registry ``TASKS`` / ``get_task`` (``engine.tasks.registry``)."""

from __future__ import annotations

from .base import Sink, Task
from .registry import (
    ENTRY_POINT_GROUP,
    TASKS,
    TaskRegistryError,
    get_task,
    method_names,
    reset_registry,
    task_for,
    task_names,
)

__all__ = ["ENTRY_POINT_GROUP", "TASKS", "Sink", "Task", "TaskRegistryError", "get_task",
           "method_names", "reset_registry", "task_for", "task_names"]

