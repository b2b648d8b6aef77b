"""Attention backends behind one seam (see :mod:`memzoo.ops.base`).

Registered backends: ``reference`` (dense masks, the oracle), ``sdpa`` (block-gathered
``scaled_dot_product_attention``), ``flex`` (FlexAttention block masks) and
``xformers`` (``memory_efficient_attention`` with block-diagonal biases). See
``docs/backends.md`` for what each supports and how ``auto`` picks.

**Non-finite inputs.** A key a query may not see never reaches it, for any input:
when a key or value of a layout call is NaN or infinite, the dispatcher runs the
backend on keys and values with those entries set to 0 and then marks non-finite
(NaN) exactly the outputs whose visible keys held them (the whole row for a key, the
column for a value), so a NaN at position 5 never reaches positions 0-4, as when
streaming. Its backward is that of the backend on the zeroed copies, for any gradient of
the output (:func:`~memzoo.ops.base.zero_non_finite`): a marked output passes on the
gradient it receives, which a finite loss makes 0 there, and then the replaced entries'
gradients are 0. The reference backend computes the same thing directly (a visible
infinite value may then give ``inf`` where the others give NaN). NaN and inf are
otherwise accepted; ``with memzoo.ops.check_finite():`` refuses them with an
:class:`~memzoo.errors.InputError` at the first attention call that sees one
(opt-in: the check synchronises with the device at every call). Without it nothing
synchronises on an accelerator or in compiled code: there the masked path always
runs (branch-free); on the CPU, eagerly, one sum per tensor decides whether it must.
``with memzoo.ops.propagate_non_finite():`` skips that isolation where its cost is paid
on every call (compiled training steps, accelerators): the same outputs when every key
and value is finite; otherwise what plain masked attention gives, which keeps every output
the isolation leaves finite either the same or non-finite. The ``reference`` backend
always isolates. (``check_finite`` is per context, since it only acts eagerly;
``propagate_non_finite`` is process-wide, since compiled graphs read it and Dynamo cannot
trace a context variable.)
"""

import contextlib
import contextvars
import math
from typing import Iterator

import torch
from torch import Tensor

from memzoo.errors import InputError

from memzoo.ops.base import (
    AttentionCall,
    AttentionInputs,
    Backend,
    BackendRecord,
    BackendUnavailable,
    NON_FINITE as _NON_FINITE,
    TOLERANCES,
    Support,
    Tolerance,
    check_backend_name,
    explain,
    forget_resolutions,
    get_backend,
    list_backends,
    mark_non_finite,
    note_resolved,
    record_backends,
    register_backend,
    resolve_backend,
    resolve_backend_name,
    resolve_backend_once,
    takes_key_positions,
    takes_relative_keys,
    use_backend,
    zero_non_finite,
)
from memzoo.ops.layout import BlockLayout
from memzoo.ops import reference as _reference  # noqa: F401  (registers "reference")
from memzoo.ops import sdpa as _sdpa  # noqa: F401  (registers "sdpa")
from memzoo.ops import flex as _flex  # noqa: F401  (registers "flex")
from memzoo.ops import xformers_backend as _xformers  # noqa: F401  (registers "xformers"; imports xformers lazily)


