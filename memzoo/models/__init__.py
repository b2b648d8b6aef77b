"""Language-model wrapper and the config -> module builders."""

from memzoo.models.builder import backbone_from_config, build_backbone, build_model
from memzoo.models.lm import MemzooLM, ModelOutput

__all__ = ["MemzooLM", "ModelOutput", "backbone_from_config", "build_backbone", "build_model"]
