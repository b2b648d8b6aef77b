"""A shared engine for variants whose per-layer state is a window of cached keys and
values: ``full`` (keep everything), ``bswa`` (the last m blocks + the partial block),
``fam`` (BSWA's window plus per-block extra rows, its feedback memory) and ``sinks``
(the first S keys plus the last W-1).

A subclass says what a query may see (:meth:`KVCacheBackbone.layout`, whose ``sinks``
rows are never evicted) and how far back the recent run must reach
(:meth:`KVCacheBackbone.keep_from`). Per layer the engine projects the call's tokens,
appends their K/V to the cache, asks :meth:`KVCacheBackbone.extra_rows` for per-block
extra rows (the one hook for memory rows; FAM's scan lives there), attends, runs the
feed-forward and evicts what no later query can see::

    cache (sinks | run) + new K/V -> [extra rows hook] -> attend -> residual, FF -> evict

Shapes: B batch, T tokens in the call, Hkv key/value heads, t cached positions, Dh head
width, nb query blocks touched by the call, F extra rows per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from memzoo import ops
from memzoo.layers import DecoderLayer
from memzoo.ops import BlockLayout
from memzoo.state import State
from memzoo.variants.base import Backbone


@dataclass
class KVState(State):
    """Per layer, keys and values of the positions later queries can still see, in the
    order of :meth:`BlockLayout.key_positions` (the sinks, then the recent run ending at
    ``pos``): ``k[l]``, ``v[l]``: (B, Hkv, t, Dh). Keys carry their text positions (RoPE
    applied), except the sink rows of a variant that sets ``sinks_before_positions``."""

    k: list[Tensor]
    v: list[Tensor]


class KVCacheBackbone(Backbone):
    #: detach memory keys/values (keys before the query's block); a config field where a variant has it
    stop_gradient_memory: bool = False
    #: cache the layout's sink rows *before* positions are applied and rotate them at their
    #: own positions for each call (the run is cached with positions applied, at its text
    #: positions, and never rotated again): a variant that re-numbers its sinks per query
    #: (``sinks`` with cache positions) rotates the pre-RoPE sink keys itself
    sinks_before_positions: ClassVar[bool] = False

    def layout(self) -> BlockLayout:
        raise NotImplementedError

    def keep_from(self, next_pos: int) -> int:
        """The first position of the recent run a query at ``next_pos`` or later can still
        see (the layout's sinks are kept apart from it)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the cache
    def cached_positions(self, pos: int, layout: BlockLayout | None = None) -> tuple[int, int]:
        """``(s, r)``: a state at ``pos`` holds the sinks ``[0, s)`` and the run ``[r, pos)``."""
        s = (layout or self.layout()).n_sink_rows(pos)
        return s, min(pos, max(s, self.keep_from(pos), 0))

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        s, r = self.cached_positions(pos)
        kv = [(batch_size, self.n_kv_heads, s + pos - r, self.head_dim)] * self.n_layers
        return {"k": kv, "v": kv}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVState:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return self.State(pos=0, fingerprint=self.fingerprint, k=[empty] * self.n_layers, v=[empty] * self.n_layers)

    @staticmethod
    def evict(x: Tensor, end: int, kept: tuple[int, int]) -> Tensor:
        """Cache rows ``x`` (B, Hkv, n, Dh) after a call ending at ``end`` -> the rows the
        state keeps, ``kept = (s, r)`` of :meth:`cached_positions` (sinks and run)."""
        s, r = kept
        run_start = end - (x.shape[2] - s)
        drop = r - run_start
        if drop <= 0:
            return x
        if not s:
            return x[:, :, drop:]
        return torch.cat([x[:, :, :s], x[:, :, s + drop :]], dim=2)

    # ---------------------------------------------------------------------- hooks
    def extra_rows(
        self, i: int, layer: DecoderLayer, state: State, keys: Tensor, values: Tensor, start: int, end: int
    ) -> tuple[dict[str, Tensor], Any]:
        """Per-block extra rows for layer ``i``'s queries ``[start, end)`` and what the layer
        keeps for the next state (given to :meth:`next_state`, one entry per layer).

        ``keys``/``values`` (B, Hkv, Tk, Dh): the cache plus this call's K/V, the rows at
        :meth:`BlockLayout.key_positions`. Returns ``({"extra_k": (B,Hkv,nb,F,Dh),
        "extra_v": ...}, kept)``, or ``({}, None)`` for no extra rows (the default)."""
        return {}, None

    def attend(
        self, layer: DecoderLayer, q: Tensor, keys: Tensor, values: Tensor, *, layout: BlockLayout, start: int,
        raw_keys: Tensor, rows: dict[str, Tensor],
    ) -> Tensor:
        """Layer attention of queries ``q`` (B, H, T, Dh) at ``[start, start + T)`` under
        ``layout`` (this call's :meth:`layout`): (B, H, T, Dh). ``raw_keys``: the keys before
        positions for the sink rows of a variant with ``sinks_before_positions`` (the same as
        ``keys`` otherwise). Override only where one layout cannot say it."""
        memory = dict(k_mem=keys.detach(), v_mem=values.detach()) if self.stop_gradient_memory else {}
        return ops.attend(
            q, keys, values, layout=layout, q_start=start, scale=layer.positions.scale,
            backend=self.backend, **memory, **rows,
        )

    def attends_sinks_at_own_positions(self, start: int, end: int) -> bool:
        """Whether the call ``[start, end)`` attends (or hands :meth:`extra_rows`) the sink
        rows rotated at their own positions (``keys``); with False the engine skips
        rotating them and ``keys`` is ``raw_keys``. Only read with ``sinks_before_positions``."""
        return True

    def next_state(self, state: State, end: int, k: list[Tensor], v: list[Tensor], kept: list[Any]) -> State:
        """The state after a call ending at ``end`` (``kept``: what :meth:`extra_rows` kept)."""
        return self.State(pos=end, fingerprint=self.fingerprint, k=k, v=v)

    # ------------------------------------------------------------------ the engine
    def step(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        t = x.shape[1]
        start, end = state.pos, state.pos + t
        pos = self.token_positions(state, t, x.device)
        layout = self.layout()
        kept_rows = self.cached_positions(end, layout)
        raw_sinks = layout.n_sink_rows(end) if self.sinks_before_positions else 0
        new_sinks = raw_sinks - layout.n_sink_rows(start)  # this call's tokens that are sinks
        sink_pos = torch.arange(raw_sinks, device=x.device) if raw_sinks else None
        new_k, new_v, kept = [], [], []
        for i, layer in enumerate(self.layers):
            if raw_sinks:
                q, k_raw, v = layer.project_raw(x)  # (B, H, T, Dh), (B, Hkv, T, Dh) x2
                q, k = layer.positions.query_key(q, k_raw, pos)
                if new_sinks:
                    k = torch.cat([k_raw[:, :, :new_sinks], k[:, :, new_sinks:]], dim=2)
            else:
                q, k, v = layer.project(x, pos)
            # (B, Hkv, Tk, Dh): sinks, then the run to `end`, as the state keeps them
            raw_keys = torch.cat([state.k[i], k], dim=2)
            values = torch.cat([state.v[i], v], dim=2)
            keys = raw_keys
            if raw_sinks and self.attends_sinks_at_own_positions(start, end):  # the sinks at their positions 0 … s-1
                keys = torch.cat([layer.positions.key(raw_keys[:, :, :raw_sinks], sink_pos), raw_keys[:, :, raw_sinks:]], dim=2)
            rows, layer_kept = self.extra_rows(i, layer, state, keys, values, start, end)
            heads = self.attend(layer, q, keys, values, layout=layout, start=start, raw_keys=raw_keys, rows=rows)
            x = layer.feed_forward(layer.attend_residual(x, heads))
            new_k.append(self.evict(raw_keys, end, kept_rows))
            new_v.append(self.evict(values, end, kept_rows))
            kept.append(layer_kept)
        return x, self.next_state(state, end, new_k, new_v, kept)


class BlockWindowBackbone(KVCacheBackbone):
    """BSWA's window (``memory_blocks`` previous blocks in full, the own block causally),
    shared by ``bswa`` and ``fam``; both have a ``memory_blocks`` field."""

    memory_blocks: int

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=self.block_size, window=self.memory_blocks * self.block_size)

    def keep_from(self, next_pos: int) -> int:
        return (next_pos // self.block_size - self.memory_blocks) * self.block_size
