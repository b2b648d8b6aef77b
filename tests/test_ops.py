"""The attention seam: the block-gathered SDPA path equals the dense-mask reference
for any layout, call offset, partial blocks, memory tensors and extra rows
(outputs and every input gradient, float64)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from memzoo import ops
from memzoo.ops import BlockLayout
from memzoo.testing import assert_close
from test_nan_causality import runnable_backends


@st.composite
def calls(draw):
    size = draw(st.integers(1, 6))
    window = draw(st.one_of(st.none(), st.integers(0, 13)))
    bounded = window is not None
    tq = draw(st.integers(1, 17))
    q_start = draw(st.integers(0, 20))
    sinks = draw(st.sampled_from([0, 0, 1, 2, 5]))
    s = min(sinks, q_start + tq)
    # the run after the sinks starts at or after them and covers every query not a sink;
    # keys reach back at most to position 0
    run_start = draw(st.integers(s, max(q_start, s)))
    tk = s + q_start + tq - run_start
    extra = draw(st.integers(0, 3)) if bounded else 0
    memory = draw(st.booleans()) if bounded else False
    return size if bounded else None, window, sinks, tq, tk, q_start, extra, memory


def _inputs(tq, tk, nb, extra, memory, seed, dv=5):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    b, h, d = 2, 3, 4
    q, k, v = rnd(b, h, tq, d), rnd(b, h, tk, d), rnd(b, h, tk, dv)
    ins = {"q": q, "k": k, "v": v}
    if memory:
        ins["k_mem"], ins["v_mem"] = rnd(b, h, tk, d), rnd(b, h, tk, dv)
    if extra:
        ins["extra_k"], ins["extra_v"] = rnd(b, h, nb, extra, d), rnd(b, h, nb, extra, dv)
    return ins


@given(call=calls(), seed=st.integers(0, 1000))
def test_sdpa_equals_reference(call, seed):
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    nb = layout.n_query_blocks(q_start, tq)
    assert_sdpa_equals_reference(_inputs(tq, tk, nb, extra, memory, seed), layout, q_start)


def assert_sdpa_equals_reference(ins: dict, layout: BlockLayout, q_start: int) -> None:
    """sdpa's output and every input gradient equal the reference's (float64 inputs)."""
    results = {}
    for name in ("reference", "sdpa"):
        out = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=name)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), list(ins.values()), allow_unused=True)
        results[name] = (out, [torch.zeros_like(t) if g is None else g for t, g in zip(ins.values(), grads)])
    assert_close(results["sdpa"][0], results["reference"][0], "output")
    for key, ga, gr in zip(ins, results["sdpa"][1], results["reference"][1]):
        assert_close(ga, gr, f"grad of {key}")


@given(call=calls(), seed=st.integers(0, 1000), where=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), always_masked=st.booleans())
@example(call=(4, 4, 2, 3, 13, 20, 0, False), seed=0, where=0, bad=float("nan"), always_masked=False)  # a NaN sink key
@example(call=(4, 4, 2, 3, 13, 20, 1, False), seed=1, where=1, bad=float("inf"), always_masked=True)  # an inf sink value
def test_a_non_finite_key_or_value_reaches_exactly_the_outputs_it_reaches_on_the_reference(
    call, seed, where, bad, always_masked
):
    """One NaN anywhere among the keys, values, memory tensors or extra rows (a sink row
    included), or an inf among the values: every backend's output is non-finite exactly
    where the reference's is, and equal to it elsewhere, on the eager CPU path and on the
    always-masked one that compiled code and accelerators take. (An infinite *key* makes a
    ±inf score, which math softmax and a fused kernel resolve differently: not compared.)"""
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    ins = {k: t.detach() for k, t in _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, memory, seed).items()}
    names = [k for k in ins if k != "q"]
    name = names[where % len(names)]
    target = ins[name]
    target.view(-1)[where // len(names) % target.numel()] = bad if name in ("v", "v_mem", "extra_v") else float("nan")
    want = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend="reference")
    finite = torch.isfinite(want)
    original = ops._all_finite
    try:
        if always_masked:
            ops._all_finite = lambda *tensors: False
        for name in runnable_backends(["sdpa", "flex"], torch.float64):
            got = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=name)
            assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite outputs differ from the reference's"
            assert_close(got[finite], want[finite], f"{name}: finite outputs")
    finally:
        ops._all_finite = original


@given(call=calls(), seed=st.integers(0, 1000), where=st.integers(0, 10**6),
       bad=st.sampled_from([None, float("nan"), float("inf")]))
@example(call=(4, 4, 2, 3, 13, 20, 1, False), seed=3, where=2, bad=float("nan"))  # sinks, extra rows
@example(call=(4, 4, 2, 3, 13, 20, 1, True), seed=3, where=2, bad=None)  # memory copies: the block path, compiled
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=1, bad=float("nan"))  # a NaN value hidden from the last block
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=0, bad=float("nan"))  # a NaN key hidden from the last block
def test_small_compiled_sdpa_calls_equal_reference(call, seed, where, bad):
    """Traced by torch.compile, sdpa runs a small call without memory tensors as one masked
    call in plain tensor ops (``math_sdpa``, which inductor fuses) with its own non-finite
    handling (with memory tensors, its compiled block path): outputs and every input
    gradient equal the reference; with a NaN key, or a NaN or inf value, anywhere (hidden
    or not), the output is non-finite exactly where the reference's is and equal to it
    elsewhere."""
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    ins = _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, memory, seed)
    names = list(ins)

    def run(*tensors, backend):
        return ops.attend(**dict(zip(names, tensors)), layout=layout, q_start=q_start, scale=0.7, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: run(*t, backend="sdpa"), backend="eager", fullgraph=True)
    with routed_to_math_sdpa() as routed:
        if bad is None:
            got = compiled(*ins.values())
            want = run(*ins.values(), backend="reference")
            assert bool(routed) == (not memory), f"math_sdpa {'taken' if routed else 'not taken'} with memory={memory}"
            assert_close(got, want, "output")
            weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for (key, t), ga, gr in zip(ins.items(), torch.autograd.grad((got * weights).sum(), list(ins.values()), allow_unused=True),
                                        torch.autograd.grad((want * weights).sum(), list(ins.values()), allow_unused=True)):
                # an input no query sees may get no gradient on one side and zeros on the other
                assert_close(torch.zeros_like(t) if ga is None else ga, torch.zeros_like(t) if gr is None else gr, f"grad of {key}")
        else:
            plain = {k: t.detach().clone() for k, t in ins.items()}
            poisonable = [k for k in names if k != "q"]
            name = poisonable[where % len(poisonable)]
            plain[name].view(-1)[where // len(poisonable) % plain[name].numel()] = bad if name in ("v", "v_mem", "extra_v") else float("nan")
            got = compiled(*plain.values())
            want = run(*plain.values(), backend="reference")
            finite = torch.isfinite(want)
            assert torch.equal(torch.isfinite(got), finite), f"non-finite outputs differ from the reference's ({name})"
            assert_close(got[finite], want[finite], "finite outputs")
    torch._dynamo.reset()


def _where_zeroed(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype))


def _masked_nan(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t.masked_fill(mask, float("nan"))


def _poisoned(call, seed, where, bad):
    """One call's layout, ``q_start`` and inputs (detached) with ``bad`` put into one entry
    of one key/value tensor (chosen by ``where``); also that tensor's name and the index."""
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    ins = {k: t.detach() for k, t in _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, memory, seed).items()}
    name, index = poison(ins, where, bad)
    return layout, q_start, ins, name, index


