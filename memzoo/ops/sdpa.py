"""Block-gathered ``scaled_dot_product_attention``: the default fast path.

For a bounded layout (block size ``L``, window ``W``) the queries are cut into their
blocks, and each block gets its own small key set ``[extra rows (F), memory (W), own
block (L)]``; one batched SDPA call then does all blocks at once::

    q      (B, H, nb, L, D)
    keys   (B, H, nb, F + W + L, D)     memory part is an unfold (view) of the keys
    mask   (nb, L, F + W + L)           own block causal; padding masked

Score entries: ``nb·L·(F+W+L)`` instead of ``T·(T+F)`` for a dense mask. The first and
last blocks of a call may be partial: they are padded with zeros and masked, and
padding query rows (whose outputs are dropped) see every key so no row is empty.
Sinks (``layout.sinks``: the first key rows, positions ``0 … s-1``) are ``s`` more key
columns of every block, ``[extra rows (F), sinks (s), memory (W), own block (L)]``, each
visible to the queries at or after it; a sink that is memory for a block (before its
start) comes from ``k_mem`` there. With ``block_size=1`` (token windows: every query is its own block) gathering per
block would copy ``F+s+W+1`` key rows per query: a short call is one SDPA call over the call's keys with the layout's mask
(no copies), a long one is cut into chunks of queries, each over the keys its queries can see (:meth:`SDPABackend._token_chunks`).
Unbounded layouts (``full``) use one causal SDPA call (lower-right aligned; on CUDA through ``causal_lower_right`` rather
than a mask tensor when ``Tq != Tk``).

On CUDA, blocks whose whole key window exists (``b·L - W >= k_start``: no zero-padded
memory keys) need no explicit mask: their mask *is* the bottom-right causal one
(extra rows and memory fully visible, own block causal, trailing padding rows dropped),
so they go through ``torch.nn.attention.bias.causal_lower_right``, which reaches the
flash kernel; only the first few blocks of a call (at most ``ceil(W/L)+1``) keep the
explicit mask. ``is_causal=True`` would be top-left aligned when ``L != F+W+L``, which
is wrong here. On CPU one masked call does all blocks (as before). Not under torch.compile,
which cannot construct that bias: compiled code always takes the explicit masks.

Traced by torch.compile, a small call (at most :data:`COMPILED_MATH_MAX_SCORES` scores per
batch row and head, no memory tensors or relative-position keys) is one masked call in plain
tensor ops instead (:func:`math_sdpa`), which inductor fuses with the code around it.

Keys at explicit positions (``key_pos``: a ring buffer in slot order) are one SDPA call
over the rows with the layout's mask by position; for one query (a decode step) the mask
is an additive row made once per step and shared by the layers (:func:`decode_mask`).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from memzoo._memo import TensorMemo
from memzoo.ops.base import FLOATS, NON_FINITE, AttentionInputs, Backend, Support, mark_non_finite, register_backend, zero_non_finite
from memzoo.ops.layout import BlockLayout


def span(x: Tensor, x_start: int, lo: int, hi: int) -> Tensor:
    """``x`` (B,H,T,D) covers positions ``[x_start, x_start+T)``; return positions
    ``[lo, hi)``, zero-padded where ``x`` has nothing."""
    x_end = x_start + x.shape[2]
    a = min(max(lo, x_start), hi)  # x may start after hi (a run after sinks)
    b = max(min(hi, x_end), a)
    core = x[:, :, a - x_start : b - x_start]
    return F.pad(core, (0, 0, a - lo, hi - b))


def gather_blocks(
    x: Tensor, x_start: int, first_block: int, n_blocks: int, block_size: int, window: int
) -> Tensor:
    """Per query block, the ``window`` positions before its start: (B,H,nb,W,D)."""
    lo = first_block * block_size - window
    hi = (first_block + n_blocks - 1) * block_size
    padded = span(x, x_start, lo, hi)  # (B, H, (nb-1)*L + W, D)
    return padded.unfold(2, window, block_size).transpose(-1, -2)


def block_mask(
    layout: BlockLayout, q_start: int, n_queries: int, k_start: int, n_extra: int, device: torch.device, n_sinks: int = 0
) -> Tensor:
    """Boolean (nb, L, F + s + W + L) mask for keys ``[extra, sinks, gathered memory, own
    block]``; ``k_start`` is the first position of the run (after the sinks). True = may attend."""
    size, window = layout.block_size, layout.window
    assert size is not None and window is not None
    end = q_start + n_queries
    b0 = q_start // size
    nb = layout.n_query_blocks(q_start, n_queries)
    starts = (b0 + torch.arange(nb, device=device)) * size  # (nb,)
    q_pos = starts[:, None] + torch.arange(size, device=device)  # (nb, L)
    mem_pos = starts[:, None] - window + torch.arange(window, device=device)  # (nb, W)
    own = (q_pos[:, None, :] <= q_pos[:, :, None]) & (q_pos[:, None, :] >= k_start)  # (nb, L, L)
    mem = (mem_pos >= k_start)[:, None, :].expand(nb, size, window)
    extra = torch.ones(nb, size, n_extra, dtype=torch.bool, device=device)
    sinks = torch.arange(n_sinks, device=device) <= q_pos[:, :, None]  # (nb, L, s): sink i at position i
    mask = torch.cat([extra, sinks, mem, own], dim=-1)
    padding_rows = (q_pos < q_start) | (q_pos >= end)  # (nb, L)
    return mask | padding_rows[:, :, None]


def sink_blocks(sinks: tuple[Tensor, ...], starts: Tensor) -> tuple[Tensor, Tensor]:
    """The sink keys/values each query block sees: (B,H,nb,s,D). ``sinks`` is ``(k, v)`` or
    ``(k, v, k_mem, v_mem)`` of the sink rows; with memory tensors a sink before the
    block's start (``starts``, (nb,)) is memory and comes from ``k_mem``/``v_mem``."""
    k, v = sinks[0][:, :, None], sinks[1][:, :, None]  # (B, H, 1, s, D)
    nb, n = starts.shape[0], k.shape[3]
    if len(sinks) == 2:
        return k.expand(-1, -1, nb, -1, -1), v.expand(-1, -1, nb, -1, -1)
    memory = (torch.arange(n, device=starts.device)[None, :] < starts[:, None])[:, :, None]  # (nb, s, 1)
    return torch.where(memory, sinks[2][:, :, None], k), torch.where(memory, sinks[3][:, :, None], v)


