"""A shared engine for variants whose per-layer state is a window of cached keys and
values: ``full`` (keep everything), ``bswa`` (the last m blocks + the partial block),
``fam`` (BSWA's window plus per-block extra rows, its feedback memory) and ``sinks``
(the first S keys plus a window of W).

A subclass says what a query may see (:meth:`KVCacheBackbone.layout`, whose ``sinks``
rows are never evicted). The cache is a ring buffer (:mod:`memzoo.variants.ring`) of the
run after the sinks, of :meth:`KVCacheBackbone.capacity` rows, the most a query may see
(window + own block; unbounded for ``full``): once full it has one shape at every
position. Per layer the engine projects the call's tokens, reads the cache in position
order and appends their K/V, asks :meth:`KVCacheBackbone.extra_rows` for per-block extra
rows (the one hook for memory rows; FAM's scan lives there), attends, runs the
feed-forward and writes the new K/V into the ring::

    cache (sinks | ring) -> in order + new K/V -> [extra rows hook] -> attend -> residual, FF -> write

A one-token call on a full ring (a decode step) writes its K/V into the ring and attends
over the rows it sees, views of the ring in position order; compiled (or inside
:func:`memzoo.ring.static_shapes`) over every row at its position (``key_pos``), the stale
rows hidden by the layout, so nothing in it changes shape from one token to the next.

Shapes: B batch, T tokens in the call, Hkv key/value heads, t cached rows, Dh head
width, nb query blocks touched by the call, F extra rows per block, S sinks, C capacity.
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
from memzoo.variants import ring
from memzoo.variants.base import Backbone


@dataclass
class KVState(State):
    """Per layer, keys and values ``k[l]``, ``v[l]``: (B, Hkv, t, Dh): the layout's sinks
    (the first ``min(S, pos)`` positions, in order), then the ring of the run after them
    (:mod:`memzoo.variants.ring`, origin S: in position order until it holds
    :meth:`KVCacheBackbone.capacity` rows, then one slot per position modulo C). Keys carry
    their text positions (RoPE applied), except the sink rows of a variant that sets
    ``sinks_before_positions``."""

    k: list[Tensor]
    v: list[Tensor]


class KVCacheBackbone(Backbone):
    #: detach memory keys/values (keys before the query's block); a config field where a variant has it
    stop_gradient_memory: bool = False
    #: cache the layout's sink rows *before* positions are applied and rotate them at their
    #: own positions for each call (the run is cached with positions applied, at its text
    #: positions, and never rotated again): a variant that re-numbers its sinks per query
    #: (``sinks`` with cache positions) also has the pre-RoPE sink keys
    sinks_before_positions: ClassVar[bool] = False
    #: 2: the run is a ring buffer of ``capacity()`` rows (1 kept exactly the positions the
    #: next query could see, in order; an unbounded cache, ``full``'s, is the same in both)
    state_format = 2

    def layout(self) -> BlockLayout:
        raise NotImplementedError

    def capacity(self) -> int | None:
        """Rows of the run the ring keeps: the most keys after the sinks a query may see
        (window + own block) for a bounded layout, so a decode step can write its own row
        before it attends; None (the cache grows) for an unbounded one."""
        layout = self.layout()
        if not layout.bounded:
            return None
        assert layout.window is not None and layout.block_size is not None
        return layout.window + layout.block_size

    @property
    def geometry(self) -> tuple[BlockLayout, int | None]:
        """``(layout(), capacity())``, worked out once (they follow from the config, which
        does not change after construction): the decode step asks for them per token."""
        kept = self.__dict__.get("_memzoo_geometry")
        if kept is None:
            kept = self.__dict__["_memzoo_geometry"] = (self.layout(), self.capacity())
        return kept

    # ------------------------------------------------------------------ the cache
    def cache_rows(self, pos: int) -> tuple[int, int]:
        """``(s, n)``: a state at ``pos`` holds ``s`` sink rows and ``n`` ring rows."""
        layout, cap = self.geometry
        return min(layout.sinks, pos), ring.size(cap, pos, layout.sinks)

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        kv = [(batch_size, self.n_kv_heads, sum(self.cache_rows(pos)), self.head_dim)] * self.n_layers
        return {"k": kv, "v": kv}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVState:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return self.State(pos=0, fingerprint=self.fingerprint, k=[empty] * self.n_layers, v=[empty] * self.n_layers)

    def cached(self, cache: Tensor, pos: int, first: int = 0) -> Tensor:
        """The rows of a cache at ``pos`` a call from ``pos`` reads, at
        :meth:`BlockLayout.key_positions`: the sinks, then the run in position order from
        ``first`` on (or from its first row held, whichever is later)."""
        layout, cap = self.geometry
        sinks = layout.sinks
        s, n = min(sinks, pos), ring.size(cap, pos, sinks)
        run = ring.read(cache, max(first, pos - n), pos, pos, capacity=cap, origin=sinks, offset=s)
        return torch.cat([cache[:, :, :s], run], dim=2) if s else run

    def written(self, cache: Tensor, rows: Tensor, start: int) -> Tensor:
        """The cache after a call from ``start``: ``cache`` with ``rows`` (B, Hkv, T, Dh), the
        K/V of positions ``[start, start + T)`` as the state keeps them, written in (the
        sinks among them after the sinks held, the others into the ring)."""
        layout, cap = self.geometry
        sinks = layout.sinks
        held = min(sinks, start)
        new_sinks = min(sinks, start + rows.shape[2]) - held
        if new_sinks:  # only while the ring is still empty: the sinks come first
            cache = torch.cat([cache, rows[:, :, :new_sinks]], dim=2)
            rows, start = rows[:, :, new_sinks:], start + new_sinks
        return ring.write(cache, rows, start, capacity=cap, origin=sinks, offset=held + new_sinks)

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        """Whether the call ``[start, start + n_tokens)`` is a decode step on a full ring (one
        token after the sinks): :meth:`decode_step`."""
        layout, cap = self.geometry
        return n_tokens == 1 and cap is not None and start - layout.sinks >= cap

    # ---------------------------------------------------------------------- hooks
    def extra_rows(
        self, i: int, layer: DecoderLayer, state: State, keys: Tensor, values: Tensor, start: int, end: int
    ) -> tuple[dict[str, Tensor], Any]:
        """Per-block extra rows for layer ``i``'s queries ``[start, end)`` and what the layer
        keeps for the next state (given to :meth:`next_state`, one entry per layer).

        ``keys``/``values`` (B, Hkv, Tk, Dh): rows of the positions ``[end - Tk, end)`` in
        order, the call's K/V among them, from the start of its first query block at the
        latest (a decode step hands the block so far; a longer call the cache and its K/V).
        Returns ``({"extra_k": (B,Hkv,nb,F,Dh), "extra_v": ...}, kept)``, or ``({}, None)``
        for no extra rows (the default)."""
        return {}, None

    def attend(
        self, layer: DecoderLayer, q: Tensor, keys: Tensor, values: Tensor, *, layout: BlockLayout, start: int,
        rows: dict[str, Tensor], key_pos: Tensor | None = None,
    ) -> Tensor:
        """Layer attention of queries ``q`` (B, H, T, Dh) at ``[start, start + T)`` under
        ``layout`` (this call's :meth:`layout`): (B, H, T, Dh); ``keys`` with positions applied
        (the sink rows of a variant with ``sinks_before_positions`` at their own positions
        too). ``key_pos``: the rows' positions when they are a ring in slot
        order (a decode step), else None (the layout's order). Override only where one
        layout cannot say it."""
        memory = dict(k_mem=keys.detach(), v_mem=values.detach()) if self.stop_gradient_memory else {}
        return ops.attend(
            q, keys, values, layout=layout, q_start=start, scale=layer.positions.scale,
            backend=self.backend, key_pos=key_pos, **memory, **rows,
        )

    def next_state(self, state: State, end: int, k: list[Tensor], v: list[Tensor], kept: list[Any]) -> State:
        """The state after a call ending at ``end`` (``kept``: what :meth:`extra_rows` kept)."""
        return self.State(pos=end, fingerprint=self.fingerprint, k=k, v=v)

    # ------------------------------------------------------------------ the engine
    def step(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        t = x.shape[1]
        start, end = state.pos, state.pos + t
        if self.decodes_in_ring_order(start, t):
            return self.decode_step(x, state)
        pos = self.token_positions(state, t, x.device)
        layout, cap = self.geometry
        raw_sinks = layout.n_sink_rows(end) if self.sinks_before_positions else 0
        new_sinks = raw_sinks - layout.n_sink_rows(start)  # this call's tokens that are sinks
        sink_pos = torch.arange(raw_sinks, device=x.device) if raw_sinks else None
        # the run the call's queries may see starts at the first query block's window
        first = 0 if not layout.bounded else (start // layout.block_size) * layout.block_size - layout.window  # type: ignore[operator]
        # rows of the cache after the call when its ring does not wrap (else -1): sinks + run from the sinks on
        kept_rows = sum(self.cache_rows(end)) if cap is None or end - layout.sinks <= cap else -1
        new_k, new_v, kept = [], [], []
        for i, layer in enumerate(self.layers):
            if raw_sinks:
                q, k_raw, v = layer.project_raw(x)  # (B, H, T, Dh), (B, Hkv, T, Dh) x2
                q, k = layer.positions.query_key(q, k_raw, pos)
                if new_sinks:
                    k = torch.cat([k_raw[:, :, :new_sinks], k[:, :, new_sinks:]], dim=2)
            else:
                q, k, v = layer.project(x, pos)
            # (B, Hkv, Tk, Dh): sinks, then the run to `end`, in position order
            raw_keys = torch.cat([self.cached(state.k[i], start, first), k], dim=2)
            values = torch.cat([self.cached(state.v[i], start, first), v], dim=2)
            keys = raw_keys
            if raw_sinks:  # the sinks at their positions 0 … s-1
                keys = torch.cat([layer.positions.key(raw_keys[:, :, :raw_sinks], sink_pos), raw_keys[:, :, raw_sinks:]], dim=2)
            rows, layer_kept = self.extra_rows(i, layer, state, keys, values, start, end)
            heads = self.attend(layer, q, keys, values, layout=layout, start=start, rows=rows)
            x = layer.feed_forward(layer.attend_residual(x, heads))
            if raw_keys.shape[2] == kept_rows:  # every row in order and no wrap: that is the new cache
                new_k.append(raw_keys)
                new_v.append(values)
            else:
                new_k.append(self.written(state.k[i], k, start))
                new_v.append(self.written(state.v[i], v, start))
            kept.append(layer_kept)
        return x, self.next_state(state, end, new_k, new_v, kept)

    def decode_step(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        """One token ``x`` (B, 1, D) on a full ring (:meth:`decodes_in_ring_order`): its K/V
        written into the ring (in place inside ``generate``), then attention over the rows
        it sees, read in position order (views of the ring; a copy where they wrap), or, for
        one shape at every step (compiled code, :func:`memzoo.ring.static_shapes`), over every
        row at its position (``key_pos``; a stale row is out of the layout's window: never
        seen). Equals :meth:`step`'s general path (tests/test_decode_paths.py)."""
        start, end = state.pos, state.pos + 1
        layout, cap = self.geometry
        assert cap is not None and layout.window is not None and layout.block_size is not None
        sinks = layout.sinks
        own = dict(capacity=cap, origin=sinks, offset=sinks)
        pos = self.token_positions(state, 1, x.device)
        block = (start // layout.block_size) * layout.block_size
        first = max(block - layout.window, end - cap)  # the oldest row the token sees
        key_pos = None
        if ring.decodes_statically() and ops.takes_key_positions(self.backend):
            run_pos = ring.positions(cap, end, x.device, origin=sinks)  # (C,)
            key_pos = torch.cat([torch.arange(sinks, device=x.device), run_pos]) if sinks else run_pos
        rotate_sinks = self.sinks_before_positions and sinks
        sink_pos = torch.arange(sinks, device=x.device) if rotate_sinks else None
        has_extra_rows = type(self).extra_rows is not KVCacheBackbone.extra_rows
        new_k, new_v, kept = [], [], []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.project(x, pos)  # past the sinks: the token's key has its position
            new_k.append(ring.write(state.k[i], k, start, **own))  # (B, Hkv, S + C, Dh)
            new_v.append(ring.write(state.v[i], v, start, **own))
            if key_pos is not None:  # every row at its position
                raw_keys, values = new_k[-1], new_v[-1]
            else:  # [sinks, the rows the token sees in order]
                raw_keys = ring.read(new_k[-1], first, end, end, **own)
                values = ring.read(new_v[-1], first, end, end, **own)
                if sinks:
                    raw_keys = torch.cat([new_k[-1][:, :, :sinks], raw_keys], dim=2)
                    values = torch.cat([new_v[-1][:, :, :sinks], values], dim=2)
            keys = raw_keys
            if rotate_sinks:
                keys = torch.cat([layer.positions.key(raw_keys[:, :, :sinks], sink_pos), raw_keys[:, :, sinks:]], dim=2)
            rows, layer_kept = {}, None
            if has_extra_rows:  # the call's block so far, in order
                rows, layer_kept = self.extra_rows(
                    i, layer, state, ring.read(new_k[-1], block, end, end, **own), ring.read(new_v[-1], block, end, end, **own),
                    start, end,
                )
            heads = self.attend(layer, q, keys, values, layout=layout, start=start, rows=rows, key_pos=key_pos)
            x = layer.feed_forward(layer.attend_residual(x, heads))
            kept.append(layer_kept)
        return x, self.next_state(state, end, new_k, new_v, kept)


class BlockWindowBackbone(KVCacheBackbone):
    """BSWA's window (``memory_blocks`` previous blocks in full, the own block causally),
    shared by ``bswa`` and ``fam``; both have a ``memory_blocks`` field. The ring holds
    ``(memory_blocks + 1)·block_size`` rows, whole blocks in whole slots."""

    memory_blocks: int

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=self.block_size, window=self.memory_blocks * self.block_size)
