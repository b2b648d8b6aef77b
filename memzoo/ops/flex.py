"""FlexAttention (``torch.nn.attention.flex_attention``) with a block mask built from
the :class:`BlockLayout`.

One flex call over one key sequence that holds every key a query of the call may see::

    keys    [extra rows (nb·F) | k (Tk) | k_mem (Tk), only with memory tensors]
    mask    mask_mod(b, h, q_idx, kv_idx) -> bool, True = may attend

* an extra row of call-block ``j`` is visible to the queries of block ``j`` only;
* a key position (sinks first, :meth:`BlockLayout.key_positions`) is visible under
  :meth:`BlockLayout.visible`; with memory tensors the
  position appears twice, and the mask keeps the ``k_mem`` copy where the key is the
  query's memory (before its block) and the ``k`` copy elsewhere, which is exactly
  the reference's selection (values likewise).

The mask only depends on shapes and on the call's phase inside a block
(``q_start mod L``), so block masks are cached per ``(layout, phase, Tq, Tk, F, ...)``;
``create_block_mask`` is the costly part. Streaming calls reuse a small set of them.

Device facts (torch 2.13): on CPU flex is **forward only** (its backward raises), and
eager flex is unfused (it materialises the scores), so on CPU it is an inference
backend that ``auto`` never prefers. On CUDA it is compiled with ``torch.compile`` and
trains; its kernels take head widths from 16 up. Keep ``L`` a multiple of 128 on GPU
so mask tiles are full, empty or diagonal.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Callable

import torch
from torch import Tensor

from memzoo.ops.base import FLOATS, AttentionCall, AttentionInputs, Backend, Support, register_backend
from memzoo.ops.layout import BlockLayout

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

NO_CPU_BACKWARD = (
    "FlexAttention has no backward on CPU in torch "
    f"{torch.__version__.split('+')[0]} (forward only: its backward raises 'does not support backward on CPU'); "
    "run it under torch.no_grad()/torch.inference_mode(), or train with backend='sdpa' or 'reference'"
)


@functools.lru_cache(maxsize=None)
def flex_available() -> str | None:
    """None when ``torch.nn.attention.flex_attention`` imports, else why not."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:  # torch < 2.5
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({exc}); FlexAttention needs torch >= 2.5"
    return None


