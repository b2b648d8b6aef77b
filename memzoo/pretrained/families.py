"""The one table from Hugging Face checkpoints to memzoo: per family, how ``config.json``
maps to memzoo's fields, and (shared by every family) how tensor names map.

Only json is needed here (no ``transformers``). A config key that changes the math and
that memzoo does not implement is refused with :class:`PretrainedError`, naming the key
and what is supported; a key that memzoo reads differently on purpose (Mistral's and
Qwen2's token-level ``sliding_window``) gives a :class:`PretrainedWarning` saying so.
Every other key (token ids, ``max_position_embeddings``, ``initializer_range``,
``use_cache``, ``dtype``, ...) is metadata that does not change a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from memzoo.errors import MemzooError


class PretrainedError(MemzooError):
    """A checkpoint (or a field given with it) that memzoo cannot run as it was trained."""


class PretrainedWarning(UserWarning):
    """A checkpoint setting memzoo reads differently, on purpose (the message says how)."""


@dataclass(frozen=True)
class Family:
    """What differs between the supported families; everything else is shared (below).

    ``qkv_bias`` / ``out_bias`` / ``mlp_bias``: a config key to read, or a constant the
    architecture fixes. ``window``: the token-level sliding window the checkpoint's own attention applies
    (None: none), read from the config."""

    qkv_bias: str | bool
    out_bias: str | bool
    mlp_bias: str | bool
    window: Callable[[dict[str, Any]], int | None]


def _mistral_window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window")


def _qwen2_window(cfg: dict[str, Any]) -> int | None:
    # Qwen2 applies its window only with use_sliding_window, and then only in the layers
    # that layer_types (or max_window_layers) marks "sliding_attention"
    if not cfg.get("use_sliding_window", False) or cfg.get("sliding_window") is None:
        return None
    types = cfg.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return cfg["sliding_window"]


#: model_type -> family. SmolLM / SmolLM2 are ``llama`` checkpoints (tied embeddings).
FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias", window=lambda c: None),
    "mistral": Family(qkv_bias=False, out_bias=False, mlp_bias=False, window=_mistral_window),
    "qwen2": Family(qkv_bias=True, out_bias=False, mlp_bias=False, window=_qwen2_window),
}

#: config.json key -> memzoo field, the same in every family
CONFIG_KEYS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "d_ff",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}

#: hidden_act -> memzoo's ``mlp`` (the gated MLP every supported family uses)
ACTIVATIONS: dict[str, str] = {"silu": "swiglu", "swish": "swiglu"}

#: checkpoint tensor-name prefix -> MemzooLM state-dict prefix. Inside a layer the names
#: are the same (memzoo's DecoderLayer uses Hugging Face's module names).
WEIGHT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.", "embed."),
    ("model.layers.", "backbone.layers."),
    ("model.norm.", "norm."),
    ("lm_head.", "head."),
)

#: tensors some checkpoints carry that are derived, not learned (old Llama checkpoints
#: saved RoPE's inverse frequencies; memzoo computes them from the config, in float64)
DERIVED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)

#: keys that change the math in a way memzoo does not implement, with the supported value
REFUSED_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "partial_rotary_factor": (lambda v: v is not None and v != 1 and v != 1.0, "memzoo rotates the whole head (partial_rotary_factor 1)"),
    "use_parallel_residual": (lambda v: bool(v), "memzoo's layer is sequential pre-norm (attention, then the MLP)"),
    "parallel_attn": (lambda v: bool(v), "memzoo's layer is sequential pre-norm (attention, then the MLP)"),
    "attention_dropout": (lambda v: v not in (None, 0, 0.0), "memzoo has no attention dropout (0.0)"),
    # transformers' GGUF loader dequantises (its state_dict is float) but keeps a note of the file
    "quantization_config": (
        lambda v: v is not None and not (isinstance(v, dict) and v.get("quant_method") == "gguf"),
        "unquantised weights (a .gguf file is dequantised by transformers' loader)",
    ),
    "pretraining_tp": (lambda v: v not in (None, 1), "pretraining_tp 1"),
}

#: rope types memzoo implements (memzoo.layers.positions.rope_frequencies)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _refuse(key: str, value: Any, supported: str) -> PretrainedError:
    return PretrainedError(f"checkpoint config {key}={value!r} is not supported: {supported}")


def _bias(cfg: dict[str, Any], rule: str | bool) -> bool:
    return bool(cfg.get(rule, False)) if isinstance(rule, str) else rule


def rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """``rope_base`` and ``rope_scaling`` from transformers 5's ``rope_parameters`` or the
    older top-level ``rope_theta`` + ``rope_scaling``; fills what transformers fills
    (``original_max_position_embeddings`` from ``max_position_embeddings``; yarn's
    attention factor from ``mscale`` / ``mscale_all_dim``)."""
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if params is not None and legacy:
        # transformers 5 takes a non-empty rope_scaling *instead of* rope_parameters (and
        # rope_theta from elsewhere): agree when it only repeats rope_parameters, else refuse
        # what transformers runs: rope_scaling, with rope_theta from the top level (or its
        # default) when rope_scaling has none; both ways, so neither has a key the other lacks
        def norm(d: dict[str, Any]) -> dict[str, Any]:
            return {("rope_type" if k == "type" else k): v for k, v in d.items()}

        given = {"rope_theta": cfg.get("rope_theta", 10000.0), **norm(dict(legacy))}
        kept = {"rope_theta": cfg.get("rope_theta", 10000.0), **norm(dict(params))}
        if given != kept:
            raise PretrainedError(
                f"checkpoint config has both rope_parameters={params!r} and the older rope_scaling={legacy!r}, which "
                "differ; transformers 5 uses rope_scaling in place of rope_parameters (and takes rope_theta from "
                "elsewhere): remove the one that does not apply"
            )
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        params = dict(params)
        if params and all(isinstance(v, dict) for v in params.values()):
            raise _refuse("rope_parameters", sorted(params), "one RoPE for every layer (not per layer type)")
    kind = params.pop("rope_type", params.pop("type", "default"))
    base = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    if kind not in ROPE_TYPES:
        raise _refuse("rope type", kind, f"supported: {', '.join(ROPE_TYPES)}")
    if "partial_rotary_factor" in params:
        check, why = REFUSED_KEYS["partial_rotary_factor"]
        if check(params.pop("partial_rotary_factor")):
            raise _refuse("rope_parameters.partial_rotary_factor", cfg["rope_parameters"]["partial_rotary_factor"], why)
    if kind == "default":
        if params:
            raise _refuse("rope_parameters", sorted(params), "rope type 'default' takes only rope_theta")
        return {"rope_base": base, "rope_scaling": None}
    scaling: dict[str, Any] = {"type": kind}
    if kind in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = cfg.get("max_position_embeddings")
    if kind == "yarn":
        factor = params.get("factor")
        if factor is None:
            factor = params["factor"] = cfg["max_position_embeddings"] / params["original_max_position_embeddings"]
        mscale, mscale_all = params.pop("mscale", None), params.pop("mscale_all_dim", None)
        if params.get("attention_factor") is None and mscale and mscale_all:

            def get_mscale(scale: float, m: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            params["attention_factor"] = get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
        for key in ("beta_fast", "beta_slow"):  # transformers reads `or 32` / `or 1`: memzoo's defaults
            if not params.get(key):
                params.pop(key, None)
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and key != "original_max_position_embeddings":
            value = float(value)  # memzoo's fields are strict floats; json writes 4.0 as 4 sometimes
        scaling[key] = value
    return {"rope_base": base, "rope_scaling": scaling}


@dataclass(frozen=True)
class Translated:
    """A checkpoint's config read as memzoo fields, plus what to tell the user."""

    model_type: str
    fields: dict[str, Any]
    window: int | None