#: the last few decode masks (:func:`decode_mask`): the layers of a decode step attend with
#: one ``key_pos`` tensor, so the mask is made once per step, not once per layer
_DECODE_MASKS = TensorMemo(8)


def decode_mask(layout: BlockLayout, q: int, key_pos: Tensor, n_extra: int, dtype: torch.dtype) -> Tensor:
    """(1, n_extra + Tk) additive mask (0 where visible, -inf elsewhere) of one query at
    position ``q`` over ``n_extra`` extra rows (its own: visible) and keys at ``key_pos``.
    Kept for that very ``key_pos`` tensor (identity and in-place version), in eager code."""
    key = None
    if not torch.compiler.is_compiling() and not key_pos.is_inference():
        key = (id(key_pos), layout, q, n_extra, dtype)  # id(key_pos) is not reused while the entry holds it
        hit = _DECODE_MASKS.lookup(key, key_pos)
        if hit is not None:
            return hit[0]
    hidden = ~layout.visible_to(q, key_pos)
    mask = torch.zeros(n_extra + hidden.shape[0], dtype=dtype, device=key_pos.device)
    mask[n_extra:].masked_fill_(hidden, float("-inf"))
    mask = mask[None, :]
    if key is not None:
        _DECODE_MASKS.keep(key, key_pos, mask)
    return mask


