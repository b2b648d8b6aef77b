"""Transformer-XL's relative positional attention (Dai et al. 2019, §3.3) as a
position scheme, so that every attention backend computes it as ordinary
dot-product attention.

Shape notation: B batch, H heads, T positions, Dh head width, R = ``rel_dim`` the
width of the sinusoidal encoding (even), F = R/2 frequencies ``ω_f = 1/10000^(2f/R)``.

The paper's score between a query at position i and a key at position j is, per head
(``W_r`` maps the encoding to the head, ``u``/``v`` are learned biases)::

    s_ij = (q_i + u)·k_j  +  (q_i + v)·(W_r R_{i-j}),      R_n = [sin(n ω), cos(n ω)]

The second term only depends on ``a_i = W_rᵀ (q_i + v)`` (width R), split into the
coefficients of the sines ``a_s`` and of the cosines ``a_c``. Because
``sin((i-j)ω) = sin(iω)cos(jω) - cos(iω)sin(jω)`` and
``cos((i-j)ω) = cos(iω)cos(jω) + sin(iω)sin(jω)``::

    a_s·sin((i-j)ω) + a_c·cos((i-j)ω)
        = cos(jω)·(a_s sin(iω) + a_c cos(iω)) + sin(jω)·(a_c sin(iω) - a_s cos(iω))

so with ::

    query(q, i) = [q + u,  a_s sin(iω) + a_c cos(iω),  a_c sin(iω) - a_s cos(iω)]   (Dh + R)
    key(k, j)   = [k,      cos(jω),                    sin(jω)]                     (Dh + R)

``query · key`` is exactly ``s_ij``. Values are untouched (width Dh), and the scale
stays ``1/sqrt(Dh)`` as in the paper. It is exact, keys keep the transform of their own
position (so cached keys and streaming work as for RoPE), and any backend that takes a
query/key width different from the value width runs it. The price is a wider query/key
(``Dh + R`` instead of ``Dh``): with R = d_model it multiplies the score cost by
``1 + R/Dh`` (5 at d_model 256 with 4 heads).

**What ``xl`` runs** is the paper's own form instead, through the attention seam's
*relative-position keys* (:class:`memzoo.ops.AttentionInputs`): the content query
``q + u`` against plain keys, plus ``(q + v)·T[i - j]`` from a per-head table of the
projected encodings ``T[d] = W_r R_d`` (:meth:`RelativePositions.distance_table`, one
row per distance a query can see), which the backend adds by distance (sdpa with XL's
relative shift, done with views). The score cost stays that of a Dh-wide head, plus one
more Dh-wide product per score. The widened ``query``/``key`` above remain as the second
exact formulation, which the tests hold the two against.

Angles are computed in float64 from integer positions and then cast.
:func:`relative_attention_reference` is the paper's formula written out with an
explicit ``(i - j)`` encoding tensor and a dense mask; the tests compare the two.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memzoo.layers.positions import POSITION_SCHEMES, PositionScheme


#: rows of :meth:`RelativePositions.distance_table` computed together
TABLE_PIECE = 64


def inverse_frequencies(rel_dim: int, base: float = 10000.0) -> Tensor:
    """``ω_f = 1 / base^(2f/R)`` for f < R/2, float64: (F,)."""
    return 1.0 / (base ** (torch.arange(0, rel_dim, 2, dtype=torch.float64) / rel_dim))


def sinusoid(pos: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """``sin(pos ω)``, ``cos(pos ω)`` in float64: (..., F) each, for integer ``pos`` (...)."""
    ang = pos.to(torch.float64)[..., None] * inv_freq.to(device=pos.device)
    return ang.sin(), ang.cos()


class RelativePositions(PositionScheme):
    """Transformer-XL relative positions (see the module docstring).

    Parameters (one set per instance, i.e. per layer when each layer builds its own):
    ``u``, ``v``: (H, Dh) the content and position biases; ``w_r``: (H, Dh, R), the
    per-head slices of XL's ``W_{k,R}``. ``n_heads=1`` shares them across heads.
    ``rel_dim`` defaults to ``n_heads * head_dim`` (the model width, as in the
    official code).
    """

    def __init__(self, head_dim: int, n_heads: int = 1, rel_dim: int | None = None, base: float = 10000.0) -> None:
        super().__init__(head_dim)
        rel_dim = n_heads * head_dim if rel_dim is None else rel_dim
        if rel_dim < 2 or rel_dim % 2:
            raise ValueError(f"rel_dim (width of the sinusoidal encoding) must be even and >= 2, got {rel_dim}")
        self.n_heads, self.rel_dim, self.base = n_heads, rel_dim, base
        self.u = nn.Parameter(torch.empty(n_heads, head_dim))
        self.v = nn.Parameter(torch.empty(n_heads, head_dim))
        self.w_r = nn.Parameter(torch.empty(n_heads, head_dim, rel_dim))
        self.register_buffer("inv_freq", inverse_frequencies(rel_dim, base), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the official code draws the biases from N(0, 0.02); W_r like an nn.Linear(R, H*Dh)
        nn.init.normal_(self.u, std=0.02)
        nn.init.normal_(self.v, std=0.02)
        bound = 1.0 / math.sqrt(self.rel_dim)
        nn.init.uniform_(self.w_r, -bound, bound)

    def _angles(self, pos: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sin, cos of ``pos`` as (T, F) or (B, 1, T, F), in ``like``'s dtype."""
        sin, cos = sinusoid(pos.to(like.device), self.inv_freq)
        if sin.dim() == 3:  # per-row positions (B, T, F)
            sin, cos = sin[:, None], cos[:, None]
        return sin.to(like.dtype), cos.to(like.dtype)

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (B, H, T, Dh + R)."""
        a = torch.einsum("bhtd,hdr->bhtr", q + self.v[:, None], self.w_r)  # (B, H, T, R)
        a_s, a_c = a.chunk(2, dim=-1)  # coefficients of R's sines and cosines, (B, H, T, F)
        sin, cos = self._angles(pos, q)
        return torch.cat([q + self.u[:, None], a_s * sin + a_c * cos, a_c * sin - a_s * cos], dim=-1)

    def query_terms(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's two query terms of ``q`` (B, H, T, Dh): the content query ``q + u``
        and the position query ``q + v`` (both (B, H, T, Dh)), for relative-position keys."""
        return q + self.u[:, None], q + self.v[:, None]

    def distance_table(self, n: int, like: Tensor, most: int | None = None) -> Tensor:
        """``T[h, d] = W_r[h] R_d`` for the distances ``d = 0 … n-1``: (H, n, Dh) in
        ``like``'s dtype and device, the relative-position keys of
        :class:`memzoo.ops.AttentionInputs` (``R_d`` built in float64, then cast).

        Under ``torch.no_grad`` (decoding) the table depends on ``W_r`` only, so it is
        kept and reused while ``W_r`` is the same tensor at the same version (an
        optimizer step, ``load_state_dict`` or ``.to()`` is noticed), grown to at least
        twice its length (at most ``most`` rows) when a longer one is asked for; not while
        ``torch.compile`` traces (the graph computes it)."""
        remember = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if remember:
            memo = self.__dict__.get("_table_memo")
            key = (self.w_r.data_ptr(), self.w_r._version, like.dtype, like.device)
            if memo is not None and memo[0] == key and memo[1].shape[1] >= n:
                return memo[1][:, :n]
            n_make = max(n, min(2 * memo[1].shape[1], most or n)) if memo is not None and memo[0] == key else n
        else:
            n_make = n
        # in pieces of a fixed number of distances, so every row is computed by the same kernel
        # whatever n (a kept, longer table is bitwise the table a fresh call makes)
        pieces = -(-n_make // TABLE_PIECE)
        sin, cos = sinusoid(torch.arange(pieces * TABLE_PIECE, device=like.device), self.inv_freq)  # (n', F) each
        encoding = torch.cat([sin, cos], dim=-1).to(like.dtype)  # R_d: (n', R)
        w = self.w_r.to(like.dtype).flatten(0, 1).T  # (R, H·Dh)
        rows = torch.cat([piece @ w for piece in encoding.split(TABLE_PIECE)])  # (n', H·Dh), one shape per matmul
        table = rows[:n_make].unflatten(1, (self.n_heads, self.head_dim)).transpose(0, 1)  # (H, n, Dh)
        if remember:
            self.__dict__["_table_memo"] = (key, table)
            return table[:, :n]
        return table

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        """(B, H, T, Dh) -> (B, H, T, Dh + R)."""
        sin, cos = self._angles(pos, k)
        shape = (*k.shape[:-1], sin.shape[-1])
        return torch.cat([k, cos.expand(shape), sin.expand(shape)], dim=-1)


# Registered from here, not listed in positions.py, so positions.py never imports this
# module back (no import cycle). make_positions("relative", head_dim) then builds one
# with shared biases across heads; variants build it with their own head count.
if "relative" in POSITION_SCHEMES:
    raise ValueError("position scheme 'relative' is already registered")
POSITION_SCHEMES["relative"] = RelativePositions


def relative_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    allowed: Tensor,
    scheme: RelativePositions,
) -> Tensor:
    """The paper's relative attention, written out: ``q`` (B,H,Tq,Dh), ``k``/``v``
    (B,H,Tk,Dh) without positions, positions ``q_pos`` (Tq,), ``k_pos`` (Tk,), and a
    boolean ``allowed`` (Tq, Tk) mask (True = may attend). Returns (B,H,Tq,Dh).

    Terms (a)+(c) are ``(q + u)·k``; terms (b)+(d) are ``(q + v)·(W_r R_{i-j})`` with
    the encoding ``R_{i-j}`` built explicitly for every (query, key) pair.
    """
    rel = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk) distances i - j
    sin, cos = sinusoid(rel, scheme.inv_freq)  # (Tq, Tk, F)
    r_enc = torch.cat([sin, cos], dim=-1).to(q.dtype)  # (Tq, Tk, R)
    r_head = torch.einsum("hdr,ijr->hijd", scheme.w_r, r_enc)  # W_r R_{i-j}: (H, Tq, Tk, Dh)
    content = (q + scheme.u[:, None]) @ k.transpose(-1, -2)  # (B, H, Tq, Tk)
    position = torch.einsum("bhid,hijd->bhij", q + scheme.v[:, None], r_head)
    scores = (content + position) * scheme.scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
