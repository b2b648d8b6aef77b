"""The one place that maps configs to modules' plain typed arguments."""

from __future__ import annotations

from typing import Any

from memzoo.config import BackboneConfig, ModelConfig
from memzoo.models.lm import MemzooLM
from memzoo.registry import get_variant
from memzoo.variants.base import Backbone


def _config(cls: type[BackboneConfig], name_or_config: str | BackboneConfig, fields: dict[str, Any]) -> BackboneConfig:
    if isinstance(name_or_config, BackboneConfig):
        if fields:
            raise TypeError(f"pass either a config or a name with fields, not both (got fields {sorted(fields)})")
        if not isinstance(name_or_config, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(name_or_config).__name__}")
        return name_or_config
    if not isinstance(name_or_config, str):
        raise TypeError(f"expected a variant name or a {cls.__name__}, got {type(name_or_config).__name__}")
    if "variant" in fields:
        raise TypeError("give the variant as the first argument, not as a field")
    return cls(variant=name_or_config, **fields)


def backbone_from_config(config: BackboneConfig) -> Backbone:
    return get_variant(config.variant).cls(**config.backbone_kwargs())


def build_backbone(name_or_config: str | BackboneConfig, **fields: Any) -> Backbone:
    """The memory backbone alone, ``(x (B,T,D), state) -> (y, state)``, for your own model."""
    return backbone_from_config(_config(BackboneConfig, name_or_config, fields))


def build_model(name_or_config: str | ModelConfig, **fields: Any) -> MemzooLM:
    """A language model with the named variant as its backbone.

    ``build_model("bswa", vocab_size=256, d_model=64, memory_blocks=1)`` or
    ``build_model(ModelConfig(...))``. Unknown fields are refused with the valid list.
    """
    config = _config(ModelConfig, name_or_config, fields)
    assert isinstance(config, ModelConfig)
    model = MemzooLM(backbone_from_config(config), config.vocab_size, config.tie_embeddings)
    model.config = config
    return model
