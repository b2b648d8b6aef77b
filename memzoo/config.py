"""Configs (pydantic v2, ``extra="forbid"``, strict): the shared model fields plus the
chosen variant's own fields. Each field is declared once, here or in the variant's
config class; everything else is derived from that declaration: a backbone's
constructor arguments and their checks (:class:`memzoo.Backbone` validates its keyword
arguments through these configs), the state fingerprint (every field except those
marked ``json_schema_extra={"fingerprint": False}``), and the defaults ``memzoo list``
and the registry cards show. :mod:`memzoo.models.builder` maps a config to modules.

A variant's own fields may be given flat (``ModelConfig(variant="bswa",
memory_blocks=1)``); they are moved into ``options`` and validated by the variant's
config class. Unknown names are refused with the list of valid ones.

The defaults are memzoo's own preset (the architecture of the committed leaderboards:
multi-head attention, a GELU MLP with biases, RMSNorm with eps = float32's machine
epsilon, RoPE base 1e4). A Hugging Face checkpoint sets the fields it needs
(``memzoo.from_pretrained``): ``n_kv_heads``, ``head_dim``, ``mlp="swiglu"``,
``norm_eps``, ``rope_scaling`` ...
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from memzoo.errors import UnknownNameError
from memzoo.layers.positions import RopeScaling

M = TypeVar("M", bound=BaseModel)

#: float32's machine epsilon: what ``nn.RMSNorm(d)`` used in float32 before the eps was a
#: field (so memzoo's own preset reproduces the committed leaderboards exactly)
FLOAT32_EPS = 1.1920928955078125e-07

#: Upper bounds of sizes, checked when a config is built (so ``build_model`` fails at
#: once with a message instead of never returning, or overflowing at the first forward).
#: Far above any model these tiny-to-mid architectures are meant for; raise them here.
MAX_LAYERS = 2**10
MAX_WIDTH = 2**16  # d_model, head_dim x heads, and any per-variant count of vectors
MAX_HEADS = 2**12
MAX_FF = 2**20
MAX_TOKENS = 2**20  # block_size, memory lengths: positions held or gathered per block (a call costs O(block_size))
MAX_VOCAB = 2**24
MAX_PARAMETERS = 2**34  # about 17e9: a bigger build would take minutes or be killed for memory rather than fail
MAX_POSITION = 2**40  # absolute positions (and position offsets): exact in float64 RoPE angles, far from int64 overflow

#: marks a field that does not change what a state means (training-only knobs, the backend)
NOT_IN_FINGERPRINT: dict[str, Any] = {"fingerprint": False}


def in_fingerprint(info: Any) -> bool:
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("fingerprint") is False)


def validate_options(config: type[M], options: dict[str, Any]) -> M:
    """``config`` (a strict variant or task config) from ``options`` as given in Python
    or read from JSON: validated in JSON mode when the options are JSON values, where a
    list is a tuple field's JSON form (a config file, ``--option``, a leaderboard, a
    Hugging Face ``config.json`` hold tuples as lists; Python's strict mode refuses a
    list for a tuple) and strictness is otherwise the same; in Python mode otherwise."""
    import json

    try:
        text = json.dumps(options, allow_nan=False)
    except (TypeError, ValueError):
        return config.model_validate(options)
    return config.model_validate_json(text)


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
    d_model: int = Field(64, ge=1, le=MAX_WIDTH, description="model width D")
    n_layers: int = Field(2, ge=1, le=MAX_LAYERS)
    n_heads: int = Field(4, ge=1, le=MAX_HEADS, description="query heads H")
    n_kv_heads: int | None = Field(
        None, ge=1, le=MAX_HEADS, description="key/value heads (grouped-query attention; 1 = multi-query); None = n_heads"
    )
    head_dim: int | None = Field(None, ge=2, le=MAX_WIDTH, description="per-head width Dh; None = d_model // n_heads")
    block_size: int = Field(64, ge=1, le=MAX_TOKENS, description="tokens per block/segment: the unit at which memory is updated")
    d_ff: int | None = Field(None, ge=1, le=MAX_FF, description="feed-forward width; None = 4 * d_model")
    mlp: Literal["gelu", "swiglu", "geglu_tanh"] = Field(
        "gelu", description="feed-forward: GELU MLP (memzoo), gated SiLU (Llama, Qwen2, Mistral, SmolLM), gated tanh-GELU (Gemma)"
    )
    mlp_bias: bool = Field(True, description="biases in the feed-forward projections")
    qkv_bias: bool = Field(False, description="biases in the q/k/v projections (Qwen2)")
    out_bias: bool = Field(False, description="bias in the attention output projection")
    norm_eps: float = Field(FLOAT32_EPS, gt=0, allow_inf_nan=False, description="RMSNorm epsilon (checkpoints: 1e-5 or 1e-6)")
    rope_base: float = Field(10000.0, gt=0, allow_inf_nan=False, description="RoPE theta")
    rope_scaling: RopeScaling | None = Field(None, description="RoPE frequency scaling (linear, llama3, yarn); None = plain RoPE")
    backend: str = Field("auto", description="attention backend name, or 'auto'", json_schema_extra=NOT_IN_FINGERPRINT)
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

        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or give head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim {self.resolved_head_dim} must be even (RoPE pairs dimensions)")
        if self.n_heads % self.resolved_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_heads * self.resolved_head_dim > MAX_WIDTH:
            raise ValueError(
                f"n_heads x head_dim = {self.n_heads} x {self.resolved_head_dim} exceeds {MAX_WIDTH} (memzoo.config.MAX_WIDTH)"
            )
        if self.resolved_d_ff > MAX_FF:
            raise ValueError(f"d_ff = 4 x d_model = {self.resolved_d_ff} exceeds {MAX_FF} (memzoo.config.MAX_FF); give d_ff")
        if self.estimated_parameters > MAX_PARAMETERS:
            raise ValueError(
                f"this model would have about {self.estimated_parameters:.3g} parameters, more than "
                f"{MAX_PARAMETERS:.3g} (memzoo.config.MAX_PARAMETERS); make it smaller"
            )
        check_backend_name(self.backend)
        own = self.variant_config
        own.check_shared(self)
        # store the full, validated options (defaults filled in) so configs compare equal
        object.__setattr__(self, "options", own.model_dump())
        return self

    @property
    def variant_config(self) -> VariantConfig:
        from memzoo.registry import get_variant

        return validate_options(get_variant(self.variant).config, self.options)

    @property
    def estimated_parameters(self) -> int:
        """The shared layers' weights (attention and MLP matrices), a lower bound of
        the parameter count (norms, biases and a variant's own parameters are small)."""
        d, dh, h, hkv = self.d_model, self.resolved_head_dim, self.n_heads, self.resolved_kv_heads
        mlp = (2 if self.mlp == "gelu" else 3) * d * self.resolved_d_ff
        return self.n_layers * (d * dh * (2 * h + 2 * hkv) + mlp)

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    def backbone_kwargs(self) -> dict[str, Any]:
        """The backbone constructor's keyword arguments."""
        shared = {k: getattr(self, k) for k in BackboneConfig.model_fields if k not in ("variant", "options")}
        return {**shared, **self.options}

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides a state's meaning: every shared and variant field (resolved: a
        ``None`` default is replaced by the value it stands for) except those marked
        :data:`NOT_IN_FINGERPRINT`. JSON-ready."""
        shared = {
            k: v for k, v in self.model_dump(mode="json").items()
            if k not in ("variant", "options") and k in BackboneConfig.model_fields and in_fingerprint(BackboneConfig.model_fields[k])
        }
        shared.update(n_kv_heads=self.resolved_kv_heads, head_dim=self.resolved_head_dim, d_ff=self.resolved_d_ff)
        own_cls = type(self.variant_config)
        own = {k: v for k, v in self.variant_config.model_dump(mode="json").items() if in_fingerprint(own_cls.model_fields[k])}
        return {**shared, **own}


class ModelConfig(BackboneConfig):
    """A language model: token embedding -> backbone -> final norm -> LM head."""

    vocab_size: int = Field(256, ge=1, le=MAX_VOCAB)
    tie_embeddings: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain dict, with the keys that libraries taking a Hugging Face
        config read from it (PEFT's ``merge_and_unload`` reads ``tie_word_embeddings``)."""
        return {**self.model_dump(mode="json"), "model_type": "memzoo", "tie_word_embeddings": self.tie_embeddings}

    @property
    def estimated_parameters(self) -> int:
        return super().estimated_parameters + (1 if self.tie_embeddings else 2) * self.vocab_size * self.d_model
