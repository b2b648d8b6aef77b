"""``full``: plain causal attention, the upper bound the memory variants approximate.

Every query sees every earlier key. Streaming state: the whole K/V cache (it grows
with the tokens streamed; that is the point of the memory variants).
"""

from __future__ import annotations

from dataclasses import dataclass

from memzoo.config import VariantConfig
from memzoo.ops import BlockLayout
from memzoo.registry import register_variant
from memzoo.variants.kv import KVCacheBackbone, KVState


class FullConfig(VariantConfig):
    """``full`` has no fields of its own."""


@dataclass
class FullState(KVState):
    """The whole K/V cache per layer."""


@register_variant("full", config=FullConfig)
class Full(KVCacheBackbone):
    State = FullState
    #: the whole cache in position order, as before rings (an unbounded ring never wraps)
    state_format = 1

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=None, window=None)
