"""Comparison tasks: seeded generators of sequences plus the metrics scored on them.

``list_tasks()``, ``get_task(name)``, ``make_task(name, **fields)``; add one with
``@register_task("name", config=MyConfig)`` on a :class:`Task` subclass. The built-in
tasks are imported here explicitly.
"""

from memzoo.tasks.base import Batch, ExampleStats, Task, TaskConfig, aggregate, metric_values
from memzoo.tasks.registry import get_task, list_tasks, make_task, register_task, unregister_task
from memzoo.tasks import passkey as _passkey  # noqa: F401
from memzoo.tasks import mqar as _mqar  # noqa: F401
from memzoo.tasks import copy as _copy  # noqa: F401
from memzoo.tasks import text as _text  # noqa: F401

__all__ = [
    "Batch", "ExampleStats", "Task", "TaskConfig", "aggregate", "get_task", "list_tasks", "make_task", "metric_values",
    "register_task", "unregister_task",
]
