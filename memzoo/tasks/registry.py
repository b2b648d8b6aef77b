"""The task registry: ``@register_task("name", config=MyConfig)`` on a :class:`Task`
subclass, like variants (the same :class:`memzoo._registry.Registry`). Duplicates raise;
unknown names list the known ones. From another package: an entry point in the group
``memzoo.tasks`` whose object is the module that registers (loaded on the first look-up),
so ``memzoo compare --task NAME`` finds it."""

from __future__ import annotations

from typing import Any, Callable, TypeVar, get_args

from memzoo._registry import Registry, check_config_class
from memzoo.config import validate_options
from memzoo.errors import UnknownNameError
from memzoo.tasks.base import HIGHER_IS_BETTER, MetricKind, Task, TaskConfig

T = TypeVar("T", bound=type[Task])
ENTRY_POINT_GROUP = "memzoo.tasks"
TASKS: Registry[type[Task]] = Registry(
    "task", origin=lambda cls: f"{cls.__module__}.{cls.__qualname__}", entry_point_group=ENTRY_POINT_GROUP
)


def register_task(name: str, *, config: type[TaskConfig]) -> Callable[[T], T]:
    TASKS.check_name(name)
    check_config_class(config, TaskConfig, f"task {name!r}", "memzoo.tasks.TaskConfig")

    def deco(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) must decorate a memzoo.tasks.Task subclass")
        TASKS.check_free(name)
        if not cls.metrics:
            raise ValueError(f"task {name!r} must declare at least one metric")
        kinds = get_args(MetricKind)
        bad = {metric: kind for metric, kind in cls.metrics.items() if kind not in kinds}
        if bad:  # refused now, not by the scoring after every run's training
            raise ValueError(f"task {name!r}: metrics {bad} name unknown metric kinds; valid: {', '.join(kinds)}")
        headline, kind = next(iter(cls.metrics.items()))
        if bool(cls.higher_is_better) != HIGHER_IS_BETTER[kind]:
            raise ValueError(
                f"task {name!r}: higher_is_better={cls.higher_is_better!r}, but its headline metric {headline!r} is of kind "
                f"{kind!r}, for which {'higher' if HIGHER_IS_BETTER[kind] else 'lower'} is better"
            )
        cls.name = name
        cls.Config = config
        TASKS.add(name, cls)
        return cls

    return deco


def list_tasks() -> list[str]:
    """Names of every registered task, sorted."""
    return TASKS.names()


def get_task(name: str) -> type[Task]:
    return TASKS.get(name)


def make_task(name: str, **fields: Any) -> Task:
    """An instance of task ``name`` with its config built from ``fields`` (unknown
    fields are refused with the valid ones listed)."""
    cls = get_task(name)
    unknown = set(fields) - set(cls.Config.model_fields)
    if unknown:
        raise UnknownNameError(
            f"unknown field(s) {sorted(unknown)} for task {name!r}; valid: {', '.join(sorted(cls.Config.model_fields))}"
        )
    return cls(validate_options(cls.Config, fields))


def unregister_task(name: str) -> None:
    """Remove a task (for tests and notebooks that re-define one)."""
    TASKS.remove(name)