def repeat_kv(t, n_heads):
    """Grouped-query attention: K/V (B, Hkv, ...) -> (B, H, ...), query head ``h`` reading
    K/V head ``h // (H / Hkv)`` (Hugging Face's ``repeat_kv``). Identity when Hkv = H."""
    if t is None or t.shape[1] == n_heads:
        return t
    n_kv = t.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv})")
    return t.unsqueeze(2).expand(t.shape[0], n_kv, n_heads // n_kv, *t.shape[2:]).flatten(1, 2)


_CHECK_FINITE: contextvars.ContextVar[bool] = contextvars.ContextVar("memzoo_check_finite", default=False)


@contextlib.contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Within the block, every attention call refuses NaN or inf inputs with an
    :class:`~memzoo.errors.InputError` (off by default: it costs a device sync per call)."""
    token = _CHECK_FINITE.set(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE.reset(token)


@contextlib.contextmanager
def propagate_non_finite(enabled: bool = True) -> Iterator[None]:
    """Within the block, attention calls run their backend on the keys and values as they
    are: a NaN or inf key or value is not kept away from the queries that may not see it
    (the isolation in this module's doc; ``enabled=False`` restores it inside the block).

    * Every key and value finite: the same outputs (the isolation only replaces non-finite
      entries and marks outputs, so it changes nothing then).
    * A non-finite one: what plain masked attention gives. An output the isolation leaves
      finite is the same or becomes NaN/inf (a hidden value still meets a zero weight, and
      ``0 * nan`` is NaN; a hidden key's score is masked). An output the isolation marks
      NaN (it sees a non-finite key or value) is whatever the kernel makes of it: NaN, inf,
      or finite (a key whose score is ``-inf`` gets weight 0).

    The isolation costs most where it runs on every call, branch-free: in compiled graphs
    and on accelerators (docs/benchmarks.md measures it). A training step can go without it:
    its activations are finite unless something has already gone wrong, and a non-finite
    one then spreads to the loss (or the gradients) instead of staying at the positions
    that see it, which the trainer reports as divergence. (``memzoo compare``:
    ``train.non_finite = "propagate"``.)

    Not for decoding: a decode step over a ring buffer (keys at explicit positions) then
    hands the attention its stale rows as they are, so a non-finite token left in one
    reaches every later step, where the default hides the rows a query may not see.

    Process-wide: compiled code reads it while tracing (a graph traced under one setting
    is retraced, not reused, under the other), so it is one flag, not a context variable.
    Enter it from one thread at a time: blocks open in two threads at once restore each
    other's setting in the wrong order. The ``reference`` backend (the oracle) always
    isolates; :func:`check_finite` still refuses non-finite inputs. Read the setting with
    :func:`isolating_non_finite`."""
    if not isinstance(enabled, bool):
        raise TypeError(f"propagate_non_finite(enabled) takes a bool, got {type(enabled).__name__} {enabled!r}")
    previous = _NON_FINITE.isolate
    _NON_FINITE.isolate = not enabled
    try:
        yield
    finally:
        _NON_FINITE.isolate = previous


def isolating_non_finite() -> bool:
    """Whether attention calls isolate non-finite keys and values now (True unless inside
    :func:`propagate_non_finite`)."""
    return _NON_FINITE.isolate


def _all_finite(*tensors: Tensor | None) -> bool:
    """False if any value is NaN or inf, with one reduction per tensor and one sync: a sum
    is finite unless a value is not (NaN and inf propagate) or the sum overflows, which
    only sends a finite call down the exact, slower path. Summed in at least float32, so
    half-precision sums do not overflow."""
    total = None
    for t in tensors:
        if t is None:
            continue
        part = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        total = part if total is None else total + part
    return total is None or math.isfinite(total.item())  # one sync; torch.isfinite would add 4 ops


def _refuse_non_finite(**named: Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"attention input {name} has {int((~torch.isfinite(t)).sum())} NaN/inf value(s) "
                "(memzoo.ops.check_finite is on); the backbone's input or weights are not finite"
            )


def attend(
    q, k, v, *, layout, q_start, scale, backend="auto", k_mem=None, v_mem=None, extra_k=None, extra_v=None, rel_q=None, rel_k=None,
    key_pos=None,
):
    """Dispatch one layout attention call to ``backend`` (a name or ``"auto"``); the
    inputs are those of :class:`AttentionInputs`.

    ``q`` (B, H, Tq, D); ``k``, ``v`` and the optional memory tensors / extra rows may have
    fewer heads Hkv dividing H (grouped-query attention): they are shared by groups of
    H / Hkv query heads. ``k_mem`` and ``v_mem`` come together (the copy a query's memory
    is read from), as do ``rel_q`` and ``rel_k`` (relative-position keys).
    ``key_pos`` (Tk,) int64: the key rows' positions, in any order (keys at explicit
    positions, e.g. a ring buffer in slot order; a backend declares it)."""
    if (k_mem is None) != (v_mem is None):
        given = "k_mem" if k_mem is not None else "v_mem"
        raise ValueError(
            f"memory tensors come as a pair: k_mem (B, Hkv, Tk, D) and v_mem (B, Hkv, Tk, Dv), the keys and values "
            f"a query's memory positions are read from; got only {given}"
        )
    _check_shapes(q, k, v, k_mem, v_mem, extra_k, extra_v, layout, q_start, key_pos is None)
    h = q.shape[1]
    if k.shape[1] != h or v.shape[1] != h or k_mem is not None or v_mem is not None or extra_k is not None or extra_v is not None:
        k, v, k_mem, v_mem, extra_k, extra_v = (repeat_kv(t, h) for t in (k, v, k_mem, v_mem, extra_k, extra_v))
    inputs = AttentionInputs(q, k, v, layout, q_start, scale, k_mem, v_mem, extra_k, extra_v, rel_q, rel_k, key_pos)
    if (rel_q is None) != (rel_k is None):
        raise ValueError("relative-position keys need both rel_q (B, H, Tq, Dr) and rel_k (H or 1, n, Dr); got one of them")
    if rel_k is not None:
        _check_relative(inputs)
    if key_pos is not None and (
        not isinstance(key_pos, Tensor) or key_pos.dtype != torch.int64 or tuple(key_pos.shape) != (k.shape[2],)
        or key_pos.device != k.device
    ):
        got = f"{key_pos.dtype} {tuple(key_pos.shape)} on {key_pos.device}" if isinstance(key_pos, Tensor) else type(key_pos).__name__
        raise ValueError(f"key_pos must be an int64 tensor of shape (Tk,) = ({k.shape[2]},) on {k.device} (one position per key row), got {got}")
    impl = resolve_backend_once(backend, inputs.describe())
    note_resolved(impl.name)
    compiling = torch.compiler.is_compiling()
    ring_step = inputs.ring_step()
    # a ring step's query sees all the extra rows it is given (its block's): only key rows
    # can be hidden from it (elsewhere a non-finite extra row is isolated like any other)
    tensors = (k, v, k_mem, v_mem) if ring_step else (k, v, k_mem, v_mem, extra_k, extra_v)
    if not compiling and _CHECK_FINITE.get():  # check_finite() is for eager code
        _refuse_non_finite(**inputs.tensors())
    elif impl.name == "reference" or inputs.nothing_hidden():
        pass  # nothing is masked: what a non-finite key reaches, plain attention reaches too
    elif not _NON_FINITE.isolate:
        pass  # propagate_non_finite(): the backend on the inputs as they are
    elif impl.handles_non_finite(inputs):
        pass  # the backend's own masking keeps hidden values out (sdpa's small compiled calls)
    elif ring_step:
        # one query (a decode step over a ring): the rows it may not see zeroed (two selects,
        # branch-free, no sync), then what a non-finite row it sees reaches, plain attention reaches too
        if compiling or q.device.type != "cpu" or not _all_finite(*tensors):
            return impl.attend(_hide_rows(inputs))
    elif compiling or q.device.type != "cpu":
        # a compiled graph cannot branch on data, and on an accelerator the branch would
        # cost a host sync per call: run the non-finite handling unconditionally
        # (branch-free, equal to impl.attend when all is finite)
        return _attend_non_finite(impl, inputs)
    elif impl.name != "reference" and not _all_finite(*tensors):
        # on the CPU the check is one sum per tensor, cheaper than the masked path
        return _attend_non_finite(impl, inputs)
    return impl.attend(inputs)


def _check_shapes(q, k, v, k_mem, v_mem, extra_k, extra_v, layout, q_start, keys_in_order) -> None:
    """Shapes the backends rely on but do not all check (a mismatch ran on one backend and
    failed on another, or indexed the wrong rows): q (B, H, Tq, D), k (B, Hkv, Tk, D),
    v (B, Hkv, Tk, Dv), memory tensors like k/v, extra rows (B, Hkv, nb, F, D|Dv) for the
    nb blocks the queries touch, q_start >= 0 and, keys in order, every query's own position among them."""
    def shape(t):
        return tuple(t.shape)

    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, heads, T, width), got shape {shape(t)}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k (B, Hkv, Tk, D) and v (B, Hkv, Tk, Dv) must agree with each other and with q (B, H, Tq, D) in B, "
            f"and k with q in D; got q {shape(q)}, k {shape(k)}, v {shape(v)}"
        )
    if k_mem is not None and (shape(k_mem) != shape(k) or shape(v_mem) != shape(v)):
        raise ValueError(f"k_mem and v_mem must have k's and v's shapes {shape(k)}, {shape(v)}; got {shape(k_mem)}, {shape(v_mem)}")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("extra rows come as a pair: extra_k (B, Hkv, nb, F, D) and extra_v (B, Hkv, nb, F, Dv); got one of them")
    if q_start < 0:
        raise ValueError(f"q_start (the first query's position) must be >= 0, got {q_start}")
    tq = q.shape[2]
    if extra_k is not None:
        nb = layout.n_query_blocks(q_start, tq)
        want_k, want_v = (k.shape[0], k.shape[1], nb, extra_k.shape[3], k.shape[3]), (v.shape[0], v.shape[1], nb, extra_k.shape[3], v.shape[3])
        if extra_k.dim() != 5 or shape(extra_k) != want_k or shape(extra_v) != want_v:
            raise ValueError(
                f"extra rows must be (B, Hkv, nb, F, D|Dv) with nb={nb} (the blocks queries [{q_start}, {q_start + tq}) "
                f"touch): extra_k {want_k}, extra_v {want_v}; got {shape(extra_k)}, {shape(extra_v)}"
            )
    if keys_in_order:
        end = q_start + tq
        # the run's first position (with sinks: checks there are between s and `end` keys; without, the
        # keys may reach before position 0, as the reference and sdpa compute them)
        run_start = layout.run_start(end, k.shape[2]) if layout.sinks else end - k.shape[2]
        if run_start > max(q_start, layout.n_sink_rows(end)):
            raise ValueError(
                f"the keys must include every query's own position: queries [{q_start}, {end}) over {k.shape[2]} keys "
                f"(positions [{run_start}, {end}){' after the sinks' if layout.sinks else ''}); a query sees at least itself"
            )


