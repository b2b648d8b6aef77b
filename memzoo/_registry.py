"""One small registry of named things, shared by variants (:mod:`memzoo.registry`) and
tasks (:mod:`memzoo.tasks.registry`): names are given, never derived, and match
:data:`NAME`; a duplicate raises naming who registered the name first; an unknown name's
error lists the registered ones; plug-ins register from another package through an
entry-point group, loaded on the first look-up (a broken plug-in warns, never silently)."""

from __future__ import annotations

import re
import warnings
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from pydantic import BaseModel

from memzoo.errors import UnknownNameError

T = TypeVar("T")

#: what a registered name must look like
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Names -> entries of one ``kind`` ("variant", "task").

    ``origin(entry)`` says where an entry comes from (for the duplicate error);
    ``entry_point_group``, if given, is loaded once, on the first look-up."""

    def __init__(self, kind: str, *, origin: Callable[[T], str], entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.origin = origin
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    # ---------------------------------------------------------------- registration
    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must match {NAME.pattern}")

    def check_free(self, name: str) -> None:
        """Raise if ``name`` is malformed or already taken (before anything is changed)."""
        self.check_name(name)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self.origin(self._entries[name])}")

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name``; a name already taken raises."""
        self.check_free(name)
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (for tests and notebooks that re-define one); unknown names are ignored."""
        self._entries.pop(name, None)

    # -------------------------------------------------------------------- look-ups
    def registered(self) -> list[T]:
        """The entries registered so far, without loading plug-ins (for checks made while registering)."""
        return list(self._entries.values())

    def get(self, name: str) -> T:
        self.load_entry_points()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load_entry_points()
        return name in self._entries

    def load_entry_points(self) -> None:
        """Import every plug-in of the entry-point group once; each registers itself on import."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as exc:  # a broken plug-in must not break memzoo, but is never silent
                warnings.warn(f"memzoo: could not load {self.kind} plug-in {ep.name!r} ({ep.value}): {exc!r}", stacklevel=3)


def check_config_class(config: Any, base: type[BaseModel], what: str, label: str) -> None:
    """A registered config class subclasses ``base`` and gives every field a default
    (so ``Config()`` is the documented default setting)."""
    if not (isinstance(config, type) and issubclass(config, base)):
        raise TypeError(f"config for {what} must subclass {label}, got {config!r}")
    missing = [f for f, info in config.model_fields.items() if info.is_required()]
    if missing:
        raise ValueError(f"every field of {config.__name__} needs a default; missing: {missing}")
