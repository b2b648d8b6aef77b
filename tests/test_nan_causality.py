"""Issue #14 item 9: a NaN or inf in a backbone's input never reaches earlier
positions in one call (masked keys contribute exact zeros), on every backend, as
when streaming; ``memzoo.ops.check_finite()`` refuses such input when asked."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import ops
from memzoo.errors import InputError

torch.set_num_threads(1)
#: every registered variant at its first conformance setting (small, block_size 4)
OPTIONS = {name: dict(memzoo.get_variant(name).config.conformance_options[0]) for name in memzoo.list_variants()}


def runnable_backends(names: list[str] | None = None, dtype: torch.dtype = torch.float32) -> list[str]:
    """Of ``names`` (default: every registered backend), those that run inference on this CPU in ``dtype``."""
    out = []
    for name in memzoo.list_backends() if names is None else names:
        try:
            ops.resolve_backend_name(name, device="cpu", dtype=dtype, training=False)
        except ops.BackendUnavailable:
            continue
        out.append(name)
    return out


BACKENDS = runnable_backends()


def backbone(variant: str, backend: str):
    torch.manual_seed(0)
    return memzoo.build_backbone(variant, d_model=16, n_layers=2, n_heads=2, block_size=4, backend=backend, **OPTIONS[variant])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(OPTIONS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_never_reaches_earlier_positions(variant: str, backend: str, bad: float) -> None:
    bb = backbone(variant, backend)
    torch.manual_seed(1)
    x = torch.randn(2, 23, 16)
    at = 13
    x[0, at, 3] = bad
    with torch.no_grad():
        y, _ = bb(x)
        prefix, _ = bb(x[:, :at])
        clean, _ = bb(torch.where(torch.isfinite(x), x, 0.0))
    assert torch.isfinite(y[0, :at]).all(), f"{variant}/{backend}: positions before {at} became non-finite"
    torch.testing.assert_close(y[:, :at], prefix, atol=1e-5, rtol=1e-5)
    assert not torch.isfinite(y[0, at]).all()
    torch.testing.assert_close(y[1], clean[1], atol=1e-5, rtol=1e-5)  # the other sequence of the batch is untouched


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_backends_and_streaming_agree_on_where_a_nan_reaches(variant: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 30, 16)
    x[0, 9] = float("nan")
    with torch.no_grad():
        ref, _ = backbone(variant, "reference")(x)
        state, parts = None, []
        bb = backbone(variant, "reference")
        for chunk in x.split(3, dim=1):
            out, state = bb(chunk, state)
            parts.append(out)
        streamed = torch.cat(parts, dim=1)
        pattern = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(streamed), pattern)
        torch.testing.assert_close(streamed[pattern], ref[pattern], atol=1e-5, rtol=1e-5)
        for backend in BACKENDS:
            y, _ = backbone(variant, backend)(x)
            assert torch.equal(torch.isfinite(y), pattern), backend
            torch.testing.assert_close(y[pattern], ref[pattern], atol=1e-5, rtol=1e-5)


@settings(max_examples=10)
@given(at=st.integers(0, 19), length=st.integers(1, 20), value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       variant=st.sampled_from(sorted(OPTIONS)))
def test_fuzz_causality_holds_for_any_input(at: int, length: int, value: float, variant: str) -> None:
    at = min(at, length - 1)
    bb = backbone(variant, BACKENDS[-1] if "sdpa" not in BACKENDS else "sdpa")
    x = torch.randn(1, length, 16, generator=torch.Generator().manual_seed(at))
    x[0, at] = value
    with torch.no_grad():
        y, _ = bb(x)
    assert torch.isfinite(y[0, :at]).all()


def test_check_finite_refuses_non_finite_input_when_asked() -> None:
    bb = backbone("bswa", "reference")
    x = torch.randn(1, 8, 16)
    x[0, 5] = float("nan")
    with torch.no_grad():
        bb(x)  # accepted by default (and causal)
        with ops.check_finite(), pytest.raises(InputError, match="NaN/inf"):
            bb(x)
        with ops.check_finite():
            bb(torch.randn(1, 8, 16))  # finite input passes


def test_finite_values_whose_sum_overflows_give_the_backend_result() -> None:
    """The dispatcher's finiteness check is a sum: an overflowing sum of finite values
    takes the slower path, which must give exactly the backend's own result."""
    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    v = torch.full((1, 2, 8, 4), 3e38)
    layout = ops.BlockLayout(block_size=4, window=4)
    for backend in BACKENDS:
        direct = ops.get_backend(backend).attend(ops.AttentionInputs(q, k, v, layout, q_start=0, scale=0.5))
        routed = ops.attend(q, k, v, layout=layout, q_start=0, scale=0.5, backend=backend)
        assert torch.equal(torch.isfinite(routed), torch.isfinite(direct)), backend
        assert torch.equal(routed[torch.isfinite(direct)], direct[torch.isfinite(direct)]), backend