def layout_mask_mod(
    layout: BlockLayout, q_start: int, n_queries: int, n_keys: int, extra_per_block: int, n_blocks: int, memory_copy: bool
) -> tuple[MaskMod, tuple]:
    """The mask_mod for a call and the key it may be cached under.

    Positions are shifted by a multiple of ``L`` so the first query block of the call
    starts at 0 (by ``q_start`` without blocks); the mask then depends on the call only
    through the returned key. Key row ``i`` of ``k`` is at position ``i`` if it is one of
    the ``s`` sinks, else ``run_start + i - s`` (:meth:`BlockLayout.key_positions`).
    """
    size, window = layout.block_size, layout.window
    end = q_start + n_queries
    n_sink, run_start = layout.n_sink_rows(end), layout.run_start(end, n_keys)
    n_extra = extra_per_block * n_blocks
    f = extra_per_block
    if size is None:
        shift = q_start  # one block from position 0: visible = causal (a window counts from 0, it never bites)
    else:
        shift = (q_start // size) * size
    phase = q_start - shift  # in [0, L)
    ks = run_start - shift  # position of the run's first key, relative to the shift
    # a sink row's relative position; once the shift passes the sinks, every predicate on
    # it (visible, memory) is the same for any earlier position, so cap it: one cache key
    sink_shift = min(shift, n_sink)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        qp = q_idx + phase
        t = kv_idx - n_extra
        mem_copy = t >= n_keys
        i = torch.where(mem_copy, t - n_keys, t) if memory_copy else t  # row of k (or k_mem)
        kp = torch.where(i < n_sink, i - sink_shift, ks + i - n_sink) if n_sink else ks + i
        tok = (kp <= qp) & (t >= 0) & (i < n_keys)
        if size is None:
            # block start is 0, so no key is memory: a k_mem copy is never visible
            if memory_copy:
                tok = tok & ~mem_copy
        else:
            q_block = qp // size
            start = q_block * size
            if window is not None:
                near = kp >= start - window
                if n_sink:
                    near = near | (i < n_sink)
                tok = tok & near
            if memory_copy:
                # a k_mem copy row only for keys before the block, a k row only for the rest;
                # spelled as a select, not as (kp < start) == mem_copy: inductor's bounds
                # analysis fails on == between two booleans ("A Boolean argument can only be
                # used in Eq and Ne", torch 2.11-2.13), which broke the compiled mask builder
                tok = tok & torch.where(mem_copy, kp < start, kp >= start)
        if not n_extra:
            return tok
        if size is None:
            return (kv_idx < n_extra) | tok
        return torch.where(kv_idx < n_extra, (kv_idx // f) == (qp // size), tok)

    return mask_mod, (size, window, phase, ks, n_sink, sink_shift, n_queries, n_keys, f, n_blocks, memory_copy)


def relative_score_mod(
    layout: BlockLayout, q_start: int, n_keys: int, n_extra: int, memory_copy: bool, by_distance: Tensor
) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The score_mod for relative-position keys over the key source of :func:`layout_mask_mod`:
    adds ``by_distance[b, h, q, pos_q - pos_k]`` (already scaled) to a key row's score and
    nothing to an extra row's. Distances the mask hides are clamped into the table."""
    end = q_start + by_distance.shape[2]
    n_sink, run_start = layout.n_sink_rows(end), layout.run_start(end, n_keys)
    last = by_distance.shape[-1] - 1

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        t = kv_idx - n_extra
        i = torch.where(t >= n_keys, t - n_keys, t) if memory_copy else t  # row of k (or k_mem)
        kp = torch.where(i < n_sink, i, run_start + i - n_sink) if n_sink else run_start + i
        d = (q_start + q_idx - kp).clamp(0, last)
        bias = by_distance[b, h, q_idx, d]
        return score + (torch.where(t >= 0, bias, torch.zeros_like(bias)) if n_extra else bias)

    return score_mod


def dense_mask(mask_mod: MaskMod, n_queries: int, n_kv: int) -> Tensor:
    """``mask_mod`` evaluated on the whole (Tq, n_kv) grid (for tests; O(Tq·n_kv))."""
    zero = torch.zeros((), dtype=torch.long)
    q_idx = torch.arange(n_queries)[:, None].expand(n_queries, n_kv)
    kv_idx = torch.arange(n_kv)[None, :].expand(n_queries, n_kv)
    return mask_mod(zero, zero, q_idx, kv_idx)


_MASKS: dict[tuple, object] = {}
_MASK_CACHE_SIZE = 256


@functools.lru_cache(maxsize=None)
def compiled_block_mask_builder():
    """``torch.compile(create_block_mask)``: the builder used on GPU, where it avoids
    materialising the (Tq, n_kv) grid (what the deprecated ``_compile=True`` did)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def cached_block_mask(mask_mod: MaskMod, key: tuple, n_queries: int, n_kv: int, device: torch.device):
    """``create_block_mask`` once per ``(key, n_kv, device)``; a bounded FIFO cache. On CUDA
    built by :func:`compiled_block_mask_builder`."""
    from torch.nn.attention.flex_attention import create_block_mask

    full_key = (key, n_kv, str(device))
    mask = _MASKS.get(full_key)
    if mask is None:
        build = compiled_block_mask_builder() if device.type == "cuda" else create_block_mask
        mask = build(mask_mod, None, None, n_queries, n_kv, device=device)
        if len(_MASKS) >= _MASK_CACHE_SIZE:
            _MASKS.pop(next(iter(_MASKS)))
        _MASKS[full_key] = mask
    return mask


_EAGER_LOCK = threading.Lock()
_DEBUG_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _run_flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, compile: bool, score_mod=None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    if compile:
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    if not torch.is_grad_enabled():
        # flex refuses CPU inputs that merely *carry* requires_grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    import torch.nn.attention.flex_attention as fa

    # Uncompiled flex still traces every new shape and mask closure with dynamo (~1 s
    # each on CPU). torch's documented debug switch runs the same unfused forward
    # directly instead; it is only unsafe for backward, which is refused for uncompiled
    # flex anyway (see FlexBackend.rank/support). Scoped and locked: torch's global.
    with _EAGER_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        saved = getattr(fa, _DEBUG_SWITCH, None)
        if saved is None:  # a torch without the switch: plain (traced) uncompiled flex
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        setattr(fa, _DEBUG_SWITCH, True)
        try:
            return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
        finally:
            setattr(fa, _DEBUG_SWITCH, saved)


@register_backend
class FlexBackend(Backend):
    name = "flex"
    priority = 50
    support = Support(
        dtypes={"cpu": FLOATS, "cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        training=frozenset({"cuda"}),
        no_training_because={"cpu": NO_CPU_BACKWARD},
        min_head_dim={"cuda": 16},
        relative_keys=True,
        no_key_positions_because=(
            "keys at explicit positions (a ring-buffer cache read in slot order) are not implemented for flex: its "
            "block masks are made once per call shape, and these positions change at every decode step; the variants "
            "then read their caches in position order (or use backend='sdpa')"
        ),
    )
    #: device types where flex runs compiled (fused); elsewhere eager (unfused, correct)
    compile_devices: frozenset[str] = frozenset({"cuda"})

    def rank(self, call: AttentionCall) -> int:
        # eager CPU flex materialises every score: never auto's choice there. On CUDA it
        # compiles per shape, so auto still prefers the uncompiled kernels (see docs/backends.md)
        return self.priority if call.device_type == "cuda" else 500

    def availability_reasons(self, call: AttentionCall) -> list[str]:
        missing = flex_available()
        return [missing] if missing else []

    def attend(self, inputs: AttentionInputs) -> Tensor:
        if inputs.key_pos is not None:
            raise ValueError(FlexBackend.support.no_key_positions_because)
        q, k, v, layout, q_start, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start, inputs.scale
        k_mem, v_mem, extra_k, extra_v = inputs.k_mem, inputs.v_mem, inputs.extra_k, inputs.extra_v
        tq, tk = q.shape[2], k.shape[2]
        nb = layout.n_query_blocks(q_start, tq)
        keys, values = [k], [v]
        f = 0
        if extra_k is not None:
            assert extra_v is not None
            f = extra_k.shape[3]
            keys.insert(0, extra_k.flatten(2, 3))  # (B, H, nb*F, D)
            values.insert(0, extra_v.flatten(2, 3))
        if k_mem is not None:
            assert v_mem is not None
            keys.append(k_mem)
            values.append(v_mem)
        kk = torch.cat(keys, dim=2) if len(keys) > 1 else k
        vv = torch.cat(values, dim=2) if len(values) > 1 else v
        mask_mod, key = layout_mask_mod(layout, q_start, tq, tk, f, nb, k_mem is not None)
        block_mask = cached_block_mask(mask_mod, key, tq, kk.shape[2], q.device)
        score_mod = None
        if inputs.rel_q is not None:
            assert inputs.rel_k is not None
            by_distance = (inputs.rel_q @ inputs.rel_k.transpose(-1, -2)) * scale  # (B, H, Tq, n)
            score_mod = relative_score_mod(layout, q_start, tk, f * nb, k_mem is not None, by_distance)
        return _run_flex(q, kk, vv, block_mask, scale, q.device.type in self.compile_devices, score_mod)

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        lead = q.shape[:-2]
        q4, k4, v4 = (x.reshape(-1, 1, *x.shape[-2:]) for x in (q, k, v))  # (prod(lead), 1, T, D)
        out = _run_flex(q4, k4, v4, None, scale, q.device.type in self.compile_devices)
        return out.reshape(*lead, *out.shape[-2:])
