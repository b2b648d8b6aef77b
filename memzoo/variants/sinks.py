"""``sinks``: attention sinks, StreamingLLM (Xiao et al. 2023, arXiv 2309.17453).

A query at position ``t`` attends to the first ``S = num_sinks`` tokens of the sequence
and to the last ``W = window`` tokens up to itself (token-level; itself included)::

    S=2, W=3        keys: 0 1 2 3 4 5 6 7 8
    query 3               x x x x . . . . .     nothing evicted yet: [0, 3]
    query 5               x x . x x x . . .     sinks + window, a gap between them
    query 8               x x . . . . x x x

No new weights. Streaming state per layer: the K/V of the S sinks and a ring buffer
(:mod:`memzoo.variants.ring`) of the last ``W`` tokens after them (the next query's
window, and a slot for its own row). The sinks' keys are cached *before* RoPE (they are
rotated at whatever position each query gives them); the window's keys with RoPE at their
text positions, rotated once, when they are made: with RoPE a window key's distance to
the query is the same in both numberings (below), so a decode step rotates only its new
key and the S sinks, never the whole window.

Positions (``positions``):

* ``"cache"`` (the paper's): a query's keys are numbered by their place in *its* cache,
  not in the text: sinks ``0 … S-1``, then the window, the query last at cache position
  ``c(t) = min(t, S+W-1)``. With RoPE a window key's distance to the query is the same in
  both numberings (the window is contiguous and ends at the query); only the sinks'
  distances differ: ``c(t) - j`` instead of ``t - j``. Until the window leaves the sinks
  (``t <= S+W-1``) the cache is ``[0, t]`` and both numberings agree.
* ``"absolute"``: every key at its position in the text (what window attention with
  extra always-visible keys computes; it is not what the paper evaluates).

Two implementations of the same function live here:

* :meth:`Sinks.step` (fast): the K/V engine of :mod:`memzoo.variants.kv` with the layout
  ``BlockLayout(1, W-1, sinks=S)`` (the sinks as always-visible keys). With cache
  positions the queries past ``S+W-1`` are a second call under the same layout with
  queries and keys twice as wide: the query rotated at ``t`` and at ``c0 = S+W-1``, a
  window key at its position and zeros, a sink zeros and at its position ``j``. RoPE
  makes ``q(c0)·k_j(j)`` the score at distance ``c0 - j = c(t) - j``, the paper's, and
  ``q(t)·k(p)`` the window's; no per-query copy of the sinks is made. One token on a
  full ring (every decode step past ``S+W``) takes :meth:`Sinks.decode_step`: the ring
  then holds exactly the token's window, so plain attention over it in slot order.
* :meth:`Sinks.step_reference`: the paper's rule written per query: the visible
  positions, each numbered by its cache position (or its text position), RoPE applied
  to the pre-RoPE query and keys at those numbers, a plain softmax.

Shapes: B batch, T tokens in the call, H query heads, Hkv key/value heads, Dh head
width, Tk key rows (sinks, then the recent run). Mask polarity: True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from memzoo import ops
from memzoo.config import VariantConfig
from memzoo.layers import DecoderLayer
from memzoo.ops import BlockLayout
from memzoo.registry import register_variant
from memzoo.variants import ring
from memzoo.variants.kv import KVCacheBackbone, KVState


class SinksConfig(VariantConfig):
    num_sinks: int = Field(4, ge=0, description="S: first tokens every later query sees (paper 4); 0 = plain token window")
    window: int = Field(1020, ge=1, description="W: recent tokens each query sees, itself included (official code: 512-2000)")
    positions: Literal["cache", "absolute"] = Field(
        "cache", description="RoPE positions: inside each query's cache (the paper's) or in the text"
    )

    conformance_options = (
        {"num_sinks": 2, "window": 3},
        {"num_sinks": 1, "window": 5, "positions": "absolute"},
        {"num_sinks": 1, "window": 4},
        {"num_sinks": 2, "window": 3, "positions": "absolute"},
        {"num_sinks": 0, "window": 3},
    )


@dataclass
class SinksState(KVState):
    """Per layer, keys and values of the sinks ``[0, min(S, pos))`` followed by a ring of
    the last ``W`` positions after them: ``k[l]``, ``v[l]``: (B, Hkv, t, Dh); the sinks'
    keys before RoPE, the others with RoPE at their text positions."""


@register_variant("sinks", config=SinksConfig)
class Sinks(KVCacheBackbone):
    State = SinksState
    sinks_before_positions = True
    #: 3: the window is a ring of W rows (2: the last W-1 positions in order; 1 cached
    #: them before RoPE)
    state_format = 3

    num_sinks: int
    window: int
    positions: str

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=1, window=self.window - 1, sinks=self.num_sinks)

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        # a full ring holds exactly the query's window: plain attention, any backend
        return n_tokens == 1 and start - self.num_sinks >= self.window

    def decode_step(self, x: Tensor, state: SinksState) -> tuple[Tensor, SinksState]:
        """One token ``x`` (B, 1, D) at ``t = state.pos`` on a full ring: the ring, once the
        token's row is written, holds exactly its window ``[t-W+1, t]``, so its attention is
        plain (unmasked) attention over ``[sinks rotated, ring]`` in any order. The sinks are
        rotated at ``j + t - (S+W-1)`` (cache positions: their distance ``c(t) - j`` to the
        query at ``t``) or at ``j`` (absolute). Equals the engine's general path
        (tests/test_decode_paths.py)."""
        s, w, t = self.num_sinks, self.window, state.pos
        pos = self.token_positions(state, 1, x.device)  # (1,)
        shift = t - (s + w - 1) if self.positions == "cache" else 0
        sink_pos = torch.arange(shift, shift + s, device=x.device) if s else None
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.project(x, pos)  # (B, H, 1, Dh), (B, Hkv, 1, Dh) x2
            raw_keys = ring.write(state.k[i], k, t, capacity=w, origin=s, offset=s)  # (B, Hkv, S + W, Dh)
            values = ring.write(state.v[i], v, t, capacity=w, origin=s, offset=s)
            keys = torch.cat([layer.positions.key(raw_keys[:, :, :s], sink_pos), raw_keys[:, :, s:]], dim=2) if s else raw_keys
            heads = ops.dense(q, keys, values, scale=layer.positions.scale, backend=self.backend)
            x = layer.feed_forward(layer.attend_residual(x, heads))
            new_k.append(raw_keys)
            new_v.append(values)
        return x, SinksState(pos=t + 1, fingerprint=self.fingerprint, k=new_k, v=new_v)

    def attend(
        self, layer: DecoderLayer, q: Tensor, keys: Tensor, values: Tensor, *, layout: BlockLayout, start: int,
        rows: dict[str, Tensor], key_pos: Tensor | None = None,
    ) -> Tensor:
        """Cache positions: queries up to ``S+W-1`` are one call under the sink layout
        (nothing evicted, cache positions = text positions); later queries one call under
        the same layout with queries and keys twice as wide, so that the sinks score at the
        distance the paper's numbering gives them (below; a decode step: its one query,
        the rows in ring order)."""
        s, w = self.num_sinks, self.window
        end = start + q.shape[2]
        split = min(max(s + w, start), end)  # first query whose window has left the sinks
        if self.positions == "absolute" or not s or split == end:
            return super().attend(
                layer, q, keys, values, layout=layout, start=start, rows=rows, key_pos=key_pos
            )
        scale, parts = layer.positions.scale, []
        if split > start:  # the key rows before `split`: every row but the run's last end - split
            n_keys = keys.shape[2] - (end - split)
            parts.append(ops.attend(
                q[:, :, : split - start], keys[:, :, :n_keys], values[:, :, :n_keys], layout=layout,
                q_start=start, scale=scale, backend=self.backend,
            ))
        # Later queries: sink j must score as if rotated at j + t - (S+W-1), its distance
        # c(t) - j to the query at t. With RoPE that score, q_t(at t)·k_j(at j + t - c0), is
        # q(at c0)·k_j(at j) for c0 = S+W-1: the same query rotated at the constant c0 against
        # the sink at its own position. So one call over [sinks | run] with each query and
        # key twice as wide: the query [at t | at c0], a run key [at its position | 0], a sink
        # [0 | at j]; the dot products are exactly the two numberings' scores, with no
        # per-query copy of the sinks (T·S rotated rows were most of a T=4096 step's time).
        q_late = q[:, :, split - start :]
        q_cache = layer.positions.moved(q_late, torch.arange(s + w - 1 - split, s + w - 1 - end, -1, device=q.device))  # at c0
        dh = q.shape[-1]
        wide_keys = torch.cat([  # the sinks [0 | at j], the run [at its position | 0]
            torch.nn.functional.pad(keys[:, :, :s], (dh, 0)), torch.nn.functional.pad(keys[:, :, s:], (0, dh))
        ], dim=2)
        # eager: values zero-padded to the same width (the output's extra half is dropped):
        # fused SDPA kernels take one head width for q, k and v (on the CPU a narrower v fell
        # back to the unfused math kernel: 0.39 s against 0.27 s padded, T=2048, forward+
        # backward). Not in compiled code, where inductor writes the small calls itself
        # (a compiled leaderboard-size step: 1.21-1.29x faster than eager padded, 1.40-1.45x not)
        dv = values.shape[-1]
        pad = 0 if torch.compiler.is_compiling() else 2 * dh - dv
        wide_out = ops.attend(
            torch.cat([q_late, q_cache], dim=-1), wide_keys, torch.nn.functional.pad(values, (0, pad)) if pad else values,
            layout=layout, q_start=split, scale=scale, backend=self.backend, key_pos=key_pos,
        )
        parts.append(wide_out[..., :dv] if pad else wide_out)
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    # ------------------------------------------------------------ the reference
    def visible_positions(self, t: int) -> list[int]:
        """The text positions query ``t`` attends to, in order (the paper's cache for it)."""
        sinks = list(range(min(self.num_sinks, t + 1)))
        return sinks + [j for j in range(max(0, t - self.window + 1), t + 1) if j >= len(sinks)]

    def step_reference(self, x: Tensor, state: SinksState) -> tuple[Tensor, SinksState]:
        """Per query, slow and plain (:func:`memzoo.variants.naive.sinks_reference`)."""
        from memzoo.variants.naive import sinks_reference

        return sinks_reference(self, x, state)
