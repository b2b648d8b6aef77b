"""Keys at explicit positions at the attention seam (``key_pos``): the key rows in any
order, each at a given position, plus rows no query may see (a ring buffer read in slot
order, with its stale and unwritten slots). Every backend that declares them equals the
ordinary call (keys in the layout's order) on the reference backend, outputs and every
input gradient, float64, hypothesis-driven over every layout feature; rows nobody sees
get no gradient and never reach a query, NaN included. Backends that do not implement
them say so, and ``auto`` passes them by."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from memzoo import ops
from memzoo.ops import AttentionCall, AttentionInputs, BackendUnavailable, BlockLayout
from memzoo.testing import assert_close

from test_ops import _inputs, calls, poison, routed_to_math_sdpa
from test_relative_keys import with_relative

F64 = torch.float64
ROWS = ("k", "v", "k_mem", "v_mem")  # the inputs with one row per key


def position_backends() -> list[str]:
    call = AttentionCall("cpu", F64, BlockLayout(4, 4), False, False, False, 4, 5, has_key_positions=True)
    return [n for n in ops.list_backends() if not ops.get_backend(n).not_supported_reasons(call)]


def unseen_positions(layout: BlockLayout, q_start: int, end: int, n: int, gen: torch.Generator) -> list[int]:
    """``n`` positions no query in ``[q_start, end)`` may see: at or after ``end`` (a
    ring's unwritten slots), or before every query's window and after the sinks (its
    stale ones)."""
    choices = [end, end + 1, end + 7]
    if layout.window is not None:
        lowest = int(layout.block_start(torch.tensor(q_start))) - layout.window  # the first query's window start
        choices += [p for p in range(layout.sinks, lowest)]
    picks = torch.randint(0, len(choices), (n,), generator=gen).tolist()
    return [choices[i] for i in picks]


def scrambled(ins: dict, layout: BlockLayout, q_start: int, n_unseen: int, seed: int, fill: float | None = None):
    """The call's key rows permuted, ``n_unseen`` rows at unseen positions mixed in (random
    values, or ``fill``), with ``key_pos``: new leaf tensors, and where each original row went."""
    q = ins["q"]
    tk, end = ins["k"].shape[2], q_start + q.shape[2]
    gen = torch.Generator().manual_seed(seed)
    pos = torch.cat([layout.key_positions(end, tk), torch.tensor(unseen_positions(layout, q_start, end, n_unseen, gen), dtype=torch.int64)])
    order = torch.randperm(tk + n_unseen, generator=gen)
    out = {}
    for name, t in ins.items():
        t = t.detach()
        if name in ROWS:
            junk = torch.randn(*t.shape[:2], n_unseen, t.shape[3], generator=gen, dtype=F64)
            if fill is not None:
                junk = torch.full_like(junk, fill)
            t = torch.cat([t, junk], dim=2)[:, :, order]
        out[name] = t.clone().requires_grad_(True)
    where = torch.argsort(order)  # original row i now stands at where[i]
    return out, pos[order], where[:tk], where[tk:]


@given(
    call=calls(), seed=st.integers(0, 1000), n_unseen=st.integers(0, 4), relative=st.booleans(), shared=st.booleans(),
)
def test_keys_at_explicit_positions_equal_the_ordered_call(call, seed, n_unseen, relative, shared):
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    nb = layout.n_query_blocks(q_start, tq)
    ins = _inputs(tq, tk, nb, extra, memory, seed)
    if relative:
        ins = with_relative(ins, layout, q_start, seed, shared, spare=0)
        # the rows may stand anywhere from position 0 on: the table covers every distance to 0
        probe = AttentionInputs(ins["q"], ins["k"], ins["v"], layout, q_start, 1.0, key_pos=layout.key_positions(q_start + tq, tk))
        if ins["rel_k"].shape[1] < probe.needed_distances():
            gen = torch.Generator().manual_seed(seed)
            more = torch.randn(ins["rel_k"].shape[0], probe.needed_distances() - ins["rel_k"].shape[1], 3, generator=gen, dtype=F64)
            ins["rel_k"] = torch.cat([ins["rel_k"].detach(), more], dim=1).requires_grad_(True)
    want = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend="reference")
    g_want = torch.autograd.grad((want * want.detach().sin()).sum(), list(ins.values()), allow_unused=True)
    mixed, key_pos, where, unseen = scrambled(ins, layout, q_start, n_unseen, seed)
    what = f"{layout} q_start={q_start} tq={tq} tk={tk} extra={extra} memory={memory} relative={relative} unseen={n_unseen}"
    for name in position_backends():
        call_ins = AttentionInputs(**mixed, layout=layout, q_start=q_start, scale=0.7, key_pos=key_pos)
        if ops.explain(call_ins.describe())[name]:  # e.g. sdpa's unbounded layouts with memory tensors
            continue
        got = ops.attend(**mixed, layout=layout, q_start=q_start, scale=0.7, backend=name, key_pos=key_pos)
        assert_close(got, want, f"{name} {what}: output")
        g_got = torch.autograd.grad((got * got.detach().sin()).sum(), list(mixed.values()), allow_unused=True)
        for key, a, e in zip(ins, g_got, g_want):
            if key in ROWS:
                assert a is not None
                assert_close(a[:, :, where], torch.zeros_like(a[:, :, where]) if e is None else e, f"{name} {what}: grad of {key}")
                assert not a[:, :, unseen].any(), f"{name} {what}: rows no query sees got a gradient ({key})"
            elif e is None:
                assert a is None or not a.any(), f"{name} {what}: {key} gets a gradient only on {name}"
            else:
                assert_close(a, e, f"{name} {what}: grad of {key}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("always_masked", [False, True])
def test_non_finite_rows_no_query_sees_never_reach_one(bad, always_masked, monkeypatch):
    """A ring's stale slot may hold what an earlier NaN left: it must not reach the query.
    (Eager CPU code checks finiteness first; compiled code and accelerators always take
    the masked path, forced here, which must also equal the plain call on finite rows.)"""
    if always_masked:
        monkeypatch.setattr(ops, "_all_finite", lambda *tensors: False)
    layout = BlockLayout(4, 4, 0)
    for q_start, tq, extra, memory in [(9, 1, 0, False), (9, 1, 2, False), (13, 3, 1, True)]:
        tk = q_start + tq - 4
        ins = _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, memory, seed=q_start + tq)
        want = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.5, backend="reference")
        for fill in (bad, None):
            mixed, key_pos, _, unseen = scrambled(ins, layout, q_start, 3, seed=tq, fill=fill)
            assert len(unseen) == 3
            for name in position_backends():
                got = ops.attend(**mixed, layout=layout, q_start=q_start, scale=0.5, backend=name, key_pos=key_pos)
                assert torch.isfinite(got).all(), f"{name}: a non-finite row no query sees reached a query"
                assert_close(got, want, f"{name} q_start={q_start} tq={tq} fill={fill}")


def test_a_non_finite_row_a_query_sees_reaches_exactly_those_queries():
    layout = BlockLayout(2, 2)
    ins = _inputs(4, 6, 2, 0, False, seed=3)
    ins = {k: t.detach() for k, t in ins.items()}
    ins["v"][0, 1, 3, 2] = float("nan")  # the key at position 3 (k rows are positions 0..5): seen by queries 3, 4, 5
    order = torch.tensor([5, 0, 3, 1, 4, 2])
    key_pos = torch.arange(6)[order]
    mixed = {**ins, "k": ins["k"][:, :, order], "v": ins["v"][:, :, order]}
    for name in position_backends():
        out = ops.attend(**mixed, layout=layout, q_start=2, scale=0.5, backend=name, key_pos=key_pos)  # queries 2..5
        nan = torch.isnan(out)
        assert not nan[:, :, 0].any(), f"{name}: query 2 does not see position 3"
        assert nan[0, 1, 1:, 2].all() and not nan[0, 1, 1:, [0, 1, 3, 4]].any(), f"{name}: exactly column 2 of queries 3-5"
        assert not nan[1].any() and not nan[0, [0, 2]].any()


def test_bad_key_positions_are_refused_with_what_is_valid():
    layout = BlockLayout(4, 4)
    ins = _inputs(2, 6, 1, 0, False, seed=1)
    base = dict(layout=layout, q_start=4, scale=0.5, backend="sdpa")
    for bad in (torch.arange(6, dtype=torch.int32), torch.arange(5), torch.arange(6.0), [0, 1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match=r"key_pos must be an int64 tensor of shape \(Tk,\) = \(6,\)"):
            ops.attend(**ins, **base, key_pos=bad)


def test_flex_and_xformers_say_why_not_and_auto_passes_them_by(monkeypatch):
    from memzoo.ops import xformers_backend as xf

    assert position_backends() == ["reference", "sdpa"]
    assert ops.takes_key_positions("sdpa") and ops.takes_key_positions("auto") and not ops.takes_key_positions("flex")
    call = AttentionCall("cpu", torch.float32, BlockLayout(4, 4), False, False, False, 4, 4, has_key_positions=True)
    assert any("explicit positions" in r and "backend='sdpa'" in r for r in ops.get_backend("flex").not_supported_reasons(call))
    assert ops.resolve_backend("auto", call).name == "sdpa"
    with pytest.raises(BackendUnavailable, match="keys at explicit positions"):
        ops.resolve_backend("flex", call)
    monkeypatch.setattr(xf.XformersBackend, "availability_reasons", lambda self, call: [])
    gpu = AttentionCall("cuda", torch.bfloat16, BlockLayout(128, 256), False, False, False, 64, 64, has_key_positions=True)
    assert any("explicit positions" in r for r in ops.get_backend("xformers").not_supported_reasons(gpu))
    assert ops.resolve_backend("auto", gpu).name == "sdpa"
    with ops.use_backend("flex"):
        assert not ops.takes_key_positions("auto")  # the context override decides


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none); the CPU tests above check every path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keys_at_explicit_positions_on_cuda(dtype):
    """A decode step over a ring in slot order on CUDA equals the reference there."""
    layout = BlockLayout(128, 128)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    start = 1000
    key_pos = start - (start - torch.arange(256, device="cuda")) % 256  # the ring after writing position `start`
    got = ops.attend(q, k, v, layout=layout, q_start=start, scale=0.125, backend="sdpa", key_pos=key_pos)
    want = ops.attend(q.double(), k.double(), v.double(), layout=layout, q_start=start, scale=0.125, backend="reference", key_pos=key_pos)
    tol = ops.get_backend("sdpa").tolerance(dtype)
    torch.testing.assert_close(got.double(), want, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("always_masked", [False, True])
def test_one_query_over_a_ring_sees_a_non_finite_row_it_sees_as_plain_attention(always_masked, monkeypatch):
    """A decode step over a ring in slot order: a NaN value the query sees reaches exactly
    its column, a NaN key it sees its whole output, as in plain attention; the same NaN in
    a row it may not see reaches nothing (the dispatcher zeroes such rows)."""
    if always_masked:  # compiled code and accelerators: always the zeroing path
        monkeypatch.setattr(ops, "_all_finite", lambda *tensors: False)
    layout = BlockLayout(4, 4)
    key_pos = torch.tensor([16, 9, 10, 11, 12, 13, 14, 15])  # query 16 sees 12 … 16; 9, 10, 11 are stale
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=F64) for n in (1, 8, 8))
    for row, stale in ((5, False), (2, True)):  # position 13 (seen), position 10 (stale)
        for field, col in (("v", 1), ("k", None)):
            kk, vv = k.clone(), v.clone()
            (vv if field == "v" else kk)[0, 0, row, 1] = float("nan")
            for name in position_backends():
                out = ops.attend(q, kk, vv, layout=layout, q_start=16, scale=0.5, backend=name, key_pos=key_pos)
                nan = torch.isnan(out)
                if stale:
                    assert not nan.any(), f"{name}: a stale {field} reached the query"
                elif field == "v":
                    assert nan[0, 0, 0, col] and nan.sum() == 1, f"{name}: a seen NaN value reaches its column only"
                else:
                    assert nan[0, 0].all() and not nan[0, 1].any(), f"{name}: a seen NaN key reaches the head's whole output"


@given(
    call=calls(), seed=st.integers(0, 1000), where=st.integers(0, 10**6),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), ring=st.booleans(), n_unseen=st.integers(0, 3),
)
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=0, bad=float("nan"), ring=False, n_unseen=0)  # a key hidden from the last block
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=2, bad=float("nan"), ring=False, n_unseen=0)  # a key every block sees
@example(call=(4, 4, 0, 1, 5, 8, 0, False), seed=0, where=16, bad=float("nan"), ring=True, n_unseen=3)  # a ring's stale key (position 1)
@example(call=(1, 0, 0, 1, 2, 1, 1, False), seed=0, where=2, bad=float("nan"), ring=False, n_unseen=0)  # one query, a NaN extra row
def test_small_compiled_calls_isolate_non_finite_as_eager(call, seed, where, bad, ring, n_unseen):
    """sdpa's small compiled calls (``math_sdpa``, fused by inductor) run the non-finite
    isolation themselves. With one NaN or ±inf anywhere among the keys, values and extra
    rows (and, over a ring, the rows no query sees), the traced call's outputs and every
    input gradient of a loss over the finite outputs equal the eager call's: NaN exactly
    where eager's are, equal elsewhere. (Before, a NaN key, even one no query sees, made
    every query gradient NaN through ``0 · NaN`` in the traced backward.) A call nobody
    isolates (one query over a ring, or seeing every key) must keep the rows it may not see
    from reaching it, traced as eagerly."""
    size, window, sinks, tq, tk, q_start, extra, _ = call
    layout = BlockLayout(size, window, sinks)
    ins = _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, False, seed)
    key_pos, unseen = None, torch.zeros(0, dtype=torch.int64)
    if ring:  # the rows in any order, with rows nobody sees (a ring buffer in slot order)
        ins, key_pos, _, unseen = scrambled(ins, layout, q_start, n_unseen, seed)
    plain = {k: t.detach().clone() for k, t in ins.items()}
    name, index = poison(plain, where, bad)
    names = list(plain)

    def run(*tensors):
        return ops.attend(**dict(zip(names, tensors)), layout=layout, q_start=q_start, scale=0.7, backend="sdpa", key_pos=key_pos)

    def output_and_grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in plain.values()]
        out = fn(*leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        grads = torch.autograd.grad((torch.where(torch.isfinite(out), out, 0.0) * weights).sum(), leaves, allow_unused=True)
        return [out.detach(), *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))]

    want = output_and_grads(run)
    torch._dynamo.reset()
    with routed_to_math_sdpa() as routed:
        got = output_and_grads(torch.compile(run, backend="eager", fullgraph=True))
    torch._dynamo.reset()
    assert routed, "the traced call did not take math_sdpa"
    what = f"{layout} q_start={q_start} tq={tq} tk={tk} extra={extra} ring={ring}: the {bad} in {name}[{index}]"
    # Calls the dispatcher does not isolate (a decode step over a ring; one query that sees
    # every key) are plain attention, and what a non-finite row the query sees makes of its
    # output and gradients is the kernel's own (flash gives 0 where every score is -inf, a
    # plain softmax NaN): there the rows the query may not see are what is checked.
    if tq == 1 and (ring or layout.one_query_sees_every_key(q_start, tq, tk)):
        hidden = ring and name in ROWS and index // plain[name].shape[3] % plain[name].shape[2] in unseen.tolist()
        if not hidden:
            return
        assert all(torch.isfinite(t).all() for t in got), f"{what}: a row the query may not see reached it"
    for label, g, w in zip(("output", *(f"grad of {n}" for n in names)), got, want):
        assert torch.equal(g.isnan(), w.isnan()), f"{what}: traced {label} is NaN elsewhere than eager's"
        assert_close(g.nan_to_num(), w.nan_to_num(), f"{what}: traced {label}")


@pytest.mark.parametrize("ring", [False, True], ids=["in order", "over a ring"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_query_with_memory_tensors_keeps_the_copy_it_does_not_read_out(ring, bad):
    """With memory tensors a query reads each position it sees from one copy (``k_mem`` /
    ``v_mem`` for its memory, ``k``/``v`` for its own block): a non-finite row in the other
    copy must not reach it, for one query (a decode step) in order and over a ring, on every
    backend that runs the call, with the eager CPU shortcuts and with the always-masked path
    of compiled code and accelerators. (The dispatcher used to pass a query that sees every
    position as "nothing masked", and the ring step zeroed only the positions it does not see.)"""
    from test_nan_causality import runnable_backends

    layout, q_start = BlockLayout(4, 4), 9  # the query at 9 sees 4 … 7 (memory) and 8, 9 (its block)
    tk = 6
    key_pos = layout.key_positions(q_start + 1, tk) if ring else None
    clean = {k: t.detach() for k, t in _inputs(1, tk, 1, 0, True, seed=5).items()}
    want = ops.attend(**clean, layout=layout, q_start=q_start, scale=0.5, backend="reference")
    names = position_backends() if ring else runnable_backends(dtype=F64)
    for name, row in (("k", 0), ("v", 1), ("k_mem", 4), ("v_mem", 5)):  # rows 0-3: positions 4-7, memory; 4, 5: 8, 9
        poisoned = {k: t.clone() for k, t in clean.items()}
        poisoned[name][0, 1, row, 2] = bad
        for always_masked in (False, True):
            with pytest.MonkeyPatch.context() as mp:
                if always_masked:
                    mp.setattr(ops, "_all_finite", lambda *tensors: False)
                for backend in names:
                    got = ops.attend(**poisoned, layout=layout, q_start=q_start, scale=0.5, backend=backend, key_pos=key_pos)
                    what = f"{backend}, {'ring' if ring else 'in order'}, always masked={always_masked}: the {bad} in {name}[{row}]"
                    assert torch.isfinite(got).all(), f"{what} reached the query"
                    assert_close(got, want, what)


@pytest.mark.parametrize("given", ["k_mem", "v_mem"])
def test_one_memory_tensor_alone_is_refused_with_what_is_valid(given):
    """``k_mem`` and ``v_mem`` are one copy of the keys and values: one alone was read by
    some paths and ignored by others (sdpa's ring step zeroed ``v`` at the memory positions
    for a ``v_mem`` it then did not read: wrong outputs on finite input)."""
    layout = BlockLayout(4, 4)
    ins = {k: t.detach() for k, t in _inputs(1, 6, 1, 0, True, seed=2).items()}
    ins.pop("v_mem" if given == "k_mem" else "k_mem")
    for key_pos in (None, layout.key_positions(10, 6)):
        for backend in position_backends():
            with pytest.raises(ValueError, match=rf"memory tensors come as a pair: k_mem .* and v_mem .*; got only {given}"):
                ops.attend(**ins, layout=layout, q_start=9, scale=0.5, backend=backend, key_pos=key_pos)
