"""``bswa``: Block Sliding Window Attention (TransformerFAM paper, §2.1).

A query in block τ attends to all keys of blocks τ-m … τ-1 and, causally, to its own
block. The window is between m·L+1 and (m+1)·L keys, depending on the query's offset
in its block. Gradients flow into the memory blocks (the paper's default);
``stop_gradient_memory=True`` detaches them (the paper's "M1_SG" ablation)::

    L=4, m=1                keys: | block 0 | block 1 | block 2 |
    query in block 2 (pos 9)      |         | x x x x | x x . . |

Streaming state per layer: K/V of the last m complete blocks and of the current
partial block (at most (m+1)·L - 1 positions), plus the next position.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from memzoo.config import MAX_TOKENS, NOT_IN_FINGERPRINT, VariantConfig
from memzoo.registry import register_variant
from memzoo.variants.kv import BlockWindowBackbone, KVState


class BSWAConfig(VariantConfig):
    memory_blocks: int = Field(3, ge=0, le=MAX_TOKENS, description="m: previous blocks every query sees in full (paper default 3)")
    stop_gradient_memory: bool = Field(
        False, description="detach the memory blocks' keys/values (paper ablation M1_SG)", json_schema_extra=NOT_IN_FINGERPRINT
    )

    conformance_options = ({"memory_blocks": 1}, {"memory_blocks": 2, "stop_gradient_memory": True}, {"memory_blocks": 0})


@dataclass
class BSWAState(KVState):
    """K/V of the last ``memory_blocks`` complete blocks plus the partial block, per layer."""


@register_variant("bswa", config=BSWAConfig)
class BSWA(BlockWindowBackbone):
    """The window and the cache are :class:`memzoo.variants.kv.BlockWindowBackbone`'s."""

    State = BSWAState
