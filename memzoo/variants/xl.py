"""``xl``: Transformer-XL (Dai et al. 2019) segment recurrence with a stop-gradient memory.

A query in a segment of ``L = block_size`` tokens attends, in every layer, to the
previous ``M = memory_len`` positions' hidden states of that layer and causally to its
own segment. The memory is the *detached* layer input of earlier positions,
re-projected with the *current* K/V weights: W_k, W_v and the norm still learn from
memory keys, but no gradient flows into earlier positions::

    L=4, M=6            keys:  0 1 2 3 | 4 5 6 7 | 8 9 10 11
    query 9 (segment 2)            m m   m m m m   x x  .  .     m = detached memory

Positions: XL's relative positional attention (:mod:`memzoo.layers.relative`, the
default) or RoPE (``positions="rope"``) to hold positions fixed across variants.

Forward values do not depend on the stop-gradient, so a whole sequence is computed
layer by layer in parallel: every layer projects keys/values from its inputs twice,
normally (own-segment keys) and from the detached inputs (memory keys, handed to the
backend as ``k_mem``/``v_mem``), and one block-gathered attention call does every
segment at once (``BlockLayout(block_size=L, window=M)``).

Shape notation: B batch, T new positions, n = cached + new positions, D model width,
H heads, Dh head width.

Streaming state per layer: the layer inputs (hidden states) of the last ``M + L``
positions in a ring buffer (:mod:`memzoo.variants.ring`), which holds the memory of the
current segment, kept detached, and the current partial segment, kept with its graph (its
own later queries use it); once full it has one shape, and a decode step writes its row
and attends over the ring in slot order (keys at explicit positions). Under no_grad the
keys/values computed for a returned state are cached on the backbone (for the last
``MEMO_STATES`` states per layer, or as many as :meth:`expect_streams` was told, so
streams that take turns keep theirs) and reused by a
no-grad call on that same state while it and the weights are unchanged (see
:class:`_ProjectionMemo`), so decoding projects one row per token and layer; under
``torch.inference_mode`` every call re-projects.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from memzoo import ops
from memzoo.config import MAX_TOKENS, MAX_WIDTH, BackboneConfig, VariantConfig
from memzoo.layers import DecoderLayer, PositionScheme
from memzoo.layers.relative import RelativePositions
from memzoo.ops import BlockLayout
from memzoo.registry import register_variant
from memzoo.state import State
from memzoo.variants import ring
from memzoo.variants.base import Backbone, module_mode, module_tensors
from memzoo.variants.naive import xl_reference  # noqa: F401  (the slow reference, kept with the others)


class XLConfig(VariantConfig):
    memory_len: int = Field(512, ge=0, le=MAX_TOKENS, description="M: earlier positions (hidden states) every query sees (XL enwik8 base: 512)")
    positions: Literal["relative", "rope"] = Field(
        "relative", description="XL's relative positional attention (the paper) or RoPE"
    )
    # 0 rather than None for "the default width": registry cards are TOML, which has no null
    relative_dim: int = Field(
        0, ge=0, le=MAX_WIDTH, description="width R of the sinusoidal relative encoding (even); 0 = d_model, as in the official code"
    )

    conformance_options = (
        {"memory_len": 3},
        {"memory_len": 4},
        {"memory_len": 6, "relative_dim": 6},
        {"memory_len": 5, "positions": "rope"},
    )

    @model_validator(mode="after")
    def _even_relative_dim(self) -> "XLConfig":
        if self.relative_dim % 2:
            raise ValueError(f"relative_dim must be even (sine and cosine pairs), got {self.relative_dim}")
        return self

    def check_shared(self, shared: BackboneConfig) -> None:
        if self.positions != "relative":
            return
        if shared.resolved_kv_heads != shared.n_heads:
            raise ValueError(
                f"xl's relative positions need one K/V head per query head (n_kv_heads={shared.n_kv_heads}, "
                f"n_heads={shared.n_heads}); use positions='rope' with grouped-query attention"
            )
        if shared.rope_scaling is not None:
            raise ValueError("rope_scaling applies to RoPE; xl with positions='relative' has none (use positions='rope')")


@dataclass
class XLState(State):
    """Per layer, the layer inputs ``h[l]`` (B, t, D) of the last ``t`` positions, in a ring
    buffer of ``M + L`` rows (:mod:`memzoo.variants.ring`: in position order while it fills,
    then position ``p`` in slot ``p % (M + L)``); a query sees at most those."""

    h: list[Tensor]


@dataclass
class _ProjectionMemo:
    """Keys/values a no-grad call computed for the rows of the state tensor ``h`` it
    returned, with what they were computed from. The next no-grad call on that very
    tensor reuses them instead of re-projecting the memory, but only if nothing changed:
    the tensor (identity, in-place version, the state's position) and the parameters the keys
    depend on (identity of their storage and in-place version: ``optimizer.step()``,
    ``load_state_dict``, ``.to()``, any in-place update is noticed; a write through
    ``.data``, which bypasses version counting, is not). Holds no copy of the weights.
    Not used under ``torch.inference_mode`` (inference tensors have no version counter)."""

    h: "weakref.ref[Tensor]"
    h_version: int
    #: the state's position (the ring's order of rows follows from it)
    pos: int
    weights: tuple
    #: keys for relative-position keys (plain) or widened (see TransformerXL._relative_keys)
    plain_keys: bool
    #: (B, H, t, Dh), in the ring's order of ``h``'s rows
    k: Tensor
    v: Tensor


#: states per layer whose memory keys/values the no-grad cache keeps (the most recent),
#: unless :meth:`TransformerXL.expect_streams` asks for more
MEMO_STATES = 4


def _weights_key(layer: DecoderLayer) -> tuple:
    """What the memory's keys/values depend on, by storage and version (no copies)."""
    attn = layer.self_attn
    mods = (layer.input_layernorm, attn.k_proj, attn.v_proj, layer.positions)
    deps = (t for m in mods for t in module_tensors(m, buffers=True))
    # a LoRA adapter switched off (peft's disable_adapter) changes no tensor: its mode is in the key
    return (tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in deps), tuple(module_mode(m) for m in mods))


