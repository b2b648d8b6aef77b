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
from pathlib import Path
from typing import Any

from memzoo.config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TIED_HEAD = "head.weight"


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

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model_config_of(model)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
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
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder
