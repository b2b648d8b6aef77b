"""Pretrained decoders: load a Hugging Face Llama-family checkpoint (Llama, Mistral,
Qwen2, SmolLM) as any memzoo variant, and save memzoo models in the same folder layout.
See docs/pretrained.md."""

from memzoo.pretrained.families import FAMILIES, PretrainedError, PretrainedWarning, translate_config
from memzoo.pretrained.load import from_pretrained, read_folder
from memzoo.pretrained.save import model_config_of, save_pretrained

__all__ = [
    "FAMILIES", "PretrainedError", "PretrainedWarning", "from_pretrained", "model_config_of", "read_folder",
    "save_pretrained", "translate_config",
]