def poison(ins, where, bad):
    """Put ``bad`` into one entry (chosen by ``where``) of one of ``ins``' key/value tensors
    (not ``q``), in place: that tensor's name and the flat index."""
    poisonable = [k for k in ins if k != "q"]
    name = poisonable[where % len(poisonable)]
    index = where // len(poisonable) % ins[name].numel()
    ins[name].view(-1)[index] = bad
    return name, index


@contextlib.contextmanager
def routed_to_math_sdpa():
    """Within the block, the list it yields gets an entry for every call of sdpa's
    ``math_sdpa`` (its small compiled path ran)."""
    from memzoo.ops import sdpa as sdpa_mod

    routed: list[bool] = []
    real = sdpa_mod.math_sdpa

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        routed.append(True)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdpa_mod, "math_sdpa", recording)
        yield routed


@contextlib.contextmanager
def _spying_on_zeroing(*modules):
    """Within the block, the list it yields gets an entry for every ``zero_non_finite`` call
    made through ``modules`` (the isolation ran)."""
    calls_made: list[bool] = []
    real = ops.zero_non_finite

    def spy(t):
        calls_made.append(True)
        return real(t)

    with pytest.MonkeyPatch.context() as mp:
        for module in modules:
            mp.setattr(module, "zero_non_finite", spy)
        yield calls_made


