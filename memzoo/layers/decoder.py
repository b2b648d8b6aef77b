"""The pre-norm decoder layer every variant is built from, taken apart into steps.

``x -> x + Attn(Norm1(x)) -> h + FF(Norm2(h))``. Variants call the steps themselves,
because what the attention sees (memory blocks, feedback rows, memory tokens) is
what differs between them:

* :meth:`DecoderLayer.project` — norm, Q/K/V projection, positions: (B,H,T,Dh) each;
* :meth:`DecoderLayer.attend_residual` — output projection of per-head attention + residual;
* :meth:`DecoderLayer.feed_forward` — norm, MLP, residual.
"""

from __future__ import annotations

from torch import Tensor, nn

from memzoo.layers.positions import PositionScheme


class FeedForward(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, positions: PositionScheme) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.norm1 = nn.RMSNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.RMSNorm(d_model)
        self.ff = FeedForward(d_model, d_ff)
        self.positions = positions

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, Dh)"""
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def project_raw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Norm and Q/K/V projection without positions: three (B, H, T, Dh)."""
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def project(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) and positions -> q, k, v (B, H, T, Dh), positions applied."""
        q, k, v = self.project_raw(x)
        return self.positions.query(q, pos), self.positions.key(k, pos), v

    def attend_residual(self, x: Tensor, heads: Tensor) -> Tensor:
        """x (B, T, D) + out-projection of per-head attention output (B, H, T, Dh)."""
        return x + self.out(heads.transpose(1, 2).flatten(-2))

    def feed_forward(self, h: Tensor) -> Tensor:
        return h + self.ff(self.norm2(h))
