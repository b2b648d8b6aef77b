"""Shared pieces: position schemes, feed-forward, the pre-norm decoder layer."""

from memzoo.layers.decoder import DecoderLayer, FeedForward
from memzoo.layers.positions import POSITION_SCHEMES, NoPositions, PositionScheme, RoPE, make_positions
from memzoo.layers.relative import RelativePositions  # registers "relative" in POSITION_SCHEMES

__all__ = ["DecoderLayer", "FeedForward", "POSITION_SCHEMES", "NoPositions", "PositionScheme", "RelativePositions", "RoPE", "make_positions"]