@given(call=calls(), seed=st.integers(0, 1000), where=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]), compiled=st.booleans())
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=0, bad=float("nan"), compiled=True)  # a key hidden from the last block, math_sdpa
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=1, bad=float("inf"), compiled=False)  # a value, the eager isolation
@example(call=(4, 4, 2, 3, 13, 20, 1, True), seed=3, where=2, bad=float("nan"), compiled=True)  # sinks, memory, extra rows
def test_the_isolations_pass_through_gradient_equals_where(call, seed, where, bad, compiled):
    """The isolation replaces non-finite keys and values by 0 (``zero_non_finite``) and
    marks the outputs they reach NaN (``mark_non_finite``), both passing the gradient
    through unchanged (no masked copies, no saved mask). With one NaN or ±inf anywhere among
    the keys, values, memory tensors and extra rows, the output and every input gradient of
    a loss over the finite outputs equal, exactly, what ``torch.where(isfinite(t), t, 0)``
    and ``masked_fill`` give, 0 at the replaced entry: eagerly (the isolation every backend
    shares) and traced (sdpa's ``math_sdpa``, or the shared isolation with memory tensors)."""
    from memzoo.ops import sdpa as sdpa_mod

    layout, q_start, ins, name, index = _poisoned(call, seed, where, bad)
    names = list(ins)
    leaves = [t.requires_grad_(True) for t in ins.values()]

    def run(*tensors):
        return ops.attend(**dict(zip(names, tensors)), layout=layout, q_start=q_start, scale=0.7, backend="sdpa")

    def output_and_grads():
        torch._dynamo.reset()
        out = (torch.compile(run, backend="eager", fullgraph=True) if compiled else run)(*leaves)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        loss = (torch.where(torch.isfinite(out), out, 0.0) * weights).sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]

    with _spying_on_zeroing(ops, sdpa_mod) as isolated:
        got, got_grads = output_and_grads()
    with pytest.MonkeyPatch.context() as mp:
        for module in (ops, sdpa_mod):
            mp.setattr(module, "zero_non_finite", _where_zeroed)
            mp.setattr(module, "mark_non_finite", _masked_nan)
        want, want_grads = output_and_grads()
    torch._dynamo.reset()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), "outputs differ"
    for key, g, w in zip(names, got_grads, want_grads):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num()), (
            f"grad of {key} (the {bad} in {name}[{index}]): max difference {(g - w).nan_to_num().abs().max().item()}"
        )
    if isolated:  # the isolation ran (shared, or math_sdpa's): it zeroes keys too, so every gradient is finite
        assert all(torch.isfinite(g).all() for g in got_grads), "a gradient is not finite"
        assert got_grads[names.index(name)].reshape(-1)[index] == 0


