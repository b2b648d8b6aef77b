"""The variant registry: explicit registration, by decorator or entry point.

* In code: ``@register_variant("name", config=MyConfig)`` on a :class:`Backbone` subclass.
  Duplicates raise; the name is the one given, never derived.
* From another package: an entry point in the group ``memzoo.variants`` whose object is
  the module (or class) that registers. Entry points load on the first registry look-up.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Callable, TypeVar

from memzoo.config import VariantConfig
from memzoo.errors import UnknownNameError

if TYPE_CHECKING:
    from memzoo.variants.base import Backbone

B = TypeVar("B", bound="type[Backbone]")
ENTRY_POINT_GROUP = "memzoo.variants"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    cls: "type[Backbone]"
    config: type[VariantConfig]

    @property
    def module(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


_REGISTRY: dict[str, VariantSpec] = {}
_entry_points_loaded = False


def register_variant(name: str, *, config: type[VariantConfig]) -> Callable[[B], B]:
    """Class decorator registering a backbone under ``name`` with its config class."""
    from memzoo.variants.base import Backbone

    if not _NAME.match(name):
        raise ValueError(f"variant name {name!r} must match {_NAME.pattern}")
    if not (isinstance(config, type) and issubclass(config, VariantConfig)):
        raise TypeError(f"config for {name!r} must subclass memzoo.VariantConfig, got {config!r}")
    missing_defaults = [f for f, info in config.model_fields.items() if info.is_required()]
    if missing_defaults:
        raise ValueError(f"every field of {config.__name__} needs a default; missing: {missing_defaults}")

    def deco(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"@register_variant({name!r}) must decorate a memzoo.Backbone subclass")
        if name in _REGISTRY:
            raise ValueError(f"variant {name!r} is already registered by {_REGISTRY[name].module}")
        _check_field_names(name, cls, config)
        if cls.State.variant and cls.State.variant != name:
            raise ValueError(f"{cls.State.__name__}.variant is {cls.State.variant!r}, expected {name!r}")
        cls.variant = name
        cls.State.variant = name
        cls.__signature__ = constructor_signature(config)  # help(cls) / inspect show the real arguments
        _REGISTRY[name] = VariantSpec(name=name, cls=cls, config=config)
        return cls

    return deco


def _check_field_names(name: str, cls: type, config: type[VariantConfig]) -> None:
    """A variant's fields become attributes of its backbone: refuse names that would
    shadow a shared field, a method or a property."""
    import inspect

    from memzoo.config import BackboneConfig

    for field in config.model_fields:
        if field in BackboneConfig.model_fields:
            raise ValueError(f"{config.__name__}.{field}: {name!r} cannot redeclare the shared field {field!r}")
        try:
            attr = inspect.getattr_static(cls, field)
        except AttributeError:
            continue
        if callable(attr) or isinstance(attr, (property, staticmethod, classmethod)):
            raise ValueError(f"{config.__name__}.{field}: the field would shadow {cls.__name__}.{field}; rename the field")


def constructor_signature(config: type[VariantConfig]) -> "inspect.Signature":
    """The keyword-only constructor arguments of a variant, derived from the shared
    fields and the variant's config (types and defaults as declared there)."""
    import inspect

    from memzoo.config import BackboneConfig

    fields = {k: v for k, v in BackboneConfig.model_fields.items() if k not in ("variant", "options")}
    fields.update(config.model_fields)
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info.get_default(call_default_factory=True),
                          annotation=info.annotation)
        for name, info in fields.items()
    ]
    return inspect.Signature(params)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plug-in must not break memzoo, but is never silent
            warnings.warn(f"memzoo: could not load variant plug-in {ep.name!r} ({ep.value}): {exc!r}", stacklevel=2)


def list_variants() -> list[str]:
    """Names of every registered variant, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_variant(name: str) -> VariantSpec:
    _load_entry_points()
    if name not in _REGISTRY:
        raise UnknownNameError(f"unknown variant {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def unregister_variant(name: str) -> None:
    """Remove a variant (for tests and notebooks that re-define one)."""
    _REGISTRY.pop(name, None)
