"""memzoo-infini: Infini-attention as a memzoo plug-in. Importing this package registers
the variant ``infini``; memzoo imports it through the ``memzoo.variants`` entry point."""

from memzoo_infini.reference import infini_reference
from memzoo_infini.variant import InfiniAttention, InfiniConfig, InfiniState

__all__ = ["InfiniAttention", "InfiniConfig", "InfiniState", "infini_reference"]
