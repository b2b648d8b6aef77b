"""``memzoo.ops.propagate_non_finite()``: attention without the NaN/inf isolation.

Its contract: with every key and value finite, the same outputs and gradients as the
default (which isolates); with non-finite ones, an output the isolation leaves finite is
the same or non-finite, never another finite value. The isolation runs on two routes,
and both are held to it: on the CPU, eagerly, only when a sum says a tensor is not
finite; in compiled graphs and on accelerators, always (``_all_finite`` forced False
here stands in for those). Also: the switch reaches compiled graphs and Dynamo retraces
when it flips; what it removes from a compiled graph; the context manager itself."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import ops
from memzoo.errors import InputError
from memzoo.ops import AttentionInputs, BlockLayout
from test_key_positions import scrambled
from test_nan_causality import BACKENDS, OPTIONS, backbone, runnable_backends
from test_ops import _inputs, calls
from test_relative_keys import with_relative

torch.set_num_threads(1)


TRAINING_BACKENDS = runnable_backends(training=True)
#: where the isolation runs: only when a tensor is not finite (the CPU, eagerly), or always
#: (compiled graphs and accelerators: ``_all_finite`` forced False stands in for them)
ROUTES = [pytest.param(False, id="cpu-eager-route"), pytest.param(True, id="always-masked-route")]


@pytest.fixture
def always_masked(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(ops, "_all_finite", lambda *tensors: False)
    return request.param


def _outputs_and_grads(bb, x):
    y, _ = bb(x)
    return y.detach(), torch.autograd.grad(y.square().sum(), list(bb.parameters()), allow_unused=True)


@pytest.mark.parametrize("always_masked", ROUTES, indirect=True)
@pytest.mark.parametrize("backend", TRAINING_BACKENDS)
@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_propagating_gives_the_same_outputs_and_gradients_on_finite_input(variant: str, backend: str, always_masked: bool) -> None:
    """Every registered variant, bit for bit: on the always-masked route the default runs
    the isolation (zeroed copies, outputs marked) and propagating does not."""
    bb = backbone(variant, backend)
    bb.eval()  # no random draws (FAM's position offsets): both runs see the same inputs
    x = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(4))
    y, grads = _outputs_and_grads(bb, x)
    with ops.propagate_non_finite():
        assert not ops.isolating_non_finite()
        y_p, grads_p = _outputs_and_grads(bb, x)
    assert ops.isolating_non_finite()
    assert torch.equal(y, y_p), f"{variant}/{backend}: outputs differ without the isolation"
    for (name, _), g, g_p in zip(bb.named_parameters(), grads, grads_p):
        assert (g is None) == (g_p is None) and (g is None or torch.equal(g, g_p)), f"{variant}/{backend}: gradient of {name}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the route is fixed per test
@given(call=calls(), seed=st.integers(0, 1000), data=st.data())
@pytest.mark.parametrize("always_masked", ROUTES, indirect=True)
def test_propagating_keeps_what_the_isolation_leaves_finite_or_makes_it_non_finite(always_masked, call, seed, data) -> None:
    """NaN/±inf anywhere in keys, values, memory tensors or extra rows, for any layout call
    (sinks, memory, extra rows, relative keys, keys at explicit positions, grouped-query
    heads): where both outputs are finite they are equal."""
    size, window, sinks, tq, tk, q_start, extra, memory = call
    layout = BlockLayout(size, window, sinks)
    nb = layout.n_query_blocks(q_start, tq)
    ins = {name: t.detach() for name, t in _inputs(tq, tk, nb, extra, memory, seed).items()}
    if data.draw(st.booleans(), label="relative keys"):
        ins = {name: t.detach() for name, t in with_relative(ins, layout, q_start, seed).items()}
    key_pos = None
    if "rel_k" not in ins and data.draw(st.booleans(), label="keys at explicit positions"):
        mixed, key_pos, _, _ = scrambled(ins, layout, q_start, data.draw(st.integers(0, 3), label="unseen rows"), seed)
        ins = {name: t.detach() for name, t in mixed.items()}
    kv_names = [n for n in ("k", "v", "k_mem", "v_mem", "extra_k", "extra_v") if n in ins]
    if data.draw(st.booleans(), label="grouped-query heads"):
        ins.update({n: ins[n][:, :1].contiguous() for n in kv_names})  # 3 query heads read 1 key/value head
    for _ in range(data.draw(st.integers(1, 3), label="non-finite entries")):
        t = ins[data.draw(st.sampled_from(kv_names), label="tensor")]
        where = tuple(data.draw(st.integers(0, n - 1)) for n in t.shape)
        t[where] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    for backend in BACKENDS:
        if backend == "reference":
            continue  # the oracle always isolates
        try:
            with torch.no_grad():
                isolated = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=backend, key_pos=key_pos)
        except (ops.BackendUnavailable, NotImplementedError):
            continue
        with torch.no_grad(), ops.propagate_non_finite():
            propagated = ops.attend(**ins, layout=layout, q_start=q_start, scale=0.7, backend=backend, key_pos=key_pos)
        both = torch.isfinite(isolated) & torch.isfinite(propagated)  # elsewhere one of them is not finite
        torch.testing.assert_close(propagated[both], isolated[both], atol=1e-9, rtol=1e-9, msg=backend)


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
    it as it is, eagerly and in a compiled function, which is retraced, not reused, when
    the setting flips back. A call long enough for sdpa's block-gathered kernels (its
    small compiled calls isolate inside the backend: below)."""
    q, k, v = (torch.randn(1, 2, 200, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    v[0, 1, 150, 2] = float("nan")
    layout = BlockLayout(block_size=4, window=4)
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
        again = run(q, k, v)  # the graph traced under propagate_non_finite() is not reused outside it
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


@pytest.mark.parametrize("length", [
    12,  # a small call: sdpa's one masked call in plain ops (math_sdpa), which isolates itself
    200,  # block-gathered SDPA kernel calls: the dispatcher's isolation
])
def test_propagating_takes_the_finiteness_tests_out_of_compiled_graphs(length: int) -> None:
    """What propagating saves in a compiled graph: every ``isfinite`` of the isolation."""
    q, k, v = (torch.randn(1, 2, length, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    layout = BlockLayout(block_size=4, window=4)

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
                assert ops.isolating_non_finite()
            assert not ops.isolating_non_finite()
            raise RuntimeError("inside")
    assert ops.isolating_non_finite()
    with pytest.raises(TypeError, match="takes a bool"):
        with ops.propagate_non_finite(1):  # type: ignore[arg-type]
            pass
    assert ops.isolating_non_finite()


def test_check_finite_still_refuses_when_propagating() -> None:
    bb = backbone("bswa", "sdpa")
    x = torch.randn(1, 8, 16)
    x[0, 5] = float("nan")
    with torch.no_grad(), ops.propagate_non_finite(), ops.check_finite(), pytest.raises(InputError, match="NaN/inf"):
        bb(x)