def _check_relative(inputs: AttentionInputs) -> None:
    q, rel_q, rel_k = inputs.q, inputs.rel_q, inputs.rel_k
    assert rel_q is not None and rel_k is not None
    b, h, tq, _ = q.shape
    if rel_q.dim() != 4 or tuple(rel_q.shape[:3]) != (b, h, tq):
        raise ValueError(f"rel_q must be (B, H, Tq, Dr) = ({b}, {h}, {tq}, Dr) like q's leading dims, got {tuple(rel_q.shape)}")
    if rel_k.dim() != 3 or rel_k.shape[0] not in (1, h) or rel_k.shape[2] != rel_q.shape[3]:
        raise ValueError(
            f"rel_k must be (H or 1, n, Dr) with H={h} and Dr={rel_q.shape[3]} (rel_q's width), got {tuple(rel_k.shape)}"
        )
    need = inputs.needed_distances()
    if rel_k.shape[1] < need:
        raise ValueError(
            f"rel_k holds {rel_k.shape[1]} distances but the queries of this call see keys up to distance {need - 1} "
            f"(it needs at least {need} rows: distances 0 … {need - 1})"
        )


def _zeroed(t: Tensor | None) -> Tensor | None:
    return None if t is None else zero_non_finite(t)


def _in_range(bad: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Per query, whether any of ``bad`` (..., Tk, X) in key range ``[lo, hi]`` (Tq,) is set: (..., Tq, X)."""
    # int32 counts (at most Tk): a third of int64's time for the cumsum on the CPU, the
    # part of the non-finite handling that compiled graphs always run (docs/benchmarks.md)
    kind = torch.int32 if bad.shape[-2] < 2**31 else torch.int64
    counts = torch.nn.functional.pad(bad.to(kind).cumsum(dim=-2, dtype=kind), (0, 0, 1, 0))  # (..., Tk+1, X)
    lo_c, hi_c = lo.clamp(0, bad.shape[-2]), (hi + 1).clamp(0, bad.shape[-2])
    upper, lower = counts.index_select(-2, hi_c), counts.index_select(-2, lo_c)
    return (upper - lower > 0) & (hi_c > lo_c)[:, None]


def _attend_non_finite(impl: Backend, inputs: AttentionInputs) -> Tensor:
    """``impl.attend`` when a key or value is NaN/inf: run it on zeroed copies, then set
    to NaN exactly the outputs that a visible non-finite key (row) or value (column) reaches.
    (Relative-position keys are derived from queries and weights, like ``q``: not zeroed.)"""
    q, k, v, layout, q_start = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start
    k_mem, v_mem, extra_k, extra_v = inputs.k_mem, inputs.v_mem, inputs.extra_k, inputs.extra_v
    out = impl.attend(inputs.replace(
        k=_zeroed(k), v=_zeroed(v), k_mem=_zeroed(k_mem), v_mem=_zeroed(v_mem), extra_k=_zeroed(extra_k), extra_v=_zeroed(extra_v),
    ))
    tq, tk = q.shape[2], k.shape[2]
    end = q_start + tq
    n_sinks = layout.n_sink_rows(end) if layout.sinks else 0  # the first key rows: positions 0 … n_sinks-1
    if inputs.key_pos is not None or (n_sinks and k_mem is not None):
        return mark_non_finite(out, _reached_by_non_finite(inputs))
    q_pos = torch.arange(q_start, end, device=q.device)
    first = end - tk  # position of key index 0 (with sinks: of the run's rows, index n_sinks on)
    start = layout.block_start(q_pos)
    lo = (start - layout.window if layout.window is not None else torch.full_like(q_pos, first)) - first
    if n_sinks:
        lo = lo.clamp_min(n_sinks)  # the sink rows are not at the run's positions: counted below
    hi = q_pos - first
    split = start - first  # keys before it are the query's memory
    bad_k = (~torch.isfinite(k)).any(-1, keepdim=True)  # (B, H, Tk, 1)
    bad_v = ~torch.isfinite(v)  # (B, H, Tk, Dv)
    if k_mem is None:
        row = _in_range(bad_k, lo, hi)  # (B, H, Tq, 1)
        col = _in_range(bad_v, lo, hi)
    else:  # with v_mem (attend takes them as a pair)
        assert v_mem is not None
        mem_k = (~torch.isfinite(k_mem)).any(-1, keepdim=True)
        mem_v = ~torch.isfinite(v_mem)
        tok_lo = torch.maximum(lo, split)
        mem_hi = torch.minimum(hi, split - 1)
        row = _in_range(bad_k, tok_lo, hi) | _in_range(mem_k, lo, mem_hi)
        col = _in_range(bad_v, tok_lo, hi) | _in_range(mem_v, lo, mem_hi)
    if n_sinks:  # sink row j (position j) is seen by every query at a position >= j
        zero = torch.zeros_like(q_pos)
        row = row | _in_range(bad_k[:, :, :n_sinks], zero, q_pos)
        col = col | _in_range(bad_v[:, :, :n_sinks], zero, q_pos)
    if extra_k is not None:
        q_block = layout.block_start(q_pos) // (layout.block_size or 1)
        q_block = q_block - q_block[0]
        ek = (~torch.isfinite(extra_k)).flatten(3).any(-1)  # (B, H, nb)
        row = row | ek.index_select(-1, q_block)[..., None]
        if extra_v is not None:
            ev = (~torch.isfinite(extra_v)).any(-2)  # (B, H, nb, Dv)
            col = col | ev.index_select(-2, q_block)
    return mark_non_finite(out, row | col)


def _hide_rows(inputs: AttentionInputs) -> AttentionInputs:
    """One query's call with the key rows it may not see set to 0 (keys, values and memory
    tensors): they cannot reach it whatever they held. With memory tensors a position the
    query sees is read from one copy (``k_mem``/``v_mem`` for its memory, ``k``/``v``
    elsewhere), and the other copy's row is hidden too. (Its extra rows are all its own.)"""
    key_pos, layout, q_start = inputs.key_pos, inputs.layout, inputs.q_start
    assert key_pos is not None and inputs.q.shape[2] == 1
    seen = layout.visible_to(q_start, key_pos)  # (Tk,)
    used = {"k": seen, "v": seen}
    if inputs.k_mem is not None:  # with v_mem (attend takes them as a pair)
        memory = key_pos < (0 if layout.block_size is None else q_start // layout.block_size * layout.block_size)
        own, read_from_memory = seen & ~memory, seen & memory
        used = {"k": own, "v": own, "k_mem": read_from_memory, "v_mem": read_from_memory}
    zero = torch.zeros((), dtype=inputs.k.dtype, device=inputs.k.device)
    return inputs.replace(**{name: torch.where(mask[:, None], getattr(inputs, name), zero) for name, mask in used.items()})


def _reached_by_non_finite(inputs: AttentionInputs) -> Tensor:
    """(B, H, Tq, Dv): the outputs a visible non-finite key (the whole row) or value (its
    column) reaches, for keys at explicit positions (any order: a mask, not ranges)."""
    q, k, v, layout = inputs.q, inputs.k, inputs.v, inputs.layout
    q_pos = torch.arange(inputs.q_start, inputs.end, device=q.device)
    k_pos = inputs.key_positions()
    visible = layout.visible(q_pos[:, None], k_pos[None, :])  # (Tq, Tk)
    sources = [(visible, k, v)]
    if inputs.k_mem is not None:
        assert inputs.v_mem is not None
        memory = layout.is_memory(q_pos[:, None], k_pos[None, :])
        sources = [(visible & ~memory, k, v), (visible & memory, inputs.k_mem, inputs.v_mem)]
    if inputs.extra_k is not None:
        nb, f = inputs.extra_k.shape[2:4]
        q_block = layout.block_start(q_pos) // (layout.block_size or 1)
        mine = (torch.arange(nb * f, device=q.device) // max(f, 1))[None, :] == (q_block - q_block[0])[:, None]
        extra_v = inputs.extra_v if inputs.extra_v is not None else inputs.extra_k
        sources.append((mine, inputs.extra_k.flatten(2, 3), extra_v.flatten(2, 3)))
    reached = None
    for seen, keys, values in sources:
        seen = seen.to(q.dtype)
        bad_k = (~torch.isfinite(keys)).any(-1).to(q.dtype)  # (B, H, Tk)
        bad_v = (~torch.isfinite(values)).to(q.dtype)  # (B, H, Tk, Dv)
        part = ((seen @ bad_k[..., None]) > 0) | ((seen @ bad_v) > 0)  # (B, H, Tq, Dv)
        reached = part if reached is None else reached | part
    assert reached is not None
    return reached


def dense(q, k, v, *, scale, backend="auto"):
    """Unmasked attention of every query to every key, through ``backend`` (K/V may have
    fewer heads than ``q``, as in :func:`attend`)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    call = AttentionCall(q.device.type, q.dtype, BlockLayout(), needs_grad, False, False, q.shape[-1], v.shape[-1])
    impl = resolve_backend_once(backend, call)
    note_resolved(impl.name)
    if not torch.compiler.is_compiling() and _CHECK_FINITE.get():  # eager only (see attend)
        _refuse_non_finite(q=q, k=k, v=v)
    return impl.dense(q, k, v, scale=scale)


__all__ = [
    "AttentionCall", "AttentionInputs", "Backend", "BackendRecord", "BackendUnavailable", "BlockLayout", "Support", "TOLERANCES", "Tolerance",
    "attend", "check_backend_name", "check_finite", "dense", "explain", "forget_resolutions", "get_backend", "isolating_non_finite",
    "list_backends", "propagate_non_finite", "record_backends",
    "register_backend", "repeat_kv", "resolve_backend", "resolve_backend_name", "takes_key_positions", "takes_relative_keys",
    "use_backend",
]
