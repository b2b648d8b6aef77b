"""``rmt``: Recurrent Memory Transformer (Bulatov et al. 2022), decoder form.

The sequence is cut into segments of ``L = block_size`` tokens. Each segment runs
through the *whole* stack as ``[read memory (K), segment tokens (L), write memory (K)]``
with an ordinary causal mask over that concatenation, positions restarting at 0 in
every segment (RoPE). The last layer's outputs at the write positions become the next
segment's read memory. The first read memory and the write placeholders are learned
``K × D`` parameters. Gradients flow across segments (BPTT) unless ``bptt_segments``
truncates them::

    K=2, L=4, one segment:   r r | t t t t | w w        (causal over the 2K+L rows)
    segment τ+1 reads the last layer's outputs at w w of segment τ

Shape notation: B batch, T new tokens, K memory tokens, D model width, H heads, Dh
head width; "local" positions count from the start of the segment's concatenation.

Streaming: a token's output depends only on the read memory and earlier tokens of its
segment, so the state keeps, per layer, the keys/values of ``[read memory, tokens so
far]`` of the current segment, in buffers of ``K + L`` rows (zeros after them: one shape
from the first token on). A new token costs one row through the stack against that
cache (the segment is never recomputed); inside a segment it is written into the buffers
and attends over all of their rows at their local positions (``key_pos``). When a segment completes, the K write
placeholders run through the stack against the cache and the last layer's write
outputs become the new read memory. A whole-sequence call is parallel within each
segment and sequential across segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from memzoo import ops
from memzoo.config import MAX_POSITION, MAX_WIDTH, NOT_IN_FINGERPRINT, VariantConfig
from memzoo.ops import BlockLayout
from memzoo.registry import register_variant
from memzoo.state import State
from memzoo.variants import ring
from memzoo.variants.base import Backbone
from memzoo.variants.naive import rmt_reference  # noqa: F401  (the slow reference, kept with the others)


class RMTConfig(VariantConfig):
    num_memory_tokens: int = Field(10, ge=0, le=MAX_WIDTH, description="K: memory tokens read at the start and written at the end of every segment")
    # 0 rather than None for "never truncate": registry cards are TOML, which has no null
    bptt_segments: int = Field(
        0, ge=0, le=MAX_POSITION, description="0: backpropagate through every segment; N: detach the read memory of every N-th segment",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )

    conformance_options = (
        {"num_memory_tokens": 2},
        {"num_memory_tokens": 3, "bptt_segments": 2},
        {"num_memory_tokens": 1, "bptt_segments": 3},
        {"num_memory_tokens": 0},
    )


@dataclass
class RMTState(State):
    """``mem`` (B, K, D): the read memory of the current segment. ``k[l]``, ``v[l]``
    (B, H, K + L, Dh), empty at position 0: keys (RoPE at local positions) and values of
    the first ``c`` rows of the current segment's concatenation in rows ``0 … c-1``, zeros
    after them: ``c = K + pos % L`` inside a segment and 0 at a segment boundary (the next
    segment's rows are not computed yet). One shape from the first token on."""

    mem: Tensor
    k: list[Tensor]
    v: list[Tensor]


@register_variant("rmt", config=RMTConfig)
class RecurrentMemoryTransformer(Backbone):
    State = RMTState
    #: 2: the K/V are buffers of K + L rows, zeros past the segment's rows (1: those rows only)
    state_format = 2

    def build(self) -> None:
        num_memory_tokens = self.num_memory_tokens
        self.layers = self.make_layers()
        self.read_init: nn.Parameter | None = None
        self.write_init: nn.Parameter | None = None
        if num_memory_tokens:  # no zero-size parameters when K = 0
            self.read_init = nn.Parameter(torch.randn(num_memory_tokens, self.d_model) * 0.02)
            self.write_init = nn.Parameter(torch.randn(num_memory_tokens, self.d_model) * 0.02)

    # --------------------------------------------------------------------- pieces
    def _write_rows(self, batch: int, like: Tensor) -> Tensor:
        """The learned write placeholders for a batch: (B, K, D)."""
        assert self.write_init is not None
        return self.write_init.to(like.dtype).expand(batch, -1, -1)

    def _read_memory(self, mem: Tensor, segment: int) -> Tensor:
        """The read memory segment ``segment`` starts from, cut from the graph every
        ``bptt_segments`` segments (counted from the sequence start, so chunking does
        not move the cuts; segment 0 keeps the gradient into the learned memory)."""
        n = self.bptt_segments
        if n and segment > 0 and segment % n == 0:
            return mem.detach()
        return mem

    def _run(
        self, z: Tensor, start: int, k_cache: list[Tensor], v_cache: list[Tensor], pos: Tensor | None = None,
        in_buffer: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Rows ``z`` (B, n, D) at local positions ``[start, start+n)`` (``pos``, made here
        if not given) through the whole stack, causally over the cached rows ``[0, start)``
        and themselves. Returns the last layer's outputs (B, n, D) and per-layer
        keys/values of rows ``[0, start+n)``. With ``in_buffer`` the caches are the state's
        whole buffers (K + L rows, rows ``[0, start)`` valid): the new rows are written into
        them (in place inside ``generate``) and attention runs over the rows the queries see
        (a view), or, for one shape at every step (compiled code, ``ring.static_shapes``),
        over every row at its local position (``key_pos``: the rows after the queries
        hidden); the buffers with the new rows are returned."""
        if pos is None:
            pos = torch.arange(start, start + z.shape[1], device=z.device)
        # one shape at every step (compiled code, ring.static_shapes): every buffer row at its position
        static = in_buffer and ring.decodes_statically() and ops.takes_key_positions(self.backend)
        key_pos = torch.arange(k_cache[0].shape[2], device=z.device) if static else None
        seen = start + z.shape[1]  # the rows the queries see: [0, seen)
        new_k, new_v = [], []
        for layer, kc, vc in zip(self.layers, k_cache, v_cache):
            q, k, v = layer.project(z, pos)
            if in_buffer:  # the new rows into rows [start, start + n) of the buffers
                keys, values = ring.put(kc, k, start), ring.put(vc, v, start)
                new_k.append(keys)
                new_v.append(values)
                if not static:  # the rows the queries see, a view
                    keys, values = keys[:, :, :seen], values[:, :, :seen]
            elif start:  # rows of this segment before these, cached
                keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            else:  # a segment's first rows: nothing cached to put before them
                keys, values = k, v
            heads = ops.attend(
                q, keys, values, layout=BlockLayout(), q_start=start, scale=layer.positions.scale, backend=self.backend,
                key_pos=key_pos,
            )
            z = layer.feed_forward(layer.attend_residual(z, heads))
            if not in_buffer:
                new_k.append(keys)
                new_v.append(values)
        return z, new_k, new_v

    # ------------------------------------------------------------------ the contract
    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        rows = self.num_memory_tokens + self.block_size if pos else 0  # K + L from the first token on
        kv = [(batch_size, self.n_kv_heads, rows, self.head_dim)] * self.n_layers
        return {"mem": (batch_size, self.num_memory_tokens, self.d_model), "k": kv, "v": kv}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> RMTState:
        if self.read_init is not None:
            # clone: a state must not share storage with a parameter (an optimizer step would change it)
            mem = self.read_init.to(device=device, dtype=dtype).clone().expand(batch_size, -1, -1)
        else:
            mem = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return RMTState(pos=0, fingerprint=self.fingerprint, mem=mem, k=[empty] * self.n_layers, v=[empty] * self.n_layers)

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        # one token inside a segment (its first and last tokens run more rows: the memory)
        done = start % self.block_size
        return n_tokens == 1 and 0 < done < self.block_size - 1

    def step(self, x: Tensor, state: RMTState) -> tuple[Tensor, RMTState]:
        size, n_mem = self.block_size, self.num_memory_tokens
        pos, mem, k_cache, v_cache = state.pos, state.mem, state.k, state.v
        if self.decodes_in_ring_order(pos, x.shape[1]):  # written into the buffers, one shape at every position
            z, k_cache, v_cache = self._run(x, n_mem + pos % size, k_cache, v_cache, in_buffer=True)
            return z, RMTState(pos=pos + 1, fingerprint=self.fingerprint, mem=mem, k=k_cache, v=v_cache)
        rows_kept = n_mem + size
        # the positions 0 … 2K+L-1 of a whole segment, one tensor for every whole segment of
        # the call (RoPE computes its angles for them once: its memo keys on the tensor)
        whole = torch.arange(2 * n_mem + size, device=x.device) if x.shape[1] >= size else None
        # the call's tokens cut at the segment boundaries once: a slice per segment would make
        # backward build a zero gradient of the whole input per segment (O(segments·T) time)
        # (lengths by arithmetic, not range() over the position: compiled code would guard on
        # the position's value and recompile at every segment)
        t = x.shape[1]
        first_len = min(size - pos % size, t)  # the rest of the segment the call starts in
        rest = t - first_len
        lengths = [first_len] + [size] * (rest // size) + ([rest % size] if rest % size else [])
        outputs = []
        for piece in x.split(lengths, dim=1):  # one piece per segment touched
            done, take = pos % size, piece.shape[1]  # done: tokens of this segment already in the cache
            completes = done + take == size
            rows, first = [piece], 0  # first: index of the first token row
            start = n_mem + done if done else 0
            if done == 0:  # a fresh segment starts with its read memory (the cache is empty)
                mem = self._read_memory(mem, pos // size)
                rows, first = [mem, *rows], n_mem
            if completes and n_mem:
                rows.append(self._write_rows(x.shape[0], x))
            cached_k, cached_v = [kc[:, :, :start] for kc in k_cache], [vc[:, :, :start] for vc in v_cache]
            z, k_cache, v_cache = self._run(
                torch.cat(rows, dim=1) if len(rows) > 1 else rows[0], start, cached_k, cached_v,
                whole if done == 0 and completes else None,
            )
            outputs.append(z[:, first : first + take])
            if completes:  # new read memory; the next segment's rows are computed when it starts
                if n_mem:
                    mem = z[:, first + take :]  # the last layer's outputs at the write rows
                k_cache = [kc.new_zeros(*kc.shape[:2], rows_kept, kc.shape[3]) for kc in k_cache]
                v_cache = [vc.new_zeros(*vc.shape[:2], rows_kept, vc.shape[3]) for vc in v_cache]
            else:  # the rows so far, zeros after them
                k_cache = [F.pad(kc, (0, 0, 0, rows_kept - kc.shape[2])) for kc in k_cache]
                v_cache = [F.pad(vc, (0, 0, 0, rows_kept - vc.shape[2])) for vc in v_cache]
            pos += take
        y = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]  # one piece: no copy
        return y, RMTState(pos=pos, fingerprint=self.fingerprint, mem=mem, k=k_cache, v=v_cache)

    def carry_state(self, state: State) -> RMTState:
        """To start an unrelated sequence: keep the memory only (the read memory of the
        segment ``state`` is in), detached, at position 0 with an empty cache."""
        assert isinstance(state, RMTState)
        fresh = self.empty_state(state.batch_size, state.device, state.mem.dtype)
        return RMTState(pos=0, fingerprint=state.fingerprint, mem=state.mem.detach(), k=fresh.k, v=fresh.v)

    def init_from_embeddings(self, embed: Tensor, generator: torch.Generator) -> list[str]:
        """A pretrained model's first read memory and write placeholders: ``2K`` distinct
        real tokens' embeddings (K for ``read_init``, K for ``write_init``), so the memory
        rows enter the stack as ordinary tokens would (see
        :meth:`Backbone.sample_token_embeddings`)."""
        if self.read_init is None or self.write_init is None:
            return []
        rows = self.sample_token_embeddings(embed, 2 * self.num_memory_tokens, generator)
        with torch.no_grad():
            self.read_init.copy_(rows[: self.num_memory_tokens])
            self.write_init.copy_(rows[self.num_memory_tokens :])
        return ["read_init", "write_init"]
