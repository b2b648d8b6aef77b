"""Position schemes, pluggable per variant.

A scheme turns per-head queries and keys into the vectors a backend dot-products,
given each token's absolute position. Queries and keys are transformed apart, so
cached keys keep the transform of their own position and streaming stays exact.

Shapes: ``x`` (B, H, T, Dh); ``pos`` (T,) shared by the batch or (B, T) per row
(e.g. FAM's random position offsets), int64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionScheme(nn.Module):
    """Interface: ``query(q, pos)``, ``key(k, pos)`` and the softmax ``scale``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError


class NoPositions(PositionScheme):
    """Identity (NoPE): attention sees no explicit position."""

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        return q

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        return k


class RoPE(PositionScheme):
    """Rotary position embedding (Su et al. 2021), half-split pairing.

    Angles are computed in float64 from integer positions and then cast, so large
    absolute positions (streaming, random offsets) lose no precision before the cast.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        super().__init__(head_dim)
        self.base = base
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        ang = pos.to(torch.float64)[..., None] * self.inv_freq.to(x.device)  # (T, Dh/2) or (B, T, Dh/2)
        if ang.dim() == 3:
            ang = ang[:, None]  # (B, 1, T, Dh/2)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(q, pos)

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(k, pos)


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {"rope": RoPE, "none": NoPositions}


def make_positions(name: str, head_dim: int, rope_base: float = 10000.0) -> PositionScheme:
    """Build a position scheme by name (see ``POSITION_SCHEMES``)."""
    if name not in POSITION_SCHEMES:
        raise ValueError(f"unknown position scheme {name!r}; valid: {', '.join(sorted(POSITION_SCHEMES))}")
    cls = POSITION_SCHEMES[name]
    if cls is RoPE:
        return RoPE(head_dim, rope_base)
    return cls(head_dim)
