"""The pre-norm decoder layer every variant is built from, taken apart into steps.

``x -> h = x + Attn(Norm(x)) -> h + MLP(Norm(h))``. Variants call the steps themselves,
because what the attention sees (memory blocks, feedback rows, memory tokens) is
what differs between them:

* :meth:`DecoderLayer.project` — norm, Q/K/V projection, positions;
* :meth:`DecoderLayer.attend_residual` — output projection of per-head attention + residual;
* :meth:`DecoderLayer.feed_forward` — norm, MLP, residual.

Shapes: B batch, T tokens, D model width, H query heads, Hkv key/value heads (grouped
-query attention: query head ``h`` reads K/V head ``h // (H / Hkv)``, as in Hugging
Face's ``repeat_kv``), Dh head width (independent of D). ``q`` is (B, H, T, Dh); ``k``,
``v`` are (B, Hkv, T, Dh): states store K/V heads, so GQA shrinks them by H / Hkv.

Module names are Hugging Face's (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``), so a PEFT
``target_modules=["q_proj", "v_proj"]`` list written for a Llama carries over, and
every projection is called as a module (never through its ``.weight``), so anything
that wraps an ``nn.Linear`` (LoRA) is seen by every variant.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from memzoo.layers.positions import PositionScheme

MLPKind = Literal["gelu", "swiglu", "geglu_tanh"]
MLP_KINDS: tuple[str, ...] = ("gelu", "swiglu", "geglu_tanh")


class MLP(nn.Module):
    """The feed-forward block.

    * ``gelu``: ``down(gelu(up(x)))`` (memzoo's own preset, GPT-style; exact erf GELU);
    * ``swiglu``: ``down(silu(gate(x)) * up(x))`` (Llama, Mistral, Qwen2, SmolLM);
    * ``geglu_tanh``: ``down(gelu_tanh(gate(x)) * up(x))`` (Gemma's gated tanh-GELU).
    """

    def __init__(self, d_model: int, d_ff: int, kind: MLPKind = "gelu", bias: bool = True) -> None:
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown MLP kind {kind!r}; valid: {', '.join(MLP_KINDS)}")
        self.kind = kind
        if kind != "gelu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu":
            return self.down_proj(F.gelu(self.up_proj(x)))
        act = F.silu if self.kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """The attention projections of a layer (what a variant attends with is its own)."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qkv_bias: bool = False, out_bias: bool = False
    ) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        positions: PositionScheme,
        *,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        mlp: MLPKind = "gelu",
        mlp_bias: bool = True,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}), or give head_dim")
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.input_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.self_attn = Attention(d_model, n_heads, n_kv_heads, head_dim, qkv_bias, out_bias)
        self.post_attention_layernorm = nn.RMSNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, d_ff, mlp, mlp_bias)
        self.positions = positions

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, T, n·Dh) -> (B, n, T, Dh) for any head count n."""
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def project_raw(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Norm and Q/K/V projection without positions: q (B, H, T, Dh), k, v (B, Hkv, T, Dh)."""
        h = self.input_layernorm(x)
        return self.project_normed(h)

    def _row_heads(self, x: Tensor, b: int, t: int) -> Tensor:
        """(B·T, n·Dh) rows -> (B, n, T, Dh)."""
        return x.view(b, t, x.shape[-1] // self.head_dim, self.head_dim).transpose(1, 2)

    def project_normed(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q/K/V of already normed inputs ``h`` (B, T, D), no positions.

        The projections run on (B·T, D) rows: a 3-D input costs each ``nn.Linear`` a view
        before and after its matmul, forward and backward (per-op overhead is what a small
        model's step is made of); the matmuls are the same."""
        attn = self.self_attn
        b, t = h.shape[:2]
        rows = h.reshape(b * t, h.shape[-1])
        return self._row_heads(attn.q_proj(rows), b, t), self._row_heads(attn.k_proj(rows), b, t), self._row_heads(attn.v_proj(rows), b, t)

    def project_kv_normed(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """K/V only (B, Hkv, T, Dh) of normed inputs, no positions (memory re-projection)."""
        attn = self.self_attn
        b, t = h.shape[:2]
        rows = h.reshape(b * t, h.shape[-1])
        return self._row_heads(attn.k_proj(rows), b, t), self._row_heads(attn.v_proj(rows), b, t)

    def project(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) and positions -> q (B, H, T, Dh), k, v (B, Hkv, T, Dh), positions applied."""
        q, k, v = self.project_raw(x)
        q, k = self.positions.query_key(q, k, pos)
        return q, k, v

    def attend_residual(self, x: Tensor, heads: Tensor) -> Tensor:
        """x (B, T, D) + out-projection of per-head attention output (B, H, T, Dh) (on rows,
        as in :meth:`project_normed`)."""
        b, n, t, dh = heads.shape
        return x + self.self_attn.o_proj(heads.transpose(1, 2).reshape(b * t, n * dh)).view(x.shape)

    def feed_forward(self, h: Tensor) -> Tensor:
        """h (B, T, D) + MLP(Norm(h)) (the MLP on rows, as in :meth:`project_normed`)."""
        return h + self.mlp(self.post_attention_layernorm(h).flatten(0, -2)).view(h.shape)
