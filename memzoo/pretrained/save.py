"""memzoo's own checkpoint folder: ``config.json`` + ``model.safetensors``.

``config.json`` is a Hugging Face-style config (``model_type="memzoo"``, read by the
``transformers`` wrapper ``MemzooForCausalLM``) whose ``"memzoo"`` entry is the whole
:class:`memzoo.ModelConfig` (variant and every field). ``model.safetensors`` holds the
:class:`memzoo.MemzooLM` ``state_dict()`` under its own names, what the variant added
included (FAM's prompt, RMT's memory embeddings, XL's relative-position weights); a tied
LM head is left out, as Hugging Face does, and re-tied on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from memzoo.config import ModelConfig
from memzoo.pretrained.families import PretrainedError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TIED_HEAD = "head.weight"

#: what ``save_pretrained`` copies from the folder a model was loaded from, where present:
#: the tokenizer (``tokenizers``' and ``transformers``' files) and the generation defaults
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
    "generation_config.json",
)
#: the special token ids (``MemzooLM.token_ids``: read by from_pretrained, written into config.json)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_config_of(model: Any) -> ModelConfig:
    """The :class:`ModelConfig` a :class:`memzoo.MemzooLM` is built from, derived from the
    model itself (its backbone's validated config, vocabulary and head tie)."""
    backbone = model.backbone.config
    shared = backbone.model_dump(exclude={"options"})
    return ModelConfig(**shared, options=dict(backbone.options), vocab_size=model.vocab_size, tie_embeddings=is_tied(model))


def is_tied(model: Any) -> bool:
    return model.head.weight is model.embed.weight


def save_pretrained(model: Any, path: str | Path) -> Path:
    """Write ``model`` (a :class:`memzoo.MemzooLM`) to the folder ``path`` (created if
    needed); ``memzoo.from_pretrained(path)`` gives the same model back. Returns the folder."""
    from safetensors.torch import save_file

    from memzoo import __version__

    config = model_config_of(model)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    _check_names(tensors, config)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if config.tie_embeddings:
        del tensors[TIED_HEAD]
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    meta: dict[str, Any] = {
        "model_type": "memzoo",
        "architectures": ["MemzooForCausalLM"],
        "memzoo": config.model_dump(mode="json"),
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "memzoo_version": __version__,
    }
    if len(dtypes) == 1:
        meta["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    source = getattr(model, "pretrained_folder", None)
    if source is not None:
        _copy_tokenizer(source, folder)
    meta.update({key: value for key, value in getattr(model, "token_ids", {}).items() if key in TOKEN_ID_KEYS})
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _check_names(tensors: dict[str, Any], config: ModelConfig) -> None:
    """Refuse to write a folder ``from_pretrained`` would refuse to read: tensors a model
    of ``config`` has no place for (unmerged LoRA adapters wrap ``q_proj`` as
    ``q_proj.base_layer`` + ``lora_A``/``lora_B``), or lacks."""
    from memzoo.models.builder import build_model

    with torch.device("meta"):
        expected = set(build_model(config).state_dict())
    extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if extra or missing:
        lora = any("lora_" in name or ".base_layer." in name for name in extra)
        raise PretrainedError(
            f"save_pretrained: the model's tensors do not fit a {config.variant} model of its config "
            f"(no place for {extra[:3]}{' ...' if len(extra) > 3 else ''}; missing {missing[:3]}{' ...' if len(missing) > 3 else ''})"
            + ("; it holds unmerged LoRA adapters: merge them first (peft_model.merge_and_unload()), "
               "or save the adapters alone with peft_model.save_pretrained(dir)" if lora else "")
        )


def _copy_tokenizer(source: Path, folder: Path) -> None:
    """Copy ``source``'s tokenizer files into ``folder``, where ``folder`` has none of that
    name (a tokenizer saved there first is kept). The special token ids come with the
    model (``model.token_ids``, read by ``from_pretrained`` from the same folder)."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copyfile(source / name, folder / name)
