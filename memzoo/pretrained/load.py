"""``memzoo.from_pretrained``: a Hugging Face Llama-family checkpoint (or memzoo's own
folder) as any registered variant, every checkpoint tensor used unchanged.

Sources: a local folder (``config.json`` + ``model.safetensors``, or shards with
``model.safetensors.index.json``; json + safetensors only), an in-memory
``transformers`` model, a ``.gguf`` file (:mod:`memzoo.pretrained.gguf`), or a hub id
(through ``huggingface_hub``, when it is installed and online).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from memzoo.config import ModelConfig
from memzoo.models.builder import build_model
from memzoo.models.lm import MemzooLM
from memzoo.pretrained.families import PretrainedError, PretrainedWarning, memzoo_name, translate_config
from memzoo.pretrained.save import CONFIG_NAME, INDEX_NAME, TIED_HEAD, TOKEN_ID_KEYS, WEIGHTS_NAME, model_config_of
from memzoo.registry import get_variant

#: fields a pretrained checkpoint may NOT fix: the memory unit and the attention backend.
#: Every other shared field is the checkpoint's architecture.
FREE_SHARED_FIELDS = frozenset({"block_size", "backend"})

#: a variant's own fields, when run on a checkpoint that was not trained as that variant:
#: defaults that keep "no new weights" (xl's relative positions would need u, v and W_r,
#: which no pretrained RoPE model has)
PRETRAINED_DEFAULTS: dict[str, dict[str, Any]] = {"xl": {"positions": "rope"}}

#: (variant, field, value) -> why it is refused on a checkpoint trained without it
REFUSED_OPTIONS: dict[tuple[str, str, Any], str] = {
    ("xl", "positions", "relative"): (
        "xl's relative positional attention needs new weights (the biases u, v and the projection W_r per layer) "
        "that the checkpoint does not have, and it would replace the RoPE the checkpoint was trained with; "
        "use positions='rope' (the default for pretrained models)"
    ),
}

#: the seed of the generator that picks the token embeddings a variant's own parameters
#: start from (so loading is deterministic)
INIT_SEED = 0

#: a decoder layer's own tensors (every checkpoint has them; a variant adds none there)
_DECODER_TENSOR = re.compile(r"^backbone\.layers\.\d+\.(input_layernorm|self_attn|post_attention_layernorm|mlp)\.")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def from_pretrained(source: Any, variant: str | None = None, *, dtype: torch.dtype | None = None, **fields: Any) -> MemzooLM:
    """Load a pretrained decoder as variant ``variant``.

    ``source``: a folder (Hugging Face layout or memzoo's own, see
    :func:`memzoo.pretrained.save_pretrained`), a ``.gguf`` file, an in-memory
    ``transformers`` model or :class:`memzoo.MemzooLM`, or a hub id. ``variant``: any
    registered variant; None = the checkpoint's own (``full`` for a Hugging Face model:
    that model). ``fields``: the variant's own fields and ``block_size`` / ``backend``;
    a field the checkpoint fixes (``d_model``, ``n_heads``, ...) may only be repeated
    with its value. ``dtype``: of the returned model; None = the checkpoint's.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"from_pretrained: dtype must be a floating-point torch.dtype (torch.float32, torch.float64, torch.bfloat16, "
            f"torch.float16) or None (the checkpoint's own), got {dtype!r}"
        )
    raw, tensors, what, folder = _read(source)
    model, config = _build(raw, tensors, variant, fields, what)
    model.pretrained_folder = None if folder is None else folder.resolve()
    model.token_ids = _token_ids(source, raw, folder)
    if dtype is None:
        dtype = _stored_dtype(tensors)
    return model.to(dtype).eval()