def _joined(parts: list[Tensor], dim: int = 2) -> Tensor:
    """``torch.cat(parts, dim)``, without the copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def full_history_from(layout: BlockLayout, q_start: int, k_start: int) -> int:
    """Index (within the call) of the first query block whose ``W`` memory keys all lie
    at or after ``k_start``; from there on the block mask is bottom-right causal."""
    size, window = layout.block_size, layout.window
    assert size is not None and window is not None
    b0 = q_start // size
    first_full = -(-(k_start + window) // size)  # ceil((k_start + W) / L)
    return max(0, first_full - b0)


def lower_right_sdpa(qb: Tensor, kb: Tensor, vb: Tensor, scale: float) -> Tensor:
    """(B,H,n,L,D) queries over (B,H,n,S,D) keys, bottom-right causal per block, no mask tensor."""
    from torch.nn.attention.bias import causal_lower_right

    h, n, size = qb.shape[1:4]
    s = kb.shape[3]
    out = F.scaled_dot_product_attention(
        qb.flatten(1, 2), kb.flatten(1, 2), vb.flatten(1, 2), attn_mask=causal_lower_right(size, s), scale=scale
    )  # (B, H*n, L, Dv)
    return out.unflatten(1, (h, n))


def masked_block_sdpa(qb: Tensor, kb: Tensor, vb: Tensor, mask: Tensor, scale: float) -> Tensor:
    """(B,H,nb,L,D) queries over (B,H,nb,S,D) keys with a (nb, L, S) mask.

    Batch and heads are folded into one dimension and the blocks take the place of
    heads, so the call is 4-D with a mask broadcast over the batch: that reaches the
    fused CPU kernel, where 5-D inputs fall back to the unfused math path (measured in
    torch 2.13 at B=2, H=8, nb=16, L=256, S=512: forward+backward ~1.4 s vs 4-18 s)."""
    b, h = qb.shape[:2]
    out = F.scaled_dot_product_attention(
        qb.flatten(0, 1), kb.flatten(0, 1), vb.flatten(0, 1), attn_mask=mask[None], scale=scale
    )  # (B*H, nb, L, Dv)
    return out.unflatten(0, (b, h))


#: a compiled call with at most this many scores per (batch row, head), ``Tq`` x every key
#: column, runs as one masked call in plain tensor ops (:func:`math_sdpa`): at the
#: leaderboard's sizes inductor fuses those into a few kernels, where the SDPA kernel and
#: the block gathering stay separate calls (a compiled bswa training step at d64, T=64:
#: 1.29x -> 1.46x faster than eager; docs/benchmarks.md)
COMPILED_MATH_MAX_SCORES = 128 * 128


def math_sdpa(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None, *, isolate: bool = True
) -> Tensor:
    """``softmax(q·kᵀ·scale + mask)·v`` in plain tensor ops, as ``F.scaled_dot_product_attention``
    defines it (a boolean mask: True = may attend; a float mask, 0 or -inf, is added), the
    softmax in at least float32. Every row must see a key (the callers' masks let a query see
    itself).

    ``isolate``: the dispatcher's non-finite isolation (``memzoo.ops._attend_non_finite``),
    done here so that inductor fuses it with the call: the keys and values go in with their
    non-finite entries zeroed (a hidden score is also masked), then every output column
    ``d`` of a query that sees a non-finite key (every column) or a value with a non-finite
    entry in column ``d`` is set to NaN (what plain attention would make non-finite). Both
    steps pass the gradient through (:func:`memzoo.ops.base.zero_non_finite`), so the
    gradients are those of the zeroed call, as eagerly: a non-finite key, seen or hidden,
    cannot turn a gradient NaN through ``0 · NaN`` in the backward. Without it the tensors go
    in as they are (plain attention: :func:`memzoo.ops.propagate_non_finite`, and the calls
    the dispatcher does not isolate)."""
    if isolate:
        bad = ~torch.isfinite(v) | ~torch.isfinite(k).all(-1, keepdim=True)  # (…, Tk, Dv): a bad key row, every column
        k, v = zero_non_finite(k), zero_non_finite(v)  # gradient passed through (see there)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    seen = None
    if attn_mask is not None:
        seen = attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0
        scores = scores.masked_fill(~seen, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float64 if scores.dtype == torch.float64 else torch.float32).to(v.dtype)
    out = probs @ v
    if not isolate:
        return out
    # (…, Tq, Dv): True where a row the query sees is bad in that column (no mask: every row)
    reached = bad.any(-2, keepdim=True) if seen is None else (seen.to(v.dtype) @ bad.to(v.dtype)) > 0
    return mark_non_finite(out, reached)  # gradient passed through, as zero_non_finite's


def _isolates_itself(inputs: AttentionInputs) -> bool:
    """Whether :func:`math_sdpa` runs the non-finite isolation for the dispatcher: a small
    compiled call (:func:`_small_compiled`) that the dispatcher would isolate. Not a
    one-query call over keys at explicit positions (a decode step over a ring): for it the
    dispatcher zeroes the rows the query may not see, and the rows it sees go in as plain
    attention's, as eagerly. Not a query that sees every key either (nothing hidden: plain
    attention, as eagerly)."""
    return _small_compiled(inputs) and not inputs.ring_step() and not inputs.nothing_hidden()


def _small_compiled(inputs: AttentionInputs) -> bool:
    """A call :class:`SDPABackend` runs in plain tensor ops (:func:`math_sdpa`): while
    torch.compile traces, without relative-position keys or memory tensors, at most
    :data:`COMPILED_MATH_MAX_SCORES` scores per batch row and head. (With memory tensors
    the one call would score every key twice, from ``k`` and from ``k_mem``: a compiled
    ``xl`` step with RoPE fell from 1.26x to 1.05x faster than eager that way.)"""
    if not torch.compiler.is_compiling() or inputs.rel_q is not None or inputs.k_mem is not None:
        return False
    extra_k = inputs.extra_k
    columns = inputs.k.shape[2] + (0 if extra_k is None else extra_k.shape[2] * extra_k.shape[3])
    return inputs.q.shape[2] * columns <= COMPILED_MATH_MAX_SCORES


@register_backend
class SDPABackend(Backend):
    name = "sdpa"
    priority = 10
    support = Support(
        dtypes={"*": FLOATS},
        training=frozenset({"*"}),
        unbounded_with_memory=False,
        relative_keys=True,
        key_positions=True,
    )
    #: device types where full-history blocks use ``causal_lower_right`` instead of a mask
    #: (the flash kernel exists there); tests add "cpu" to check the split on CPU
    lower_right_devices: frozenset[str] = frozenset({"cuda"})

    def handles_non_finite(self, inputs: AttentionInputs) -> bool:
        return _isolates_itself(inputs)  # math_sdpa isolates as the dispatcher would

    def _lower_right(self, q: Tensor) -> bool:
        """Use ``causal_lower_right`` for ``q``'s device. Not while torch.compile traces:
        Dynamo cannot construct that bias (a tensor subclass; "Calling subclass default
        constructor with more than tensor argument", torch 2.11-2.13), so a compiled step
        takes the explicit mask, and inductor picks the kernel."""
        return q.device.type in self.lower_right_devices and not torch.compiler.is_compiling()

    def attend(self, inputs: AttentionInputs) -> Tensor:
        if inputs.rel_q is not None:
            return self._relative(inputs)
        q, k, v, layout, q_start, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start, inputs.scale
        k_mem, v_mem, extra_k, extra_v = inputs.k_mem, inputs.v_mem, inputs.extra_k, inputs.extra_v
        if _small_compiled(inputs):  # one masked call in plain ops, which inductor fuses
            isolate = NON_FINITE.isolate and _isolates_itself(inputs)
            return self._masked_call(
                q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, None, inputs.key_pos,
                attention=functools.partial(math_sdpa, isolate=isolate),
            )
        if inputs.key_pos is not None:  # keys in any order (a ring buffer): one masked call by position
            return self._masked_call(q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, None, inputs.key_pos)
        tq, tk = q.shape[2], k.shape[2]
        end = q_start + tq
        if k_mem is None and layout.one_query_sees_every_key(q_start, tq, tk):
            # a decode step whose cache holds exactly its window: plain attention over
            # [extra rows, keys], no gather and no mask
            if extra_k is not None:
                assert extra_v is not None
                k, v = torch.cat([extra_k[:, :, 0], k], dim=2), torch.cat([extra_v[:, :, 0], v], dim=2)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        n_sinks = layout.n_sink_rows(end)
        if not layout.bounded:
            if extra_k is not None or k_mem is not None:
                raise ValueError("sdpa: unbounded layout takes no memory tensors or extra rows")
            if n_sinks and layout.run_start(end, tk) > n_sinks:  # a gap between sinks and run: mask by position
                q_pos = torch.arange(q_start, end, device=q.device)
                mask = layout.key_positions(end, tk, q.device)[None, :] <= q_pos[:, None]
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            k_start = end - tk
            if tq == tk:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            if self._lower_right(q):
                from torch.nn.attention.bias import causal_lower_right

                return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(tq, tk), scale=scale)
            q_pos = torch.arange(q_start, end, device=q.device)
            k_pos = torch.arange(k_start, end, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

        size, window = layout.block_size, layout.window
        assert size is not None and window is not None
        sinks = None
        if n_sinks:
            layout.run_start(end, tk)  # checks the key count
            sinks = (k[:, :, :n_sinks], v[:, :, :n_sinks], *(() if k_mem is None else (k_mem[:, :, :n_sinks], v_mem[:, :, :n_sinks])))
            k, v = k[:, :, n_sinks:], v[:, :, n_sinks:]
            if k_mem is not None:
                k_mem, v_mem = k_mem[:, :, n_sinks:], v_mem[:, :, n_sinks:]
        k_start = end - k.shape[2]  # the run's first position
        layout = layout.clipped_to_keys(q_start, tq, k_start)  # work sized by the keys that exist, not the window
        window = layout.window
        assert window is not None
        b, h = q.shape[:2]
        b0 = q_start // size
        nb = layout.n_query_blocks(q_start, tq)
        if size == 1 and nb > 1:  # token windows: gathering would copy F+s+W rows per query
            return self._masked_call(q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, sinks)
        if nb == 1:
            return self._one_block(q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, sinks)
        lo, hi = b0 * size, (b0 + nb) * size

        qb = span(q, q_start, lo, hi).unflatten(2, (nb, size))  # (B,H,nb,L,D)
        keys = [span(k, k_start, lo, hi).unflatten(2, (nb, size))]  # own block
        values = [span(v, k_start, lo, hi).unflatten(2, (nb, size))]
        if window > 0:
            km = k if k_mem is None else k_mem
            vm = v if v_mem is None else v_mem
            keys.insert(0, gather_blocks(km, k_start, b0, nb, size, window))
            values.insert(0, gather_blocks(vm, k_start, b0, nb, size, window))
        if sinks is not None:
            starts = (b0 + torch.arange(nb, device=q.device)) * size
            sink_k, sink_v = sink_blocks(sinks, starts)
            keys.insert(0, sink_k)
            values.insert(0, sink_v)
        n_extra = 0
        if extra_k is not None:
            assert extra_v is not None
            n_extra = extra_k.shape[3]
            keys.insert(0, extra_k)
            values.insert(0, extra_v)
        kb = torch.cat(keys, dim=3) if len(keys) > 1 else keys[0]
        vb = torch.cat(values, dim=3) if len(values) > 1 else values[0]
        mask = block_mask(layout, q_start, tq, k_start, n_extra, q.device, n_sinks)
        split = full_history_from(layout, q_start, k_start) if self._lower_right(q) else nb
        if split >= nb:
            out = masked_block_sdpa(qb, kb, vb, mask, scale)  # (B,H,nb,L,Dv)
        else:
            parts = []
            if split > 0:
                parts.append(masked_block_sdpa(qb[:, :, :split], kb[:, :, :split], vb[:, :, :split], mask[:split], scale))
            parts.append(lower_right_sdpa(qb[:, :, split:], kb[:, :, split:], vb[:, :, split:], scale))
            out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        out = out.flatten(2, 3)
        return out[:, :, q_start - lo : q_start - lo + tq]

    @staticmethod
    def _masked_call(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: BlockLayout,
        q_start: int,
        scale: float,
        k_mem: Tensor | None,
        v_mem: Tensor | None,
        extra_k: Tensor | None,
        extra_v: Tensor | None,
        sinks: tuple[Tensor, ...] | None,
        key_pos: Tensor | None = None,
        attention: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """One SDPA call over all the call's keys ``[extra rows (nb·F) | sinks | run (| run's
        k_mem copy)]`` with the layout's (Tq, ·) mask: for short ``block_size=1`` calls
        (token windows, one query per block), where block-gathering would copy ``F+s+W+1``
        key rows per query (no row is copied here; a long call is cut into chunks,
        :meth:`_token_chunks`), for small compiled calls, and for keys at explicit positions (``key_pos``: the rows in any order, no
        sinks split off). ``k``/``v`` (and ``k_mem``) are the run, ``sinks`` the sink rows
        split off by the caller (or None: the sink rows are ``k``'s first, by the layout).
        ``attention``: the call itself (default ``F.scaled_dot_product_attention``); given
        (:func:`math_sdpa`, small compiled calls), the call is never cut into chunks."""
        tq = q.shape[2]
        call = F.scaled_dot_product_attention if attention is None else attention
        end = q_start + tq
        dev = q.device
        if key_pos is None and layout.block_size == 1 and attention is None:
            window = layout.window
            assert window is not None
            f = 0 if extra_k is None else extra_k.shape[3]
            n_sinks = 0 if sinks is None else sinks[0].shape[2]
            c = max(1, (window + 1) // max(f, 2))
            # chunks only where they save well over their gathering: one call's key columns
            # against 4x a chunk's (short calls stay one call)
            if tq > c and tq * f + n_sinks + k.shape[2] > 4 * (c * f + n_sinks + window + c):
                return SDPABackend._token_chunks(q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, sinks, c)
        if sinks is not None:
            k, v = torch.cat([sinks[0], k], dim=2), torch.cat([sinks[1], v], dim=2)
            if k_mem is not None:
                k_mem, v_mem = torch.cat([sinks[2], k_mem], dim=2), torch.cat([sinks[3], v_mem], dim=2)
        if key_pos is not None and tq == 1 and k_mem is None:  # a decode step over a ring buffer
            n_extra = 0 if extra_k is None else extra_k.shape[2] * extra_k.shape[3]
            mask = decode_mask(layout, q_start, key_pos, n_extra, q.dtype)
            if extra_k is not None:
                assert extra_v is not None
                k, v = torch.cat([extra_k.flatten(2, 3), k], dim=2), torch.cat([extra_v.flatten(2, 3), v], dim=2)
            return call(q, k, v, attn_mask=mask, scale=scale)
        k_pos = layout.key_positions(end, k.shape[2], dev) if key_pos is None else key_pos
        q_pos = None if tq == 1 else torch.arange(q_start, end, device=dev)
        if q_pos is None:  # one query: the window's bounds in Python
            visible = layout.visible_to(q_start, k_pos)[None, :]
        else:
            visible = layout.visible(q_pos[:, None], k_pos[None, :])  # (Tq, Tk); every query sees itself
        keys, values, masks = [k], [v], [visible]
        if k_mem is not None:
            assert v_mem is not None
            memory = layout.is_memory(torch.arange(q_start, end, device=dev)[:, None], k_pos[None, :])
            keys.append(k_mem)
            values.append(v_mem)
            masks = [visible & ~memory, visible & memory]  # each position from k or from k_mem, never both
        if extra_k is not None:
            assert extra_v is not None
            nb, f = extra_k.shape[2:4]
            keys.insert(0, extra_k.flatten(2, 3))  # (B, H, nb·F, D): block j's rows are j·F .. j·F+F-1
            values.insert(0, extra_v.flatten(2, 3))
            if q_pos is None:  # one query, one block: all of its rows
                masks.insert(0, torch.ones(1, nb * f, dtype=torch.bool, device=dev))
            else:
                q_block = layout.block_start(q_pos) // (layout.block_size or 1)
                masks.insert(0, (torch.arange(nb * f, device=dev) // f)[None, :] == (q_block - q_block[0])[:, None])
        return call(q, _joined(keys), _joined(values), attn_mask=_joined(masks, dim=1), scale=scale)

    @staticmethod
    def _token_chunks(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: BlockLayout,
        q_start: int,
        scale: float,
        k_mem: Tensor | None,
        v_mem: Tensor | None,
        extra_k: Tensor | None,
        extra_v: Tensor | None,
        sinks: tuple[Tensor, ...] | None,
        c: int,
    ) -> Tensor:
        """``block_size=1`` (token windows): one call over all the keys would cost
        ``Tq·(Tq·F + s + Tk)`` score entries for ``F`` extra rows per query and ``s``
        sinks, quadratic in ``Tq`` even with neither. Instead the queries are cut into
        chunks of ``c`` (about ``(W+1)/F``; ``(W+1)/2`` for ``F <= 1``), each over its
        own ``c·F`` extra rows, the sinks and the ``W + c`` run positions its queries can
        see (gathered like blocks, one batched SDPA call; two when the first chunks'
        windows start before the first key): about ``Tq·(W + c·(F+1) + s)`` score entries
        whatever ``Tq``."""
        window = layout.window
        assert window is not None
        tq = q.shape[2]
        f = 0 if extra_k is None else extra_k.shape[3]
        end = q_start + tq
        k_start = end - k.shape[2]
        dev = q.device
        nc = -(-tq // c)
        span_len = window + c
        lo, hi = q_start, q_start + nc * c
        qb = span(q, q_start, lo, hi).unflatten(2, (nc, c))  # (B,H,nc,c,D)
        b, h = q.shape[:2]

        def rows(x: Tensor) -> Tensor:  # (B,H,Tq,F,X) -> (B,H,nc,c·F,X)
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nc * c - tq))
            return x.unflatten(2, (nc, c)).flatten(3, 4)

        def gathered(x: Tensor) -> Tensor:  # run positions [p - W, p + c) per chunk: (B,H,nc,W+c,X)
            padded = span(x, k_start, lo - window, hi)
            return padded.unfold(2, span_len, c).transpose(-1, -2)

        def every_chunk(x: Tensor) -> Tensor:  # sink rows (B,H,s,X), seen from every chunk: (B,H,nc,s,X)
            return x[:, :, None].expand(b, h, nc, *x.shape[2:])

        sink_pos = torch.arange(0 if sinks is None else sinks[0].shape[2], device=dev)
        extra = (torch.arange(c * f, device=dev) // f)[None, :] == torch.arange(c, device=dev)[:, None]  # (c, c·F)

        def chunk_masks(firsts: Tensor) -> Tensor:  # chunks starting at `firsts` (n,): (n, c, columns)
            q_pos = firsts[:, None] + torch.arange(c, device=dev)  # (n, c)
            k_pos = firsts[:, None] - window + torch.arange(span_len, device=dev)  # (n, W+c)
            visible = layout.visible(q_pos[:, :, None], k_pos[:, None, :]) & (k_pos >= k_start)[:, None, :]
            sees_sink = layout.visible(q_pos[:, :, None], sink_pos)  # (n, c, s)
            masks = [sees_sink, visible]
            if k_mem is not None:  # each position from k or from k_mem, never both
                memory = layout.is_memory(q_pos[:, :, None], k_pos[:, None, :])
                sink_memory = layout.is_memory(q_pos[:, :, None], sink_pos)
                masks = [sees_sink & ~sink_memory, visible & ~memory, sees_sink & sink_memory, visible & memory]
            if f:
                masks.insert(0, extra.expand(len(firsts), c, c * f))
            return torch.cat(masks, dim=-1) | (q_pos >= end)[:, :, None]  # padding queries see everything (dropped)

        keys, values = [gathered(k)], [gathered(v)]
        if sinks is not None:
            keys.insert(0, every_chunk(sinks[0]))
            values.insert(0, every_chunk(sinks[1]))
        if k_mem is not None:
            assert v_mem is not None
            if sinks is not None:
                keys.append(every_chunk(sinks[2]))
                values.append(every_chunk(sinks[3]))
            keys.append(gathered(k_mem))
            values.append(gathered(v_mem))
        if extra_k is not None:
            assert extra_v is not None
            keys.insert(0, rows(extra_k))
            values.insert(0, rows(extra_v))
        # With one query per block what a query sees depends only on its distance to the key
        # (and a sink only on being one), so every chunk has the same (c, ·) mask but the
        # first `head` (their windows start before the first key) and the padding queries of
        # the last (dropped; padding sees every column, so no row is empty): the chunks after
        # the head share one mask, broadcast. A mask per chunk, (nc, c, 2W + c), was 36 MB of
        # bools at T=16k in the sinks variant (and SDPA makes a float copy of it).
        firsts = q_start + c * torch.arange(nc, device=dev)  # (nc,)
        head = min(nc, max(0, -(-(k_start + window - q_start) // c)))
        sizes, masks = [], []
        if head:
            sizes.append(head)
            masks.append(chunk_masks(firsts[:head]))
        if head < nc:
            sizes.append(nc - head)
            masks.append(chunk_masks(firsts[head : head + 1]))  # (1, c, ·): broadcast over the chunks
        tensors = (qb, torch.cat(keys, dim=3), torch.cat(values, dim=3))
        parts = (x.split(sizes, dim=2) if len(sizes) > 1 else (x,) for x in tensors)  # one piece: no split (its backward copies)
        outs = [masked_block_sdpa(qp, kp, vp, mask, scale) for qp, kp, vp, mask in zip(*parts, masks)]
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out.flatten(2, 3)[:, :, :tq]

    @staticmethod
    def _one_block(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: BlockLayout,
        q_start: int,
        scale: float,
        k_mem: Tensor | None,
        v_mem: Tensor | None,
        extra_k: Tensor | None,
        extra_v: Tensor | None,
        sinks: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """All queries in one block (streaming decode, short chunks): no query padding,
        keys ``[extra rows (F), sinks (s), memory (W), own block so far]``, one
        (Tq, F+s+W+n) mask. Costs ``Tq·(F+s+W+n)`` score entries instead of ``L·(F+s+W+L)``."""
        size, window = layout.block_size, layout.window
        assert size is not None and window is not None
        tq = q.shape[2]
        end = q_start + tq
        k_start = end - k.shape[2]
        start = (q_start // size) * size  # the block's first position
        dev = q.device
        keys, values = [span(k, k_start, start, end)], [span(v, k_start, start, end)]  # own block so far
        own_pos = torch.arange(start, end, device=dev)
        q_pos = torch.arange(q_start, end, device=dev)
        masks = [(own_pos[None, :] <= q_pos[:, None]) & (own_pos[None, :] >= k_start)]
        if window > 0:
            keys.insert(0, span(k if k_mem is None else k_mem, k_start, start - window, start))
            values.insert(0, span(v if v_mem is None else v_mem, k_start, start - window, start))
            mem_pos = torch.arange(start - window, start, device=dev)
            masks.insert(0, (mem_pos >= k_start)[None, :].expand(tq, window))
        if sinks is not None:
            sink_k, sink_v = sink_blocks(sinks, torch.tensor([start], device=dev))
            keys.insert(0, sink_k[:, :, 0])
            values.insert(0, sink_v[:, :, 0])
            masks.insert(0, torch.arange(sink_k.shape[3], device=dev)[None, :] <= q_pos[:, None])
        if extra_k is not None:
            assert extra_v is not None
            keys.insert(0, extra_k[:, :, 0])
            values.insert(0, extra_v[:, :, 0])
            masks.insert(0, torch.ones(tq, extra_k.shape[3], dtype=torch.bool, device=dev))
        return F.scaled_dot_product_attention(
            q, torch.cat(keys, dim=2), torch.cat(values, dim=2), attn_mask=torch.cat(masks, dim=1), scale=scale
        )

    # ------------------------------------------------------ relative-position keys
    @staticmethod
    def _relative(inputs: AttentionInputs) -> Tensor:
        """A call with relative-position keys. The bias ``rel_q_i·rel_k[pos_i - pos_j]`` is
        a float score term with a gradient, which no fused CPU kernel takes (SDPA then falls
        back to its unfused path anyway), so these calls compute the softmax themselves:
        block-gathered (:func:`relative_blocks`) when the call spans several blocks of a
        bounded layout without sinks, one masked dense call otherwise (decode steps, one
        block, token windows, unbounded layouts, sinks, keys at explicit positions:
        :func:`relative_dense`)."""
        layout, tq, tk = inputs.layout, inputs.q.shape[2], inputs.k.shape[2]
        if layout.bounded and not layout.sinks and inputs.key_pos is None:
            clipped = layout.clipped_to_keys(inputs.q_start, tq, inputs.end - tk)
            assert clipped.block_size is not None
            if clipped.block_size > 1 and clipped.n_query_blocks(inputs.q_start, tq) > 1:
                return relative_blocks(inputs.replace(layout=clipped))
        return relative_dense(inputs)

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def relative_dense(inputs: AttentionInputs) -> Tensor:
    """Relative-position keys over the call's keys ``[extra rows (nb·F) | k (| k_mem)]``
    with the layout's (Tq, ·) mask: one matmul for the scores, the bias gathered by
    distance (extra rows get none), a softmax, one matmul for the output."""
    q, k, v, layout, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.scale
    rel_q, rel_k = inputs.rel_q, inputs.rel_k
    assert rel_q is not None and rel_k is not None
    b, h, tq, _ = q.shape
    tk, end, dev = k.shape[2], inputs.end, q.device
    q_pos = torch.arange(inputs.q_start, end, device=dev)
    k_pos = inputs.key_positions()
    visible = layout.visible(q_pos[:, None], k_pos[None, :])  # (Tq, Tk); every query sees itself
    by_distance = rel_q @ rel_k.transpose(-1, -2)  # (B, H, Tq, n)
    distance = (q_pos[:, None] - k_pos[None, :]).clamp(0, by_distance.shape[-1] - 1)  # unseen pairs are masked
    bias = by_distance.gather(-1, distance.expand(b, h, tq, tk))
    keys, values, biases, masks = [k], [v], [bias], [visible]
    if inputs.k_mem is not None:
        assert inputs.v_mem is not None
        memory = layout.is_memory(q_pos[:, None], k_pos[None, :])
        keys, values, biases = [k, inputs.k_mem], [v, inputs.v_mem], [bias, bias]
        masks = [visible & ~memory, visible & memory]  # each position from k or from k_mem, never both
    if inputs.extra_k is not None:
        assert inputs.extra_v is not None
        nb, f = inputs.extra_k.shape[2:4]
        q_block = layout.block_start(q_pos) // (layout.block_size or 1)
        keys.insert(0, inputs.extra_k.flatten(2, 3))
        values.insert(0, inputs.extra_v.flatten(2, 3))
        biases.insert(0, bias.new_zeros(b, h, tq, nb * f))
        masks.insert(0, (torch.arange(nb * f, device=dev) // f)[None, :] == (q_block - q_block[0])[:, None])
    scores = (q @ torch.cat(keys, dim=2).transpose(-1, -2) + torch.cat(biases, dim=-1)) * scale
    scores = scores.masked_fill(~torch.cat(masks, dim=-1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ torch.cat(values, dim=2)


def skew(x: Tensor, n_cols: int) -> Tensor:
    """Transformer-XL's relative shift as views: ``x`` (..., L, N) with ``N >= n_cols + L - 1``
    -> (..., L, n_cols) with ``out[o, c] = x[o, c + L - 1 - o]`` (row ``o`` shifted left by
    ``L - 1 - o``). Row ``o`` of the flattened ``x`` starting at ``L - 1`` and read with
    stride ``N - 1`` is exactly that, so no gather is needed; the backward writes the
    gradient into one zero tensor through the same view (:class:`_Skew`)."""
    size, n = x.shape[-2:]
    assert n - 1 >= n_cols and size >= 2, (size, n, n_cols)
    return _Skew.apply(x, n_cols)


def _skewed_view(x: Tensor, n_cols: int) -> Tensor:
    size, n = x.shape[-2:]
    flat = x.flatten(-2)[..., size - 1 : size - 1 + size * (n - 1)]
    return flat.unflatten(-1, (size, n - 1))[..., :n_cols]


class _Skew(torch.autograd.Function):
    """:func:`skew` with a backward of one fill and one strided copy (autograd's own, through
    two slices, would zero-fill and copy twice)."""

    @staticmethod
    def forward(ctx, x: Tensor, n_cols: int) -> Tensor:  # type: ignore[override]
        ctx.shape, ctx.n_cols = x.shape, n_cols
        return _skewed_view(x, n_cols)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        out = grad.new_zeros(ctx.shape)
        _skewed_view(out, ctx.n_cols).copy_(grad)
        return out, None


def relative_parts(size: int) -> list[tuple[int, int]]:
    """The query rows ``[o0, o1)`` of a block that :func:`relative_blocks` scores together:
    ``PARTS`` equal parts when ``L`` divides into parts of at least ``MIN_PART_ROWS`` rows,
    else two halves of at least that many, else the whole block. A part's keys stop at its own
    last query, so fewer parts score more of the block's causal triangle for nothing, and
    more parts cost more calls (at L=256, W=256 on CPU, forward+backward of one attention
    call: 4 parts about 0.6x one part, 2 parts 0.8x, 8 and 16 no better than 4)."""
    n = PARTS if size >= MIN_PART_ROWS * PARTS and size % PARTS == 0 else 2 if size >= 2 * MIN_PART_ROWS and size % 2 == 0 else 1
    step = size // n
    return [(i * step, (i + 1) * step) for i in range(n)]


#: parts of a block's queries in :func:`relative_blocks` (see :func:`relative_parts`), and
#: the fewest rows a part may have (smaller parts cost more in calls than they save)
PARTS = 4
MIN_PART_ROWS = 16


def relative_blocks(inputs: AttentionInputs) -> Tensor:
    """Relative-position keys, block-gathered like the SDPA path: per block of ``L``
    queries the keys ``[extra rows (F), memory (W), own block (L)]`` and one batched
    matmul for the scores. Column ``c`` of the memory/own part is position
    ``b·L - W + c``, so query ``o`` of the block sees it at distance ``o + W - c``: with
    the distance table reversed (``ext[e] = rel_k[W + L - 1 - e]``, ``L - 1`` zero rows
    after it for the negative distances, which the mask hides), ``rel_q @ ext^T`` shifted
    by :func:`skew` is the bias, ``rel_q_i·rel_k[pos_i - pos_j]``, at ``Tq·(W + 2L)``
    score entries (XL's "relative shift"). The bias and the layout mask enter the score
    matmul as its added term (``baddbmm``); softmax and the value matmul follow. Each
    block's queries go in the parts of :func:`relative_parts`, each part only over the
    columns its queries can see (the first half of a block skips the second half's keys)."""
    q, k, v, layout, q_start, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start, inputs.scale
    rel_q, rel_k = inputs.rel_q, inputs.rel_k
    assert rel_q is not None and rel_k is not None
    size, window = layout.block_size, layout.window
    assert size is not None and window is not None and size >= 2 and not layout.sinks
    tq, end = q.shape[2], inputs.end
    k_start = end - k.shape[2]
    b0 = q_start // size
    nb = layout.n_query_blocks(q_start, tq)
    lo, hi = b0 * size, (b0 + nb) * size
    qb = span(q, q_start, lo, hi).unflatten(2, (nb, size))  # (B,H,nb,L,D)
    rqb = span(rel_q * scale, q_start, lo, hi).unflatten(2, (nb, size))  # (B,H,nb,L,Dr)
    keys = [span(k, k_start, lo, hi).unflatten(2, (nb, size))]
    values = [span(v, k_start, lo, hi).unflatten(2, (nb, size))]
    if window > 0:
        km = k if inputs.k_mem is None else inputs.k_mem
        vm = v if inputs.v_mem is None else inputs.v_mem
        keys.insert(0, gather_blocks(km, k_start, b0, nb, size, window))
        values.insert(0, gather_blocks(vm, k_start, b0, nb, size, window))
    n_extra = 0
    if inputs.extra_k is not None:
        assert inputs.extra_v is not None
        n_extra = inputs.extra_k.shape[3]
        keys.insert(0, inputs.extra_k)
        values.insert(0, inputs.extra_v)
    kb = torch.cat(keys, dim=3) if len(keys) > 1 else keys[0]
    vb = torch.cat(values, dim=3) if len(values) > 1 else values[0]
    n_cols = window + size
    table = rel_k[:, :n_cols]
    if table.shape[1] < n_cols:  # distances the call cannot see (the keys do not reach so far)
        table = F.pad(table, (0, 0, 0, n_cols - table.shape[1]))
    mask = block_mask(layout, q_start, tq, k_start, n_extra, q.device)  # (nb, L, F+W+L)
    # heads first: the per-head table product is one (H, rows, Dr) x (H, Dr, N) bmm, and every
    # score-sized tensor is made once, contiguous, in the order the score bmm reads
    b, h = qb.shape[:2]
    heads_first = (1, 0, 2, 3, 4)
    qh, kh, vh = (x.permute(heads_first).flatten(0, 2) for x in (qb, kb, vb))  # (H·B·nb, L|S, D)
    rq = rqb.permute(heads_first).flatten(1, 2)  # (H, B·nb, L, Dr)
    outs = []
    for o0, o1 in relative_parts(size):
        # queries o0 … o1-1 of each block see the columns before W + o1 only (the rest of
        # their own block is their future): half the blocks' causal triangle is never scored
        rows, cols = o1 - o0, window + o1
        ext = F.pad(table[:, :cols].flip(1), (0, 0, 0, rows - 1))  # (H or 1, W + o1 + rows - 1, Dr)
        rq_part = rq[:, :, o0:o1].reshape(h, -1, rq.shape[-1])  # (H, B·nb·rows, Dr)
        if ext.shape[0] == h:
            by_distance = rq_part @ ext.transpose(-1, -2)
        else:
            by_distance = (rq_part.flatten(0, 1) @ ext[0].T).unflatten(0, (h, -1))
        bias = skew(by_distance.unflatten(1, (b, nb, rows)), cols)  # (H, B, nb, rows, W + o1)
        if n_extra:
            bias = F.pad(bias, (n_extra, 0))
        # hidden scores set to -inf whatever the bias there (a non-finite table row at a
        # distance no query sees must not reach any query, as on the other backends)
        bias = bias.masked_fill(~mask[:, o0:o1, : n_extra + cols], float("-inf"))
        k_part, v_part = kh[:, : n_extra + cols], vh[:, : n_extra + cols]
        scores = torch.baddbmm(bias.flatten(0, 2), qh[:, o0:o1], k_part.transpose(-1, -2), alpha=scale)
        outs.append(torch.softmax(scores, dim=-1) @ v_part)  # (H·B·nb, rows, Dv)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    out = out.unflatten(0, (h, b, nb)).permute(heads_first).flatten(2, 3)  # (B, H, nb·L, Dv)
    return out[:, :, q_start - lo : q_start - lo + tq]
