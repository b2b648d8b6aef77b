"""Shared pieces: position schemes, feed-forward, the pre-norm decoder layer."""

from memzoo.layers.decoder import MLP, MLP_KINDS, Attention, DecoderLayer
from memzoo.layers.positions import POSITION_SCHEMES, NoPositions, PositionScheme, RoPE, RopeScaling, make_positions, rope_frequencies
from memzoo.layers.relative import RelativePositions  # registers "relative" in POSITION_SCHEMES

__all__ = [
    "Attention", "DecoderLayer", "MLP", "MLP_KINDS", "POSITION_SCHEMES", "NoPositions", "PositionScheme", "RelativePositions", "RoPE",
    "RopeScaling", "make_positions", "rope_frequencies",
]