def _token_ids(source: Any, raw: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    """The checkpoint's special token ids: a memzoo model's own, else its config's, with a
    folder's ``generation_config.json`` over them (where ``generate`` reads them; Llama 3
    lists several eos ids there)."""
    lm = source if isinstance(source, MemzooLM) else getattr(source, "model", None)
    ids = dict(getattr(lm, "token_ids", {})) if isinstance(lm, MemzooLM) else {}
    ids.update({key: raw[key] for key in TOKEN_ID_KEYS if raw.get(key) is not None})
    given: Any = {}
    generation = None if folder is None else folder / "generation_config.json"
    if generation is not None and generation.is_file():
        try:
            given = json.loads(generation.read_text())
        except json.JSONDecodeError:
            given = {}
    elif isinstance(source, nn.Module) and getattr(source, "generation_config", None) is not None:
        given = {key: getattr(source.generation_config, key, None) for key in TOKEN_ID_KEYS}  # an in-memory model's
    ids.update({key: given[key] for key in TOKEN_ID_KEYS if isinstance(given, dict) and given.get(key) is not None})
    return ids


# ------------------------------------------------------------------ sources
def _read(source: Any) -> tuple[dict[str, Any], dict[str, Tensor], str, Path | None]:
    """(config.json as a dict, tensors by their stored names, a description, the
    checkpoint folder read: None for a model in memory, unless it came from one)."""
    inner = getattr(source, "model", None)
    if isinstance(source, MemzooLM) or isinstance(inner, MemzooLM):
        lm = source if isinstance(source, MemzooLM) else inner
        assert isinstance(lm, MemzooLM)
        sd = dict(lm.state_dict())
        config = model_config_of(lm)
        if config.tie_embeddings:
            del sd[TIED_HEAD]
        config_json = {"model_type": "memzoo", "memzoo": config.model_dump(mode="json")}
        return config_json, sd, f"a {type(source).__name__}", getattr(lm, "pretrained_folder", None)  # None: pickled by an older memzoo
    if isinstance(source, nn.Module):
        hf_config = getattr(source, "config", None)
        if hf_config is None or not hasattr(hf_config, "to_dict"):
            raise TypeError(
                f"from_pretrained got a {type(source).__name__} without a transformers config; pass a transformers "
                "PreTrainedModel (e.g. LlamaForCausalLM), a memzoo.MemzooLM, a folder, a .gguf file or a hub id"
            )
        return dict(hf_config.to_dict()), dict(source.state_dict()), f"the in-memory {type(source).__name__}", None
    if not isinstance(source, (str, Path)):
        raise TypeError(f"from_pretrained: source must be a path, a hub id or a model, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return (*read_folder(path), str(path), path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise PretrainedError(f"{path} is a file but not a .gguf file; give a checkpoint folder (with {CONFIG_NAME}) or a .gguf file")
        from memzoo.pretrained.gguf import gguf_folder

        folder = gguf_folder(path)
        return (*read_folder(folder), str(path), folder)
    if isinstance(source, str) and _HUB_ID.match(source):
        folder = hub_folder(source)
        return (*read_folder(folder), f"hub:{source}", folder)
    raise FileNotFoundError(f"from_pretrained: {source!r} is neither a folder, a .gguf file nor a hub id ('org/name')")


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``config.json`` and every tensor of a checkpoint folder (one file or shards)."""
    from safetensors.torch import load_file

    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not a checkpoint folder")
    config = json.loads(config_path.read_text())
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif (folder / INDEX_NAME).is_file():
        index = json.loads((folder / INDEX_NAME).read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise FileNotFoundError(
            f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; memzoo reads safetensors checkpoints"
            + (f" (found {others}: a .gguf file can be given directly)" if others else "")
        )
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return config, tensors


def hub_folder(repo_id: str) -> Path:
    """A hub checkpoint's local folder (its config and safetensors), through huggingface_hub."""
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:
        raise PretrainedError(
            f"{repo_id!r} is not a local path; loading from the Hugging Face hub needs huggingface_hub "
            "(pip install 'memzoo[hf]'), or give a local folder / .gguf file"
        ) from None
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors", INDEX_NAME, "tokenizer*", "generation_config.json"]
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise PretrainedError(
            f"cannot fetch {repo_id!r}: the Hugging Face hub is not reachable (offline, HF_HUB_OFFLINE=1, or no network) "
            f"and it is not in the local hub cache. Download it where you are online, or give a local folder / .gguf file. ({err})"
        ) from err
    return Path(path)


# -------------------------------------------------------------------- build
def _stored_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    kinds = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def _same_float32(a: Any, b: Any) -> bool:
    """Two floats that round to the same float32 (bools and ints are compared as given)."""
    if type(a) is not float or type(b) is not float:
        return False
    return bool(torch.tensor(a, dtype=torch.float32) == torch.tensor(b, dtype=torch.float32))


def _resolved(config: ModelConfig, name: str) -> Any:
    return {"n_kv_heads": config.resolved_kv_heads, "head_dim": config.resolved_head_dim, "d_ff": config.resolved_d_ff}.get(
        name, getattr(config, name)
    )


def _base(config: dict[str, Any], what: str) -> tuple[str, dict[str, Any], dict[str, Any], bool]:
    """(the checkpoint's variant, shared fields, its variant's fields, whether it is a
    Hugging Face checkpoint, i.e. its tensors need renaming)."""
    if config.get("model_type") == "memzoo":
        if "memzoo" not in config:
            raise PretrainedError(f"{what}: a memzoo config.json needs the 'memzoo' entry (the ModelConfig)")
        saved = ModelConfig.model_validate_json(json.dumps(config["memzoo"]))
        return saved.variant, saved.model_dump(exclude={"variant", "options"}), dict(saved.options), False
    translated = translate_config(config)
    if translated.window is not None:
        warnings.warn(
            f"{what}: {translated.model_type}'s sliding_window={translated.window} is a token-level window of the checkpoint's "
            "own attention; memzoo does not apply it: the variant you choose decides the attention pattern (so 'full' "
            f"differs from transformers on sequences longer than {translated.window} tokens; 'bswa' is a block window)",
            PretrainedWarning,
            stacklevel=4,
        )
    return "full", translated.fields, {}, True


def _build(
    raw_config: dict[str, Any], tensors: dict[str, Tensor], variant: str | None, fields: dict[str, Any], what: str
) -> tuple[MemzooLM, ModelConfig]:
    base_variant, shared, base_options, hf = _base(raw_config, what)
    variant = base_variant if variant is None else variant
    if "variant" in fields:
        raise TypeError("give the variant as the second argument (variant=...), not as a field")
    own = set(get_variant(variant).config.model_fields)
    user_options = {k: v for k, v in fields.items() if k in own}
    user_shared = {k: v for k, v in fields.items() if k not in own}
    if variant == base_variant:
        options = {**base_options, **user_options}
    else:
        options = {**PRETRAINED_DEFAULTS.get(variant, {}), **user_options}
        for (name, field, value), why in REFUSED_OPTIONS.items():
            if name == variant and options.get(field) == value:
                raise PretrainedError(f"{what}: {variant} with {field}={value!r} is refused: {why}")
    try:
        reference = ModelConfig(variant="full", **shared)
    except ValidationError as err:
        raise PretrainedError(f"{what}: the checkpoint's config does not make a memzoo model: {err}") from err
    # a float the user repeats from the checkpoint's card (norm_eps=1e-5) may be stored as a
    # float32 (a GGUF's 9.999999747e-06): the same value, so the checkpoint's is kept
    user_shared = {
        k: shared[k] if k in shared and _same_float32(v, shared[k]) else v for k, v in user_shared.items()
    }
    config = ModelConfig(variant=variant, **{**shared, **user_shared}, **options)  # the user's fields: their own errors
    fixed = [
        f"{k}={_resolved(config, k)!r} (the checkpoint has {_resolved(reference, k)!r})"
        for k in user_shared if k not in FREE_SHARED_FIELDS and _resolved(config, k) != _resolved(reference, k)
    ]
    if fixed:
        raise PretrainedError(
            f"{what}: the checkpoint fixes {', '.join(fixed)}; only block_size, backend and the variant's own fields "
            f"({', '.join(sorted(own)) or 'none'}) can be chosen"
        )
    model = build_model(config)
    # a memzoo folder as another variant, or its own with other options (xl's positions): what
    # the saved variant added may go unused. A Hugging Face checkpoint's tensors are never "added"
    changed = not hf and (variant != base_variant or options != base_options)
    _load_weights(model, _named(tensors, hf=hf, tied=config.tie_embeddings), what, dropped_ok=changed)
    return model, config


def _named(tensors: dict[str, Tensor], *, hf: bool, tied: bool) -> dict[str, Tensor]:
    """Tensors under MemzooLM's names; a tied head left out (memzoo re-ties it)."""
    out: dict[str, Tensor] = {}
    if not hf and tensors and all(name.startswith("model.") for name in tensors):
        # saved through transformers by the MemzooForCausalLM wrapper (base_model_prefix "model")
        tensors = {name[len("model."):]: t for name, t in tensors.items()}
    for name, t in tensors.items():
        ours = memzoo_name(name) if hf else name
        if ours is not None:
            out[ours] = t
    if tied:
        out.pop(TIED_HEAD, None)
    return out


@torch.no_grad()
def _load_weights(model: MemzooLM, tensors: dict[str, Tensor], what: str, *, dropped_ok: bool) -> None:
    """Copy ``tensors`` into ``model``; initialise what the variant adds (and only that)
    from the model's own token embeddings; refuse anything else missing or unexpected."""
    params = dict(model.state_dict(keep_vars=True))
    if model.head.weight is model.embed.weight:
        params.pop(TIED_HEAD)
    if dropped_ok:  # an added tensor of another shape (fam_len 4 -> 8): the saved one does not fit these options
        resized = sorted(
            k for k in set(tensors) & set(params)
            if k.startswith("backbone.") and not _DECODER_TENSOR.match(k) and tuple(tensors[k].shape) != tuple(params[k].shape)
        )
        if resized:
            warnings.warn(
                f"{what}: not loading {[f'{k} {tuple(tensors[k].shape)}' for k in resized]}: the checkpoint's variant added "
                f"them in another shape than {model.variant} with these options takes; they start afresh "
                "(Backbone.init_from_embeddings)",
                PretrainedWarning,
                stacklevel=4,
            )
            tensors = {k: t for k, t in tensors.items() if k not in resized}
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        added = [k for k in unexpected if k.startswith("backbone.") and not _DECODER_TENSOR.match(k)]
        if dropped_ok and added == unexpected:
            warnings.warn(
                f"{what}: not loading {added}: the checkpoint's variant added them and {model.variant} with these options "
                "has no use for them",
                PretrainedWarning,
                stacklevel=4,
            )
        else:
            raise PretrainedError(f"{what}: tensors the {model.variant} model has no place for: {unexpected[:8]}"
                                  + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    for name, param in params.items():
        if name in tensors:
            src = tensors[name]
            if tuple(src.shape) != tuple(param.shape):
                raise PretrainedError(f"{what}: tensor {name} has shape {tuple(src.shape)}, the model expects {tuple(param.shape)}")
            param.copy_(src)
    missing = [k for k in params if k not in tensors]
    if not missing:
        return
    outside = [k for k in missing if not k.startswith("backbone.") or _DECODER_TENSOR.match(k)]
    if outside:
        raise PretrainedError(f"{what}: the checkpoint lacks {outside}")
    generator = torch.Generator().manual_seed(INIT_SEED)
    initialised = {f"backbone.{n}" for n in model.backbone.init_from_embeddings(model.embed.weight, generator)}
    left = [k for k in missing if k not in initialised]
    if left:
        raise PretrainedError(
            f"{what}: {model.variant} needs parameters the checkpoint does not have and cannot initialise from the "
            f"model's embeddings: {left} (a variant names them in Backbone.init_from_embeddings)"
        )
    for name in initialised & set(tensors):  # the hook may set more than was missing: keep the stored ones
        params[name].copy_(tensors[name])
