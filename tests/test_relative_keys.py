"""Relative-position keys at the attention seam (``rel_q``/``rel_k``, Transformer-XL's
terms (b)+(d), Shaw et al.'s relative keys): the reference backend against the formula
written out pair by pair, and every backend that declares them against the reference
for any layout, call offset, partial blocks, memory tensors, extra rows and sinks
(outputs and every input gradient, float64, hypothesis-driven). Backends that do not
implement them say so, and ``auto`` passes them by."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memzoo import ops
from memzoo.ops import AttentionCall, AttentionInputs, BackendUnavailable, BlockLayout
from memzoo.testing import assert_close

from test_ops import _inputs, calls

F64 = torch.float64


def with_relative(ins: dict, layout: BlockLayout, q_start: int, seed: int, shared_heads: bool = False, spare: int = 0) -> dict:
    q, k = ins["q"], ins["k"]
    b, h, tq, _ = q.shape
    probe = AttentionInputs(q, k, ins["v"], layout, q_start, 1.0)
    n = probe.needed_distances() + spare
    gen = torch.Generator().manual_seed(seed + 7)
    rel_q = torch.randn(b, h, tq, 3, generator=gen, dtype=F64).requires_grad_(True)
    rel_k = torch.randn(1 if shared_heads else h, n, 3, generator=gen, dtype=F64).requires_grad_(True)
    return {**ins, "rel_q": rel_q, "rel_k": rel_k}


def pairwise(ins: dict, layout: BlockLayout, q_start: int, scale: float) -> torch.Tensor:
    """The definition, one (query, key) pair at a time: no memory tensors, no extra rows."""
    q, k, v, rel_q, rel_k = (ins[n] for n in ("q", "k", "v", "rel_q", "rel_k"))
    tq, tk = q.shape[2], k.shape[2]
    end = q_start + tq
    k_pos = layout.key_positions(end, tk).tolist()
    rows = []
    for i in range(tq):
        p = q_start + i
        cols = []
        for j in range(tk):
            if bool(layout.visible(torch.tensor(p), torch.tensor(k_pos[j]))):
                rk = rel_k[:, p - k_pos[j]]  # (H or 1, Dr)
                cols.append(((q[:, :, i] * k[:, :, j]).sum(-1) + (rel_q[:, :, i] * rk).sum(-1)) * scale)
            else:
                cols.append(torch.full(q.shape[:2], float("-inf"), dtype=q.dtype))
        rows.append(torch.stack(cols, dim=-1))
    scores = torch.stack(rows, dim=-2)  # (B, H, Tq, Tk)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(
    "size,window,sinks,q_start,tq,tk",
    [(4, 4, 0, 0, 9, 9), (4, 6, 0, 7, 6, 11), (3, None, 0, 5, 4, 9), (None, None, 0, 2, 5, 7), (1, 3, 2, 9, 3, 7), (4, 4, 0, 9, 1, 10)],
)
def test_reference_equals_the_pairwise_definition(size, window, sinks, q_start, tq, tk):
    layout = BlockLayout(size, window, sinks)
    ins = with_relative(_inputs(tq, tk, 1, 0, False, seed=tq), layout, q_start, seed=tk, shared_heads=tq % 2 == 0)
    got = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.6, backend="reference")
    assert_close(got, pairwise(ins, layout, q_start, 0.6), f"reference with relative keys {layout} q_start={q_start}")


def relative_backends() -> list[str]:
    call = AttentionCall("cpu", F64, BlockLayout(4, 4), False, False, False, 4, 5, has_relative_keys=True)
    return [n for n in ops.list_backends() if n != "reference" and not ops.get_backend(n).not_supported_reasons(call)]


@given(call=calls(), seed=st.integers(0, 1000), shared=st.booleans(), spare=st.integers(0, 3))
def test_backends_equal_reference_with_relative_keys(call, seed, shared, spare):
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    nb = layout.n_query_blocks(q_start, tq)
    ins = with_relative(_inputs(tq, tk, nb, extra, memory, seed), layout, q_start, seed, shared, spare)
    want = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend="reference")
    g_want = torch.autograd.grad((want * want.detach().sin()).sum(), list(ins.values()), allow_unused=True)
    for name in relative_backends():
        trains = ops.get_backend(name).support.trains_on("cpu")
        with torch.set_grad_enabled(trains):  # an inference-only backend (flex on CPU) is checked forward
            reasons = ops.explain(AttentionInputs(**ins, layout=layout, q_start=q_start, scale=0.7).describe())[name]
            if reasons:  # e.g. sdpa's unbounded layouts with memory tensors
                continue
            got = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=name)
        what = f"{name} {layout} q_start={q_start} tq={tq} tk={tk} extra={extra} memory={memory}"
        assert_close(got, want, f"{what}: output")
        if not trains:
            continue
        g_got = torch.autograd.grad((got * got.detach().sin()).sum(), list(ins.values()), allow_unused=True)
        for key, a, e in zip(ins, g_got, g_want):
            if e is None:
                assert a is None or not a.any(), f"{what}: {key} gets a gradient only on {name}"
                continue
            assert_close(a, e, f"{what}: grad of {key}")


def test_flex_and_sdpa_implement_relative_keys_on_cpu():
    assert {"flex", "sdpa"} <= set(relative_backends())


def test_the_block_path_and_its_skew_are_exercised():
    """The synthetic grid above reaches the block-gathered relative path (several blocks)
    and the dense one; the shift by views equals an explicit gather."""
    from memzoo.ops.sdpa import skew

    x = torch.arange(3 * 9, dtype=F64).reshape(3, 9)  # L=3, N=9 -> 7 columns
    out = skew(x, 7)
    for o in range(3):
        for c in range(7):
            assert out[o, c] == x[o, c + 2 - o]
    layout = BlockLayout(4, 4)
    ins = with_relative(_inputs(13, 13, 4, 0, False, seed=0), layout, 0, seed=0)
    calls_seen = []
    real = ops.sdpa.relative_blocks
    try:
        ops.sdpa.relative_blocks = lambda inputs: calls_seen.append(1) or real(inputs)
        ops.attend(**ins, layout=layout, q_start=0, scale=0.5, backend="sdpa")
    finally:
        ops.sdpa.relative_blocks = real
    assert calls_seen == [1]


def test_bad_relative_inputs_are_refused_with_what_is_valid():
    layout = BlockLayout(4, 4)
    ins = with_relative(_inputs(6, 6, 2, 0, False, seed=1), layout, 0, seed=1)
    base = dict(layout=layout, q_start=0, scale=0.5, backend="sdpa")
    with pytest.raises(ValueError, match="need both rel_q"):
        ops.attend(**{**ins, "rel_k": None}, **base)
    with pytest.raises(ValueError, match=r"rel_k holds 5 distances .* distance 5 .* at least 6"):
        ops.attend(**{**ins, "rel_k": ins["rel_k"][:, :5]}, **base)
    with pytest.raises(ValueError, match=r"rel_q must be \(B, H, Tq, Dr\)"):
        ops.attend(**{**ins, "rel_q": ins["rel_q"][:, :, :2]}, **base)
    with pytest.raises(ValueError, match=r"rel_k must be \(H or 1, n, Dr\)"):
        ops.attend(**{**ins, "rel_k": ins["rel_k"][..., :2]}, **base)


def test_a_backend_without_relative_keys_says_so_and_auto_passes_it_by(monkeypatch):
    from memzoo.ops import xformers_backend as xf

    monkeypatch.setattr(xf.XformersBackend, "availability_reasons", lambda self, call: [])
    call = AttentionCall("cuda", torch.bfloat16, BlockLayout(128, 256), True, True, False, 64, 64, has_relative_keys=True)
    assert any("relative-position keys" in r and "backend='sdpa'" in r for r in ops.get_backend("xformers").not_supported_reasons(call))
    assert ops.resolve_backend("auto", call).name == "sdpa"
    plain = AttentionCall("cuda", torch.bfloat16, BlockLayout(128, 256), True, True, False, 64, 64)
    assert ops.resolve_backend("auto", plain).name == "xformers"
    with pytest.raises(BackendUnavailable, match="relative-position keys"):
        ops.resolve_backend("xformers", call)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none); the CPU tests above check every path")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_relative_keys_on_cuda(backend):
    """xl's shape of call (L=128, W=256, memory tensors) in float32 on CUDA, outputs and
    input gradients against the reference (flex trains there, through its score_mod)."""
    layout = BlockLayout(128, 256)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).cuda().requires_grad_(True)

    ins = {"q": rnd(1, 2, 640, 64), "k": rnd(1, 2, 640, 64), "v": rnd(1, 2, 640, 64), "k_mem": rnd(1, 2, 640, 64),
           "v_mem": rnd(1, 2, 640, 64), "rel_q": rnd(1, 2, 640, 64), "rel_k": rnd(2, 384, 64)}
    outs = {}
    for name in (backend, "reference"):
        out = ops.attend(**ins, layout=layout, q_start=0, scale=0.125, backend=name)
        outs[name] = (out, torch.autograd.grad((out * out.detach().sin()).sum(), list(ins.values())))
    tol = ops.get_backend(backend).tolerance(torch.float32)
    torch.testing.assert_close(outs[backend][0], outs["reference"][0], atol=tol.atol, rtol=tol.rtol)
    for key, a, e in zip(ins, outs[backend][1], outs["reference"][1]):
        torch.testing.assert_close(a, e, atol=tol.atol * 10, rtol=tol.rtol * 10, msg=f"grad of {key}")


@pytest.mark.parametrize(
    "size,window,q_start,tq,back,extra,memory",
    [(64, 64, 0, 150, 0, 0, True), (96, 40, 7, 200, 7, 2, False), (34, 20, 30, 100, 20, 0, True), (64, 0, 5, 140, 5, 1, False)],
)
def test_sdpa_block_parts_equal_reference(size, window, q_start, tq, back, extra, memory):
    """Blocks long enough to be scored in parts (``relative_parts``: 4 parts, or halves), with
    partial first/last blocks, memory tensors and extra rows: outputs and every gradient."""
    from memzoo.ops.sdpa import relative_parts

    assert len(relative_parts(size)) == (4 if size % 4 == 0 else 2) and relative_parts(8) == [(0, 8)]
    layout = BlockLayout(size, window)
    nb = layout.n_query_blocks(q_start, tq)
    ins = with_relative(_inputs(tq, back + tq, nb, extra, memory, seed=size), layout, q_start, seed=tq)
    outs = []
    for name in ("reference", "sdpa"):
        out = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.4, backend=name)
        outs.append((out, torch.autograd.grad((out * out.detach().cos()).sum(), list(ins.values()))))
    assert_close(outs[1][0], outs[0][0], f"{layout}: output")
    for key, a, e in zip(ins, outs[1][1], outs[0][1]):
        assert_close(a, e, f"{layout}: grad of {key}")


def test_a_non_finite_table_row_reaches_only_the_queries_that_see_its_distance():
    """As on the reference: an infinite rel_k row at a distance only one query sees (the
    others' keys at that distance do not exist) makes that query's output non-finite, no other."""
    layout = BlockLayout(4, 8)
    ins = with_relative(_inputs(12, 12, 3, 0, False, seed=3), layout, 0, seed=3)
    rel_k = ins["rel_k"].detach().clone()
    rel_k[:, 11] = float("inf")
    ins = {n: t.detach() for n, t in ins.items()} | {"rel_k": rel_k}
    bad = {}
    for name in relative_backends() + ["reference"]:
        out = ops.attend(**ins, layout=layout, q_start=0, scale=0.5, backend=name)
        bad[name] = (~torch.isfinite(out)).any(-1).any(0).any(0)  # (Tq,) queries with a non-finite output
    for name, rows in bad.items():
        assert torch.equal(rows, bad["reference"]), (name, rows.nonzero().flatten().tolist(), bad["reference"].nonzero().flatten().tolist())
    assert bad["reference"].sum() == 1


def test_relative_keys_are_opt_in_for_a_backend(monkeypatch):
    """A backend that does not declare relative-position keys is never handed them (its
    attend would drop the bias): it says why, and auto passes it by."""
    sdpa_cls = type(ops.get_backend("sdpa"))
    import dataclasses

    monkeypatch.setattr(sdpa_cls, "support", dataclasses.replace(sdpa_cls.support, relative_keys=False))
    call = AttentionCall("cpu", F64, BlockLayout(4, 4), False, False, False, 4, 4, has_relative_keys=True)
    assert any("relative-position keys are not declared by backend 'sdpa'" in r for r in ops.get_backend("sdpa").not_supported_reasons(call))
    assert not ops.takes_relative_keys("sdpa") and ops.takes_relative_keys("auto")
    assert ops.resolve_backend("auto", call).name != "sdpa"