@given(call=calls(), seed=st.integers(0, 1000), where=st.integers(0, 10**6),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
@example(call=(4, 4, 2, 3, 13, 20, 1, True), seed=3, where=2, bad=float("nan"))  # sinks, memory, extra rows
@example(call=(4, 4, 0, 12, 12, 0, 0, False), seed=0, where=0, bad=float("inf"))  # a key hidden from the last block
def test_the_isolation_is_transparent_to_the_backward(call, seed, where, bad):
    """For any gradient of the output (not only a loss's, which is 0 at NaN outputs), the
    isolated call's input gradients are exactly those of the same call on zeroed copies of
    the keys and values (where the isolation ran), and its outputs equal that call's
    wherever it did not mark them NaN."""
    layout, q_start, ins, name, _ = _poisoned(call, seed, where, bad)
    names = list(ins)
    zeroed = {k: _where_zeroed(t) for k, t in ins.items()}

    def output_and_grads(tensors):
        leaves = [t.clone().requires_grad_(True) for t in tensors.values()]
        out = ops.attend(**dict(zip(names, leaves)), layout=layout, q_start=q_start, scale=0.7, backend="sdpa")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
        return out.detach(), [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)]

    with _spying_on_zeroing(ops) as isolated:
        got, got_grads = output_and_grads(ins)
    if not isolated:  # nothing hidden from a query (one query seeing every key): plain attention, no isolation
        return
    want, want_grads = output_and_grads(zeroed)
    assert torch.isfinite(want).all()
    kept = ~got.isnan()
    assert torch.equal(got[kept], want[kept]), "outputs the isolation leaves unmarked differ from the zeroed call's"
    for key, g, w in zip(names, got_grads, want_grads):
        assert torch.equal(g, w), f"grad of {key} (the {bad} in {name}): max difference {(g - w).abs().max().item()}"


def test_reference_mask_by_hand():
    """L=2, W=2, 6 queries from position 0: the visible pattern drawn by hand."""
    layout = BlockLayout(2, 2)
    pos = torch.arange(6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layout.visible(pos[:, None], pos[None, :]), expected)
    memory = layout.is_memory(pos[:, None], pos[None, :]) & expected
    assert memory.sum() == 8  # blocks 1 and 2 each see a full 2-key previous block, 2 queries each


def test_sink_mask_by_hand():
    """L=1, W=2 (a query sees itself and the token before), 1 sink, 6 queries from 0."""
    layout = BlockLayout(1, 1, sinks=1)
    pos = torch.arange(6)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(layout.visible(pos[:, None], pos[None, :]), expected)


def test_sink_key_rows_and_their_positions():
    layout = BlockLayout(1, 1, sinks=2)
    assert layout.key_positions(end=9, n_keys=4).tolist() == [0, 1, 7, 8]  # sinks, then the run
    assert layout.key_positions(end=3, n_keys=3).tolist() == [0, 1, 2]  # they meet
    assert layout.key_positions(end=1, n_keys=1).tolist() == [0]
    with pytest.raises(ValueError, match="needs between 2 and 9 keys"):
        layout.key_positions(end=9, n_keys=1)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        BlockLayout(1, 1, sinks=-1)


def test_extra_rows_are_seen_only_by_their_block():
    layout = BlockLayout(2, 0)
    q = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    k = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    v = torch.zeros(1, 1, 4, 1, dtype=torch.float64)
    extra_k = torch.zeros(1, 1, 2, 1, 2, dtype=torch.float64)
    extra_v = torch.tensor([10.0, 20.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
    for backend in ("reference", "sdpa"):
        out = ops.attend(q, k, v, layout=layout, q_start=0, scale=1.0, extra_k=extra_k, extra_v=extra_v, backend=backend)
        # uniform scores: query 0 sees [extra0, k0] -> 10/2; query 1 sees [extra0, k0, k1] -> 10/3
        torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 10 / 3, 10.0, 20 / 3], dtype=torch.float64))


