"""The task registry: ``@register_task("name", config=MyConfig)`` on a :class:`Task`
subclass, like variants. Duplicates raise; unknown names list the known ones."""

from __future__ import annotations

import re
from typing import Any, Callable, TypeVar

from memzoo.errors import UnknownNameError
from memzoo.tasks.base import Task, TaskConfig

T = TypeVar("T", bound=type[Task])
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TASKS: dict[str, type[Task]] = {}


def register_task(name: str, *, config: type[TaskConfig]) -> Callable[[T], T]:
    if not _NAME.match(name):
        raise ValueError(f"task name {name!r} must match {_NAME.pattern}")
    if not (isinstance(config, type) and issubclass(config, TaskConfig)):
        raise TypeError(f"config for task {name!r} must subclass memzoo.tasks.TaskConfig, got {config!r}")
    missing = [f for f, info in config.model_fields.items() if info.is_required()]
    if missing:
        raise ValueError(f"every field of {config.__name__} needs a default; missing: {missing}")

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) must decorate a memzoo.tasks.Task subclass")
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__module__}.{_TASKS[name].__qualname__}")
        if not cls.metrics:
            raise ValueError(f"task {name!r} must declare at least one metric")
        cls.name = name
        cls.Config = config
        _TASKS[name] = cls
        return cls

    return deco


def list_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        raise UnknownNameError(f"unknown task {name!r}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def make_task(name: str, **fields: Any) -> Task:
    """An instance of task ``name`` with its config built from ``fields`` (unknown
    fields are refused with the valid ones listed)."""
    cls = get_task(name)
    unknown = set(fields) - set(cls.Config.model_fields)
    if unknown:
        raise UnknownNameError(
            f"unknown field(s) {sorted(unknown)} for task {name!r}; valid: {', '.join(sorted(cls.Config.model_fields))}"
        )
    return cls(cls.Config(**fields))


def unregister_task(name: str) -> None:
    """Remove a task (for tests and notebooks that re-define one)."""
    _TASKS.pop(name, None)
