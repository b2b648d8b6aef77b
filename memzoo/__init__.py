"""memzoo: attention-memory architectures for long sequences behind one interface.

>>> import memzoo
>>> model = memzoo.build_model("bswa", vocab_size=32, d_model=16, n_heads=2, block_size=4, memory_blocks=1)
>>> import torch
>>> logits, state = model(torch.zeros(1, 6, dtype=torch.long))
>>> logits.shape, state.pos
(torch.Size([1, 6, 32]), 6)
"""

from memzoo.config import NOT_IN_FINGERPRINT, BackboneConfig, ModelConfig, VariantConfig
from memzoo.errors import InputError, MemzooError, StateError, UnknownNameError
from memzoo.ops import list_backends, use_backend
from memzoo.registry import get_variant, list_variants, register_variant
from memzoo.state import State, load_state, save_state
from memzoo.variants import Backbone, BackboneOutput, ring
from memzoo.models import MemzooLM, ModelOutput, build_backbone, build_model
from memzoo.pretrained import from_pretrained

__version__ = "0.1.0"



def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``memzoo.compare`` (the comparison package: ``memzoo.compare.compare(...)``) is
    imported on first use, so ``import memzoo`` stays light."""
    if name == "compare":
        import importlib

        return importlib.import_module("memzoo.compare")
    raise AttributeError(f"module 'memzoo' has no attribute {name!r}")

__all__ = [
    "Backbone", "BackboneConfig", "BackboneOutput", "InputError", "MemzooError", "MemzooLM", "ModelConfig",
    "ModelOutput", "NOT_IN_FINGERPRINT", "State", "StateError", "UnknownNameError", "VariantConfig", "__version__", "build_backbone",
    "compare", "build_model", "from_pretrained", "get_variant", "list_backends", "list_variants", "load_state", "register_variant",
    "ring", "save_state",
    "use_backend",
]
