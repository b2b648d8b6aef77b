"""Configs (pydantic v2, ``extra="forbid"``): the shared model fields plus the chosen
variant's own fields. Configs never reach into modules: :mod:`memzoo.models.builder`
maps a config to the plain typed arguments of the modules.

A variant's own fields may be given flat (``ModelConfig(variant="bswa",
memory_blocks=1)``); they are moved into ``options`` and validated by the variant's
config class. Unknown names are refused with the list of valid ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memzoo.errors import UnknownNameError


class VariantConfig(BaseModel):
    """Base class of a variant's own fields. Every field must have a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: small settings the conformance suite runs this variant with (block_size 4, T <= ~20)
    conformance_options: ClassVar[tuple[dict[str, Any], ...]] = ({},)

    def check_shared(self, shared: "BackboneConfig") -> None:
        """Cross-field rules against the shared fields; raise ``ValueError`` to refuse."""


class BackboneConfig(BaseModel):
    """Fields every backbone takes, plus the variant's own (``options``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    variant: str
    d_model: int = Field(64, ge=1, description="model width D")
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    block_size: int = Field(64, ge=1, description="tokens per block/segment: the unit at which memory is updated")
    d_ff: int | None = Field(None, ge=1, description="feed-forward width; None = 4 * d_model")
    rope_base: float = Field(10000.0, gt=0)
    backend: str = Field("auto", description="attention backend name, or 'auto'")
    options: dict[str, Any] = Field(default_factory=dict, description="the variant's own fields")

    @model_validator(mode="before")
    @classmethod
    def _lift_variant_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        from memzoo.registry import get_variant

        name = data.get("variant")
        if not isinstance(name, str):
            raise ValueError("'variant' is required: the name of a registered variant")
        spec = get_variant(name)
        data = dict(data)
        options = dict(data.pop("options", None) or {})
        own = set(spec.config.model_fields)
        for key in list(data):
            if key in cls.model_fields:
                continue
            if key in own:
                if key in options:
                    raise ValueError(f"field {key!r} given both flat and in options")
                options[key] = data.pop(key)
            else:
                valid = sorted((set(cls.model_fields) - {"options"}) | own)
                raise UnknownNameError(
                    f"unknown field {key!r} for variant {name!r}; valid fields: {', '.join(valid)}"
                )
        unknown = set(options) - own
        if unknown:
            raise UnknownNameError(
                f"unknown option(s) {sorted(unknown)} for variant {name!r}; valid: {', '.join(sorted(own)) or '(none)'}"
            )
        data["options"] = options
        return data

    @model_validator(mode="after")
    def _check(self) -> "BackboneConfig":
        from memzoo.ops import check_backend_name

        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        check_backend_name(self.backend)
        own = self.variant_config
        own.check_shared(self)
        # store the full, validated options (defaults filled in) so configs compare equal
        object.__setattr__(self, "options", own.model_dump())
        return self

    @property
    def variant_config(self) -> VariantConfig:
        from memzoo.registry import get_variant

        return get_variant(self.variant).config.model_validate(self.options)

    def backbone_kwargs(self) -> dict[str, Any]:
        """The backbone constructor's keyword arguments."""
        shared = {k: getattr(self, k) for k in BackboneConfig.model_fields if k not in ("variant", "options")}
        return {**shared, **self.options}


class ModelConfig(BackboneConfig):
    """A language model: token embedding -> backbone -> final norm -> LM head."""

    vocab_size: int = Field(256, ge=1)
    tie_embeddings: bool = False