def test_unknown_backend_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*reference.*sdpa"):
        ops.get_backend("nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with ops.use_backend("nope"):
            pass


def test_sdpa_refuses_what_it_cannot_do():
    call = ops.AttentionCall("cpu", torch.float32, BlockLayout(None, None), False, True, False)
    assert ops.get_backend("sdpa").not_supported_reasons(call)
    with pytest.raises(ops.BackendUnavailable, match="sdpa.*cannot run"):
        ops.resolve_backend("sdpa", call)


HUGE = 2**40  # a configured window no input comes near


@pytest.mark.parametrize("size", [1, 4, 7])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("cached", [0, 5])
@pytest.mark.parametrize("extra,memory", [(0, False), (2, True)])
@pytest.mark.parametrize("tq", [1, 3, 23])
def test_huge_window_on_a_short_input_equals_reference(size, sinks, cached, extra, memory, tq):
    q_start = cached
    layout = BlockLayout(size, HUGE, sinks)
    tk = q_start + tq  # every key from position 0 (the sinks and the run meet)
    ins = _inputs(tq, tk, layout.n_query_blocks(q_start, tq), extra, memory, seed=size + 7 * tq)
    results = {}
    for name in ("reference", "sdpa"):
        out = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=name)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), list(ins.values()), allow_unused=True)
        results[name] = (out, [torch.zeros_like(t) if g is None else g for t, g in zip(ins.values(), grads)])
    assert_close(results["sdpa"][0], results["reference"][0], "output")
    for key, ga, gr in zip(ins, results["sdpa"][1], results["reference"][1]):
        assert_close(ga, gr, f"grad of {key}")


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("tq", [1, 3, 40])
def test_sdpa_work_follows_the_keys_that_exist_not_the_window(monkeypatch, size, tq):
    """Every SDPA call the backend makes sees at most F + s + min(W, cached + Tq) + L keys
    per query block, whatever the configured window W (2**40 here: gathering W rows would
    not fit in memory)."""
    seen: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append(k.shape[-2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    cached, extra, sinks = 6, 2, 1
    layout = BlockLayout(size, HUGE, sinks)
    tk = cached + tq
    nb = layout.n_query_blocks(cached, tq)
    ins = _inputs(tq, tk, nb, extra, memory=True, seed=3)
    out = ops.attend(**ins, layout=layout, q_start=cached, scale=0.5, backend="sdpa")
    out.sum().backward()
    assert seen, "the sdpa backend made no SDPA call"
    if size == 1 and nb > 1:  # token windows: one call over the call's keys (and their k_mem copy), no gathering
        bound = tq * extra + 2 * tk
    else:
        bound = extra + sinks + min(HUGE, tk) + size
    assert max(seen) <= bound, (seen, bound)


@pytest.mark.parametrize("name,options", [("xl", {"memory_len": 65536}), ("bswa", {"memory_blocks": 2**20})])
def test_a_huge_configured_memory_on_a_short_input_equals_reference(name, options):
    """Whole and streamed in chunks (cached keys then come from the state)."""
    import memzoo

    torch.manual_seed(0)
    model = memzoo.build_model(name, vocab_size=64, d_model=16, n_layers=1, n_heads=2, block_size=4, **options)
    tokens = torch.randint(0, 64, (1, 30))
    with ops.use_backend("reference"):
        expected = model(tokens).logits
    with ops.use_backend("sdpa"):
        actual = model(tokens).logits
        state, parts = None, []
        for chunk in tokens.split(7, dim=1):
            out = model(chunk, state)
            parts.append(out.logits)
            state = out.state
    assert_close(actual, expected, f"{name} {options} logits over 30 tokens")
    assert_close(torch.cat(parts, dim=1), expected, f"{name} {options} logits streamed in chunks of 7")


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("f,sinks", [(4, 0), (0, 0), (0, 3), (2, 3)])
def test_token_windows_cost_the_window_not_tq(monkeypatch, memory, f, sinks):
    """block_size=1 (token windows: the sinks variant, FAM's late queries): each SDPA call
    sees at most c·F extra + s sinks + (W + c) run keys (the last two twice with memory
    tensors), c = (W+1)//max(F, 2), instead of Tq·F + s + Tk: the cost
    follows the window, not Tq (one masked call over every key was quadratic in Tq, 3.5x
    bswa's step for sinks at T=4096 on an H200); and the result still equals the reference."""
    seen: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, **kw):  # type: ignore[no-untyped-def]
        seen.append(k.shape[-2])
        return real(q, k, v, **kw)

    window, tq, cached = 7, 121, 9
    layout = BlockLayout(1, window, sinks)
    ins = _inputs(tq, cached + tq, tq, f, memory, seed=11)  # keys: the sinks, then positions sinks.. end
    expected = ops.attend(**ins, layout=layout, q_start=cached, scale=0.6, backend="reference")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    actual = ops.attend(**ins, layout=layout, q_start=cached, scale=0.6, backend="sdpa")
    c = (window + 1) // max(f, 2)
    assert max(seen) <= c * f + (2 if memory else 1) * (sinks + window + c), seen
    assert_close(actual, expected, "output")
    grads = [torch.autograd.grad(o.square().sum(), list(ins.values())) for o in (actual, expected)]
    for key, ga, gr in zip(ins, *grads):
        assert_close(ga, gr, f"grad of {key}")


@given(window=st.integers(0, 9), f=st.integers(0, 3), sinks=st.sampled_from([0, 1, 3]), memory=st.booleans(),
       q_start=st.integers(0, 25), tq=st.integers(12, 60), gap=st.integers(0, 12), seed=st.integers(0, 1000))
@example(window=5, f=0, sinks=3, memory=False, q_start=20, tq=60, gap=4, seed=0)  # sinks, a gap, no extra rows
@example(window=4, f=0, sinks=3, memory=True, q_start=0, tq=60, gap=0, seed=1)  # sinks, memory copies, head chunks
@example(window=3, f=0, sinks=0, memory=True, q_start=7, tq=60, gap=0, seed=2)  # a plain token window
def test_long_token_window_calls_equal_reference(window, f, sinks, memory, q_start, tq, gap, seed):
    """block_size=1 calls long enough to be cut into chunks (with or without extra rows,
    sinks, memory copies, a gap between the sinks and the run, queries before and after the
    first key's window): outputs and every gradient equal the reference."""
    layout = BlockLayout(1, window, sinks)
    s = min(sinks, q_start + tq)
    run_start = min(s + gap, max(q_start, s))
    tk = s + q_start + tq - run_start
    assert_sdpa_equals_reference(_inputs(tq, tk, tq, f, memory, seed), layout, q_start)


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("q_start,cached", [(9, 9), (0, 0), (20, 6)])  # 0, 4 and 1 chunks see before the first key
def test_token_window_chunks_after_the_first_key_share_one_mask(monkeypatch, memory, q_start, cached):
    """In the chunked path above, the chunks whose window starts before the first key get a
    mask each and all the others one (c, ·) mask, broadcast (not one per chunk); outputs and
    every gradient equal the reference either way."""
    shapes: list[tuple[int, ...]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):  # type: ignore[no-untyped-def]
        shapes.append(tuple(attn_mask.shape))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    window, f, tq = 7, 4, 61
    c = (window + 1) // f
    layout = BlockLayout(1, window)
    ins = _inputs(tq, cached + tq, tq, f, memory, seed=5)
    expected = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.6, backend="reference")
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    actual = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.6, backend="sdpa")
    head = max(0, -(-(window - cached) // c))  # the chunks whose window starts before the first key
    assert [s[1] for s in shapes] == [n for n in (head, 1) if n], shapes  # masks: (1, chunks, c, ·)
    assert_close(actual, expected, "output")
    grads = [torch.autograd.grad((o * o.detach().cos()).sum(), list(ins.values())) for o in (actual, expected)]
    for key, ga, gr in zip(ins, *grads):
        assert_close(ga, gr, f"grad of {key}")


@pytest.mark.parametrize("case", ["v_rows", "negative_start", "missing_own_key", "extra_blocks", "mem_shape"])
def test_attend_refuses_inconsistent_shapes_on_every_backend(case):
    """A shape the backends disagree on is refused by the dispatcher with the shapes, never
    run: v with more rows than k ran on sdpa (and failed in a matmul on the reference); a
    negative q_start ran on the reference (the others refused with a garbled count)."""
    q, k, v = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    kw: dict = dict(layout=BlockLayout(2, 2), q_start=0, scale=0.5)
    if case == "v_rows":
        v = torch.randn(1, 1, 5, 4)
    elif case == "negative_start":
        kw["q_start"] = -2
    elif case == "missing_own_key":
        k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    elif case == "extra_blocks":  # queries [0, 4) touch 2 blocks
        kw.update(extra_k=torch.randn(1, 1, 1, 2, 4), extra_v=torch.randn(1, 1, 1, 2, 4))
    elif case == "mem_shape":
        kw.update(k_mem=torch.randn(1, 1, 3, 4), v_mem=torch.randn(1, 1, 3, 4))
    for name in ("reference", "sdpa", "flex"):
        with torch.no_grad(), pytest.raises(ValueError):
            ops.attend(q, k, v, **kw, backend=name)