def translate_config(cfg: dict[str, Any]) -> Translated:
    """memzoo's architecture fields for a Hugging Face ``config.json`` (a dict), or a
    :class:`PretrainedError` naming the key that memzoo cannot run."""
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise PretrainedError(
            f"checkpoint model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)} "
            "(SmolLM / SmolLM2 are 'llama'), and memzoo's own folders ('memzoo')"
        )
    family = FAMILIES[model_type]
    for key, (refused, supported) in REFUSED_KEYS.items():
        if key in cfg and refused(cfg[key]):
            raise _refuse(key, cfg[key], supported)
    act = cfg.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise _refuse("hidden_act", act, f"a gated MLP with {' or '.join(ACTIVATIONS)} (memzoo mlp='swiglu')")
    types = cfg.get("layer_types")
    if types is not None and set(types) - {"full_attention", "sliding_attention"}:
        raise _refuse("layer_types", sorted(set(types)), "full_attention / sliding_attention")
    missing = [k for k in CONFIG_KEYS if k not in cfg and k not in ("num_key_value_heads", "tie_word_embeddings")]
    if missing:
        raise PretrainedError(f"checkpoint config lacks {missing}; a {model_type} config.json has them")
    fields: dict[str, Any] = {memzoo: cfg[key] for key, memzoo in CONFIG_KEYS.items() if cfg.get(key) is not None}
    fields["norm_eps"] = float(fields["norm_eps"])
    fields["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    fields["mlp"] = ACTIVATIONS[act]
    fields["qkv_bias"] = _bias(cfg, family.qkv_bias)
    fields["out_bias"] = _bias(cfg, family.out_bias)
    fields["mlp_bias"] = _bias(cfg, family.mlp_bias)
    if cfg.get("head_dim") is not None:  # every family reads it when present (Gemma-style widths)
        fields["head_dim"] = cfg["head_dim"]
    fields.update(rope_fields(cfg))
    return Translated(model_type=model_type, fields=fields, window=family.window(cfg))


def memzoo_name(name: str) -> str | None:
    """The MemzooLM state-dict name of a checkpoint tensor; None for a derived tensor
    (skipped); the name unchanged when no prefix matches (then refused as unexpected)."""
    if name.endswith(DERIVED_SUFFIXES):
        return None
    for hf, ours in WEIGHT_PREFIXES:
        if name.startswith(hf):
            return ours + name[len(hf):]
    return name
