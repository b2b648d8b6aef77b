"""The variant registry: explicit registration, by decorator or entry point.

* In code: ``@register_variant("name", config=MyConfig)`` on a :class:`Backbone` subclass.
  Duplicates raise; the name is the one given, never derived.
* From another package: an entry point in the group ``memzoo.variants`` whose object is
  the module (or class) that registers. Entry points load on the first registry look-up.

The name rules, duplicate refusal, unknown-name errors and entry-point loading are
:class:`memzoo._registry.Registry`'s, shared with the task registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

from memzoo._registry import Registry, check_config_class
from memzoo.config import VariantConfig

if TYPE_CHECKING:
    import inspect

    from memzoo.variants.base import Backbone

B = TypeVar("B", bound="type[Backbone]")
ENTRY_POINT_GROUP = "memzoo.variants"


@dataclass(frozen=True)
class VariantSpec:
    name: str
    cls: "type[Backbone]"
    config: type[VariantConfig]

    @property
    def module(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


VARIANTS: Registry[VariantSpec] = Registry("variant", origin=lambda spec: spec.module, entry_point_group=ENTRY_POINT_GROUP)


def register_variant(name: str, *, config: type[VariantConfig]) -> Callable[[B], B]:
    """Class decorator registering a backbone under ``name`` with its config class."""
    from memzoo.variants.base import Backbone

    VARIANTS.check_name(name)
    check_config_class(config, VariantConfig, repr(name), "memzoo.VariantConfig")

    def deco(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise TypeError(f"@register_variant({name!r}) must decorate a memzoo.Backbone subclass")
        VARIANTS.check_free(name)  # refuse before touching the class
        _check_field_names(name, cls, config)
        _check_own_state(name, cls)
        claimed = vars(cls.State).get("variant")  # its own, not a registered parent state's
        if claimed and claimed != name:
            raise ValueError(f"{cls.State.__name__}.variant is {claimed!r}, expected {name!r}")
        cls.variant = name
        cls.State.variant = name
        cls.__signature__ = constructor_signature(config)  # help(cls) / inspect show the real arguments
        VARIANTS.add(name, VariantSpec(name=name, cls=cls, config=config))
        return cls

    return deco


def _check_own_state(name: str, cls: type) -> None:
    """The variant's state class is its own, declared in its class body: registration
    names it after the variant, so an inherited one (``memzoo.State``, ``KVState``, ...)
    would be renamed for every variant that shares it."""
    from memzoo.state import State

    own = vars(cls).get("State")
    shared = isinstance(own, type) and any(
        spec.cls.State is not own and issubclass(spec.cls.State, own) for spec in VARIANTS.registered()
    )  # a base of registered variants' states (KVState): renaming it would rename theirs
    if not (isinstance(own, type) and issubclass(own, State) and own is not State) or shared:
        inherited = getattr(cls, "State", None)
        base = inherited.__name__ if isinstance(inherited, type) else "memzoo.State"
        if own is None:
            why = f"it inherits {base}, which other variants share"
        else:
            why = f"State = {own.__name__ if isinstance(own, type) else repr(own)} is not one"
        raise TypeError(
            f"@register_variant({name!r}): {cls.__name__} must declare its own state class in its body, "
            f"`State = {cls.__name__}State`, a @dataclass subclass of {base} (memzoo.State) holding the variant's "
            f"state; {why}"
        )


def _check_field_names(name: str, cls: type, config: type[VariantConfig]) -> None:
    """A variant's fields become attributes of its backbone: refuse names that would
    shadow a shared field (the backbone's, or a language model's: ``ModelConfig`` keeps
    ``vocab_size=...`` for itself, so a variant field of that name could never be set
    flat), a method or a property."""
    import inspect

    from memzoo.config import ModelConfig

    for field in config.model_fields:
        if field in ModelConfig.model_fields:
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


def list_variants() -> list[str]:
    """Names of every registered variant, sorted (plug-ins' entry points loaded first)."""
    return VARIANTS.names()


def get_variant(name: str) -> VariantSpec:
    return VARIANTS.get(name)


def unregister_variant(name: str) -> None:
    """Remove a variant (for tests and notebooks that re-define one)."""
    VARIANTS.remove(name)