def _memo_allowed(*tensors: Tensor) -> bool:
    """The cache is for eager no-grad calls: not under inference mode (no version
    counters) and not while torch.compile traces (it lives outside the graph, in Python)."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the other checks
        return False
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not any(t.is_inference() for t in tensors)


@register_variant("xl", config=XLConfig)
class TransformerXL(Backbone):
    State = XLState
    #: 2: the hidden states are a ring buffer of M + L rows (1: the positions a query could see, in order)
    state_format = 2

    #: "relative" or "rope" (the config field ``positions``)
    positions: str

    def build(self) -> None:
        self.relative_width = self.relative_dim or self.d_model  # R; relative_dim=0 means d_model
        self.layers = self.make_layers()
        #: per layer, the keys/values of the last no-grad call's state (an inference cache, see step)
        self._kv_memo: dict[int, list[_ProjectionMemo]] = {}
        #: how many states per layer the memo keeps (raised by expect_streams)
        self.memo_states = MEMO_STATES

    def expect_streams(self, n: int) -> None:
        """Keep the memory keys/values of at least ``n`` states per layer: a padded batch
        decodes one state per group of rows, and with more groups than kept states each
        group's keys/values would be pushed out before its next step (every token would
        re-project the whole memory). Entries go as soon as their state is dropped."""
        self.memo_states = max(getattr(self, "memo_states", MEMO_STATES), n)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kv_memo"] = {}  # holds weak references; a cache, never saved
        return state

    def make_positions(self) -> PositionScheme:
        if self.positions == "rope":
            return super().make_positions()
        # one set of u, v, W_r per layer (the official code's untie_r=True; see docs/variants/xl.md)
        return RelativePositions(self.head_dim, self.n_heads, self.relative_width)

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=self.block_size, window=self.memory_len)

    # ------------------------------------------------------------------ the contract
    def capacity(self) -> int:
        """Rows of the hidden-state ring: the most positions a query sees (memory + own segment)."""
        return self.memory_len + self.block_size

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        return {"h": [(batch_size, ring.size(self.capacity(), pos), self.d_model)] * self.n_layers}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> XLState:
        empty = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
        return XLState(pos=0, fingerprint=self.fingerprint, h=[empty] * self.n_layers)

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        return n_tokens == 1 and start >= self.capacity()

    def step(self, x: Tensor, state: XLState) -> tuple[Tensor, XLState]:
        size, cap = self.block_size, self.capacity()
        start, end = state.pos, state.pos + x.shape[1]
        next_segment = end // size * size
        keep = end - ring.size(cap, end)  # the ring after the call holds [keep, end)
        in_ring = self.decodes_in_ring_order(start, x.shape[1])  # one token over the full ring
        key_pos = ring.positions(cap, end, x.device) if in_ring else None  # the ring's rows' positions
        q_pos = torch.arange(start, end, device=x.device) if in_ring else None  # one tensor for every layer (RoPE's memo)
        # one shape at every step (compiled code, ring.static_shapes): attention over every row at its position
        static = in_ring and ring.decodes_statically() and ops.takes_key_positions(self.backend)
        layout = self.layout()  # once per call, not per layer
        new_h = []
        relative = self._relative_keys()  # the formulation of every layer in this call
        for i, (layer, cache) in enumerate(zip(self.layers, state.h)):
            weights: tuple = ()
            memo = None
            if not torch.is_grad_enabled():
                # Inference: XL re-projects the memory with the current weights on every
                # call; when neither the state tensor nor the weights changed since the last
                # no-grad call, its keys/values are reused, so a decoded token projects one
                # row instead of up to M + L (exactly the same values).
                weights = _weights_key(layer)  # once per layer and call: it walks the parameters
                memo = self._memo_for(i, cache, start, weights, relative) if _memo_allowed(cache) else None
            if in_ring:
                kept = ring.write(cache, x, start, capacity=cap, dim=1)  # layer inputs, slot order: (B, M + L, D)
                heads, kv = self._attend_ring(layer, kept, x, start, q_pos, key_pos, memo, relative, static, layout)
                if end == next_segment:  # the segment is complete: every row is memory from now on
                    kept = kept.detach()
            else:
                h = torch.cat([ring.ordered(cache, start, capacity=cap, dim=1), x], dim=1)  # positions [a, end): (B, n, D)
                a = end - h.shape[1]
                if torch.is_grad_enabled():
                    heads, kv = self._attend(layer, h, a, start, relative), None
                else:
                    heads, (k, v) = self._attend_inference(layer, h, a, start, memo, relative)
                    kv = tuple(ring.from_ordered(t[:, :, keep - a :], end, capacity=cap) for t in (k, v))
                kept = h[:, keep - a :]
                if kept.requires_grad:
                    # positions before the next segment are only ever memory from now on: detach them
                    n_mem = max(0, next_segment - keep)
                    kept = torch.cat([kept[:, :n_mem].detach(), kept[:, n_mem:]], dim=1)
                kept = ring.from_ordered(kept, end, capacity=cap, dim=1)
            new_h.append(kept)
            if kv is not None and _memo_allowed(kept):
                self._remember(i, kept, end, *kv, weights, relative)
            x = layer.feed_forward(layer.attend_residual(x, heads))
        return x, XLState(pos=end, fingerprint=self.fingerprint, h=new_h)

    def _attend_ring(
        self, layer: DecoderLayer, h: Tensor, x: Tensor, start: int, pos: Tensor, key_pos: Tensor,
        memo: _ProjectionMemo | None, relative: bool, static: bool, layout: BlockLayout,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """One token ``x`` (B, 1, D) at ``start`` (``pos``: (1,)) over the ring ``h`` (B, M + L, D) of layer
        inputs in slot order, ``x`` written in, its rows at positions ``key_pos``: the
        per-head outputs and, without gradients, the keys/values of every row (in slot order).
        Attention runs over the rows the token sees, in order (views of the ring), or with
        ``static`` over every row at its position. Without gradients the token's row alone
        is projected when the memo holds the rest; with them, the memory rows' keys/values
        come from the detached inputs (``k_mem``)."""
        cap = h.shape[1]
        end = start + 1
        common = dict(layout=layout, q_start=start, scale=layer.positions.scale, backend=self.backend)
        seen = max(end - cap, start // self.block_size * self.block_size - self.memory_len)  # the oldest row the token sees

        def attend(q: Tensor, rel: dict[str, Tensor], *kv: Tensor) -> Tensor:
            if static:
                return ops.attend(q, *kv[:2], **dict(zip(("k_mem", "v_mem"), kv[2:])), key_pos=key_pos, **common, **rel)
            rows = [ring.read(t, seen, end, end, capacity=cap) for t in kv]  # the rows the token sees, in order
            return ops.attend(q, *rows[:2], **dict(zip(("k_mem", "v_mem"), rows[2:])), **common, **rel)

        normed_x = layer.input_layernorm(x)
        if torch.is_grad_enabled():
            q, rel = self._q(layer, normed_x, pos, cap, relative)
            k, v = self._kv(layer, layer.input_layernorm(h), key_pos, relative)
            k_mem, v_mem = self._kv(layer, layer.input_layernorm(h.detach()), key_pos, relative)
            return attend(q, rel, k, v, k_mem, v_mem), None
        if memo is None:
            q, rel = self._q(layer, normed_x, pos, cap, relative)
            k, v = self._kv(layer, layer.input_layernorm(h), key_pos, relative)
        else:  # the token's row only
            if relative:
                q, rel = self._q(layer, normed_x, pos, cap, relative)
                k_new, v_new = self._kv(layer, normed_x, pos, relative)
            else:
                q, k_new, v_new = layer.project_normed(normed_x)
                (q, k_new), rel = layer.positions.query_key(q, k_new, pos), {}
            k, v = ring.write(memo.k, k_new, start, capacity=cap), ring.write(memo.v, v_new, start, capacity=cap)
        return attend(q, rel, k, v), (k, v)

    # ------------------------------------------------------------ inference cache
    def clear_inference_cache(self) -> None:
        """Forget the cached memory keys/values (needed only after writing weights through
        ``.data``, which no version counter sees), and the relative-position tables kept
        from ``W_r`` (:meth:`RelativePositions.distance_table`)."""
        self._kv_memo.clear()
        for layer in self.layers:
            layer.positions.__dict__.pop("_table_memo", None)

    def _memo_for(self, i: int, cache: Tensor, pos: int, weights: tuple, plain: bool) -> _ProjectionMemo | None:
        for memo in self._kv_memo.get(i, ()):
            if memo.h() is cache and memo.h_version == cache._version and memo.pos == pos:
                # the same formulation (a backend may need the other) and the same weights
                return memo if memo.plain_keys == plain and memo.weights == weights else None
        return None

    def _remember(
        self, i: int, h: Tensor, pos: int, k: Tensor, v: Tensor, weights: tuple, plain: bool
    ) -> None:
        # copy the kept rows when they are a slice of more, so a long call's keys are not held alive
        k, v = (t.clone() if t._base is not None and t._base.numel() > t.numel() else t for t in (k, v))
        # the last memo_states states per layer whose tensors are still alive: streams that
        # take turns (two conversations, a validated and an unvalidated loop) each keep theirs
        memos = self._kv_memo
        # an entry for this very tensor is stale (a decode step wrote into it in place: its
        # version moved on), so it is replaced, not kept beside: in-place decoding of one
        # stream must not push the other streams' entries out
        kept = [m for m in memos.get(i, ()) if m.h() is not None and m.h() is not h]
        kept = kept[max(0, len(kept) - getattr(self, "memo_states", MEMO_STATES) + 1) :]

        def forget(ref: "weakref.ref[Tensor]", i: int = i) -> None:
            # the state tensor is gone: drop its keys/values now (they are up to twice its
            # size per entry), not when this layer next remembers a state
            memos[i] = [m for m in memos.get(i, ()) if m.h is not ref]

        memos[i] = [*kept, _ProjectionMemo(weakref.ref(h, forget), h._version, pos, weights, plain, k, v)]

    def _attend_inference(
        self, layer: DecoderLayer, h: Tensor, a: int, start: int, memo: _ProjectionMemo | None, relative: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """No-grad attention of the queries ``[start, end)`` over ``h`` (positions
        ``[a, end)``), projecting only the rows the memo does not hold. Returns the
        per-head outputs and the keys/values of every row of ``h``."""
        pos = torch.arange(a, a + h.shape[1], device=h.device)
        cap = self.capacity()
        memo_kv = None if memo is None else tuple(ring.ordered(t, start, capacity=cap) for t in (memo.k, memo.v))
        done = 0 if memo_kv is None else memo_kv[0].shape[2]  # rows [a, a + done) come from the memo
        normed = layer.input_layernorm(h[:, done:])
        if start - a == done and not relative:
            # the rows projected are exactly the queries (a decode step on the memo, or a
            # call from position 0): one Q/K/V projection, positions for both at once
            q, k, v = layer.project_normed(normed)
            (q, k), rel = layer.positions.query_key(q, k, pos[done:]), {}
        else:
            q, rel = self._q(layer, normed[:, start - a - done :], pos[start - a :], h.shape[1], relative)
            k, v = self._kv(layer, normed, pos[done:], relative)
        if memo_kv is not None:
            k, v = torch.cat([memo_kv[0], k], dim=2), torch.cat([memo_kv[1], v], dim=2)
        heads = ops.attend(
            q, k, v, layout=self.layout(), q_start=start, scale=layer.positions.scale, backend=self.backend, **rel
        )
        return heads, (k, v)

    def _q(
        self, layer: DecoderLayer, normed: Tensor, pos: Tensor, n_keys: int, relative: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Queries (B, H, n, Dh) of normed inputs, through the q_proj module (LoRA sees it),
        and, with relative positions, the relative-position keys for :func:`ops.attend`
        (the position query ``q + v`` and the table of ``W_r R_d`` for the distances the
        queries can see over ``n_keys`` keys); with RoPE, or on a backend that does not
        implement relative-position keys (the widened exact form then), none."""
        q = layer.split_heads(layer.self_attn.q_proj(normed))
        scheme = layer.positions
        if not relative:
            return scheme.query(q, pos), {}
        assert isinstance(scheme, RelativePositions)
        q, rel_q = scheme.query_terms(q)
        most = self.memory_len + self.block_size
        return q, {"rel_q": rel_q, "rel_k": scheme.distance_table(min(n_keys, most), q, most=most)}

    def _relative_keys(self) -> bool:
        """Relative positions through the seam's relative-position keys (the paper's form,
        Dh-wide scores): True unless the backend does not implement them (xformers), where
        the widened queries/keys of :class:`RelativePositions` give the same scores. Asked
        once per call (the ``relative`` argument of the helpers below)."""
        return self.positions == "relative" and ops.takes_relative_keys(self.backend)

    def _kv(self, layer: DecoderLayer, normed: Tensor, pos: Tensor, relative: bool) -> tuple[Tensor, Tensor]:
        """Keys (positions applied; relative-position keys leave them as they are) and
        values (B, Hkv, n, Dh) of normed inputs."""
        k, v = layer.project_kv_normed(normed)
        if relative:
            return k, v
        return layer.positions.key(k, pos), v

    def _attend(self, layer: DecoderLayer, h: Tensor, a: int, start: int, relative: bool) -> Tensor:
        """Attention (gradients enabled) of the queries ``[start, end)`` over layer inputs
        ``h`` of positions ``[a, end)``: per-head outputs (B, H, T, Dh).

        Keys split into three regions by the segments of the queries:
        ``[a, first)`` is memory for every query, ``[first, last)`` is memory for some
        and own segment for others, ``[last, end)`` is own segment only (``first`` /
        ``last``: start of the first / last query's segment). Memory keys come from the
        detached inputs, own-segment keys from the inputs themselves.
        """
        size = self.block_size
        end = a + h.shape[1]
        pos = torch.arange(a, end, device=h.device)
        i_first = start // size * size - a
        i_last = (end - 1) // size * size - a
        i_q = start - a
        # the detached projection changes gradients only; skip it when no key is memory
        split = self.memory_len > 0 and i_last > 0
        i_g = i_first if split else 0  # the graph projection covers [a + i_g, end)
        normed = layer.input_layernorm(h[:, i_g:])
        q, rel = self._q(layer, normed[:, i_q - i_g :], pos[i_q:], h.shape[1], relative)
        k, v = self._kv(layer, normed, pos[i_g:], relative)
        common = dict(layout=self.layout(), q_start=start, scale=layer.positions.scale, backend=self.backend, **rel)
        if not split:
            return ops.attend(q, k, v, **common)
        k_d, v_d = self._kv(layer, layer.input_layernorm(h[:, :i_last].detach()), pos[:i_last], relative)
        keys = torch.cat([k_d[:, :, :i_first], k], dim=2)
        values = torch.cat([v_d[:, :, :i_first], v], dim=2)
        k_mem = torch.cat([k_d, k[:, :, i_last - i_first :].detach()], dim=2)
        v_mem = torch.cat([v_d, v[:, :, i_last - i_first :].detach()], dim=2)
        return ops.attend(q, keys, values, k_mem=k_mem, v_mem=v_mem, **common)