@pytest.mark.parametrize("variant,options,reach", [
    ("bswa", {"memory_blocks": 1}, 20),  # (block of 10 + n_layers·m + 1)·L = (2 + 2 + 1)·4
    ("sinks", {"num_sinks": 2, "window": 3}, 15),  # 10 + n_layers·(W - 1) + 1
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("static", [False, True])
def test_a_non_finite_token_is_forgotten_once_out_of_reach_when_decoding(
    variant: str, options: dict, reach: int, bad: float, static: bool
) -> None:
    """Decoding token by token, a non-finite input stays in the ring buffer's stale rows
    after no query can see it any more: it must reach no later output (with
    ``ring.static_shapes`` every row is handed to the attention, stale ones included). Past
    its reach the outputs are finite and equal those of the same stream with that token clean."""
    torch.manual_seed(0)
    bb = memzoo.build_backbone(variant, d_model=16, n_layers=2, n_heads=2, block_size=4, **options)
    x = torch.randn(1, 36, 16)
    clean = x.clone()
    x[0, 10, 2] = bad
    outs = {}
    with torch.no_grad(), memzoo.ring.static_shapes() if static else contextlib.nullcontext():
        for name, xs in (("bad", x), ("clean", clean)):
            state, ys = None, []
            for i in range(xs.shape[1]):
                y, state = bb(xs[:, i : i + 1], state)
                ys.append(y)
            outs[name] = torch.cat(ys, dim=1)
    assert not torch.isfinite(outs["bad"][0, 10]).all()
    assert torch.isfinite(outs["bad"][0, reach:]).all(), f"{variant}: the token at 10 still reaches outputs past {reach}"
    torch.testing.assert_close(outs["bad"][0, reach:], outs["clean"][0, reach:], atol=1e-5, rtol=1e-5)
    assert bb.decodes_in_ring_order(reach, 1)  # these steps read the ring in slot order


# ------------------------------------------------ memzoo.ops.propagate_non_finite()
def _trainable(name: str) -> bool:
    try:
        ops.resolve_backend_name(name, device="cpu", dtype=torch.float32, training=True)
    except ops.BackendUnavailable:
        return False
    return True


TRAINING_BACKENDS = [name for name in BACKENDS if _trainable(name)]


def _loss_and_grads(bb, x):
    y, _ = bb(x)
    loss = y.square().sum()
    return y.detach(), torch.autograd.grad(loss, list(bb.parameters()), allow_unused=True)


@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_propagating_gives_the_same_outputs_and_gradients_on_finite_input(variant: str, backend: str) -> None:
    """Without the isolation a call runs the same backend on the same finite inputs: the
    outputs and gradients are the same, bit for bit, for every registered variant."""
    bb = backbone(variant, backend)
    bb.eval()  # no random draws (FAM's position offsets): both runs see the same inputs
    x = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(4))
    y, grads = _loss_and_grads(bb, x)
    with ops.propagate_non_finite():
        assert not ops.NON_FINITE.isolate
        y_p, grads_p = _loss_and_grads(bb, x)
    assert ops.NON_FINITE.isolate
    assert torch.equal(y, y_p), f"{variant}/{backend}: outputs differ without the isolation"
    for (name, _), g, g_p in zip(bb.named_parameters(), grads, grads_p):
        assert (g is None) == (g_p is None) and (g is None or torch.equal(g, g_p)), f"{variant}/{backend}: gradient of {name}"


def _recorded_values(monkeypatch, backend: str) -> list[torch.Tensor]:
    """The ``v`` every call of ``backend`` receives from the dispatcher."""
    impl = ops.get_backend(backend)
    seen: list[torch.Tensor] = []
    real = type(impl).attend
    monkeypatch.setattr(impl, "attend", lambda inputs: seen.append(inputs.v) or real(impl, inputs))
    return seen


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "traced"])
def test_propagating_hands_the_backend_the_inputs_as_they_are(monkeypatch, compiled: bool) -> None:
    """By default a NaN value the first queries may not see is zeroed before the backend
    runs and reaches no earlier query; under ``propagate_non_finite()`` the backend gets
    it as it is (eagerly and while torch.compile traces). A call long enough for sdpa's
    block-gathered kernels: its small compiled calls isolate inside the backend (below)."""
    q, k, v = (torch.randn(1, 2, 200, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    v[0, 1, 150, 2] = float("nan")
    layout = ops.BlockLayout(block_size=4, window=4)
    seen = _recorded_values(monkeypatch, "sdpa")

    def attend(q, k, v):
        return ops.attend(q, k, v, layout=layout, q_start=0, scale=8**-0.5, backend="sdpa")

    run = torch.compile(attend, backend="eager", fullgraph=True) if compiled else attend
    torch._dynamo.reset()
    try:
        isolated = run(q, k, v)
        assert torch.isfinite(seen[-1]).all() and torch.isfinite(isolated[0, 1, :148]).all()
        with ops.propagate_non_finite():
            run(q, k, v)
        assert torch.isnan(seen[-1][0, 1, 150, 2]), "the backend did not get the NaN value under propagate_non_finite()"
        again = run(q, k, v)  # the graph traced under propagate is not reused outside it
        assert torch.isfinite(seen[-1]).all()
        assert torch.equal(again.isnan(), isolated.isnan())
    finally:
        torch._dynamo.reset()


def _graph_ops(fn, *args) -> set[str]:
    """The call targets of the graphs torch.compile traces for ``fn(*args)``."""
    names: set[str] = set()

    def collect(gm, example_inputs):
        names.update(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=collect, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    return names


@pytest.mark.parametrize("layout,length", [
    (ops.BlockLayout(block_size=4, window=4), 12),  # a small call: sdpa's one masked call in plain ops (math_sdpa)
    (ops.BlockLayout(block_size=4, window=4), 200),  # block-gathered SDPA kernel calls, the dispatcher's handling
])
def test_propagating_takes_the_finiteness_tests_out_of_compiled_graphs(layout, length: int) -> None:
    """What propagating saves in a compiled graph: every ``isfinite`` of the isolation
    (the dispatcher's, and sdpa's own in its small masked calls)."""
    q, k, v = (torch.randn(1, 2, length, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))

    def attend(q, k, v):
        return ops.attend(q, k, v, layout=layout, q_start=0, scale=8**-0.5, backend="sdpa")

    isolating = _graph_ops(attend, q, k, v)
    assert any("isfinite" in name for name in isolating), sorted(isolating)
    with ops.propagate_non_finite():
        propagating = _graph_ops(attend, q, k, v)
    assert not any("isfinite" in name for name in propagating), sorted(propagating)


def test_propagate_non_finite_restores_the_setting_and_takes_a_bool() -> None:
    with pytest.raises(RuntimeError, match="inside"):
        with ops.propagate_non_finite():
            with ops.propagate_non_finite(False):
                assert ops.NON_FINITE.isolate
            assert not ops.NON_FINITE.isolate
            raise RuntimeError("inside")
    assert ops.NON_FINITE.isolate
    with pytest.raises(TypeError, match="takes a bool"):
        with ops.propagate_non_finite(1):  # type: ignore[arg-type]
            pass
    assert ops.NON_FINITE.isolate


def test_check_finite_still_refuses_when_propagating() -> None:
    bb = backbone("bswa", "sdpa")
    x = torch.randn(1, 8, 16)
    x[0, 5] = float("nan")
    with torch.no_grad(), ops.propagate_non_finite(), ops.check_finite(), pytest.raises(InputError, match="NaN/inf"):
        bb(x)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_propagating_keeps_what_the_isolation_leaves_finite_or_makes_it_non_finite(data) -> None:
    """The contract of ``propagate_non_finite()`` with NaN/inf keys and values anywhere:
    an output the isolation leaves finite is the same (to float32 rounding) or non-finite
    without it; never another finite value."""
    length = data.draw(st.integers(2, 40), label="length")
    block = data.draw(st.sampled_from([2, 4, 8]), label="block")
    window = data.draw(st.sampled_from([None, block, 2 * block]), label="window")
    q, k, v = (torch.randn(1, 2, length, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for _ in range(data.draw(st.integers(1, 3), label="non-finite entries")):
        target = k if data.draw(st.booleans(), label="in k") else v
        head, pos, col = data.draw(st.integers(0, 1)), data.draw(st.integers(0, length - 1)), data.draw(st.integers(0, 3))
        target[0, head, pos, col] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    layout = ops.BlockLayout(block_size=block, window=window)
    for backend in TRAINING_BACKENDS:
        if backend == "reference":
            continue  # it always isolates
        isolated = ops.attend(q, k, v, layout=layout, q_start=0, scale=0.5, backend=backend)
        with ops.propagate_non_finite():
            propagated = ops.attend(q, k, v, layout=layout, q_start=0, scale=0.5, backend=backend)
        both = torch.isfinite(isolated) & torch.isfinite(propagated)  # elsewhere: non-finite in one of them
        torch.testing.assert_close(propagated[both], isolated[both], atol=1e-6, rtol=1e-6, msg=backend)
