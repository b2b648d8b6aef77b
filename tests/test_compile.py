"""The decode step compiles: ``torch.compile(model.decode_step, fullgraph=True)`` traces
with no graph break for every registered variant and gives the eager logits and state.
A variant that cannot yet declares why, as ``compile_graph_breaks`` (a class attribute
of its backbone) or in :data:`KNOWN_GRAPH_BREAKS` below; the test then checks that it
does still break (so a fixed variant loses its opt-out) and that, with breaks, it still
equals eager. Traced with the ``eager`` backend: Dynamo's graph capture, no codegen
(fast); the benchmark compiles with inductor."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import memzoo
from memzoo import testing as kit

#: variants whose decode step breaks the graph today, with the reason (move into the
#: variant as ``compile_graph_breaks`` when its owner touches it)
KNOWN_GRAPH_BREAKS: dict[str, str] = {}

#: every variant with its first conformance options (tracing is slow-ish: ~0.5-3 s a case)
CASES = [pytest.param(name, dict(memzoo.get_variant(name).config.conformance_options[0]), id=name) for name in memzoo.list_variants()]


#: the kernel routing the sdpa backend takes: the CPU's, and the CUDA one (full-history
#: blocks and unbounded calls with Tq != Tk through ``causal_lower_right``) forced on the CPU
ROUTINGS = [pytest.param(False, id="cpu-routing"), pytest.param(True, id="cuda-routing")]


@pytest.fixture
def routing(request, monkeypatch):
    if request.param:
        from memzoo.ops.sdpa import SDPABackend

        monkeypatch.setattr(SDPABackend, "lower_right_devices", frozenset({"cpu", "cuda"}))
    return request.param


def graph_breaks_declared(name: str) -> str | None:
    return getattr(memzoo.get_variant(name).cls, "compile_graph_breaks", None) or KNOWN_GRAPH_BREAKS.get(name)


def prefilled(name, opts, length=6):
    model = kit.tiny_model(name, opts)
    tokens = kit.random_tokens(model, 2, length + 6, seed=3)
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :length])
    return model, tokens, state


@pytest.mark.parametrize("routing", ROUTINGS, indirect=True)
@pytest.mark.parametrize("name,opts", CASES)
def test_decode_step_compiles_without_graph_breaks(name, opts, routing):
    model, tokens, state = prefilled(name, opts)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.decode_step)(tokens[:, 6:7], state)
    reason = graph_breaks_declared(name)
    if reason is None:
        reasons = "; ".join(sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons}))
        assert explained.graph_break_count == 0, f"{name} decode step breaks the graph: {reasons}"
    else:
        assert explained.graph_break_count > 0, f"{name} no longer breaks the graph: remove its opt-out ({reason})"


@pytest.mark.parametrize("name,opts", CASES)
def test_compiled_decode_equals_eager(name, opts):
    model, tokens, state = prefilled(name, opts)
    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend="eager", fullgraph=graph_breaks_declared(name) is None, dynamic=True)
    eager_state = compiled_state = state
    with torch.no_grad():
        for i in range(6, 9):  # positions 6, 7, 8: crosses a block boundary (block_size 4)
            a, eager_state = model.decode_step(tokens[:, i : i + 1], eager_state)
            b, compiled_state = step(tokens[:, i : i + 1], compiled_state)
            kit.assert_close(b, a, f"{name}: compiled decode step {i} vs eager")
    kit.assert_states_equal(compiled_state, eager_state, f"{name}: state after compiled decode")
    torch._dynamo.reset()


@pytest.mark.parametrize("name,opts", CASES)
def test_compiled_decode_on_a_full_state_has_static_shapes_and_no_recompiles(name, opts):
    """Once a bounded variant's state is full (its ring buffers hold their capacity) a
    decode step is one graph, or one per kind of step (a block or segment that completes),
    whose tensors all have static shapes (only the position is a symbol): after a warm-up
    of every kind of step nothing recompiles. (What CUDA-graph replay of a decode step needs;
    an unbounded state, ``full``'s, grows by design.)"""
    model = kit.tiny_model(name, opts)
    tokens = kit.random_tokens(model, 1, 68, seed=5)
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :48])
        sizes, probe = [], state
        for i in range(48, 56):
            sizes.append(sum(t.numel() for t in probe.tensors()))
            probe = model.decode_step(tokens[:, i : i + 1], probe)[1]
    if all(b > a for a, b in zip(sizes, sizes[1:])):
        pytest.skip(f"{name}'s state grows with every token: its decode steps change shape by design")
    graphs: list[torch.fx.GraphModule] = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend=record)  # automatic dynamic shapes, as by default
    # a limit the test cannot reach: at the default (8) a step that recompiled at every
    # position would stop compiling during the warm-up and pass as "warm"
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        for i in range(48, 60):  # warm-up: every kind of step (blocks and segments of 4 complete)
            _, state = step(tokens[:, i : i + 1], state)
        warm = len(graphs)
        for i in range(60, 68):
            logits, state = step(tokens[:, i : i + 1], state)
    assert len(graphs) == warm, f"{name}: {len(graphs) - warm} recompilation(s) once warm"
    for gm in graphs:
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                assert all(isinstance(d, int) for d in value.shape), f"{name}: input {node.name} has dynamic shape {value.shape}"
    torch._dynamo.reset()


def test_compiled_attention_keeps_non_finite_keys_out_of_sight():
    """Inside a compiled graph the dispatcher's non-finite handling runs without a host
    sync and gives what eager gives: a NaN key reaches exactly the queries that see it."""
    from memzoo import ops

    q, k, v = (torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3))
    k[0, 0, 5, 1] = float("nan")
    layout = ops.BlockLayout(block_size=4, window=4)

    def attend(q, k, v):
        return ops.attend(q, k, v, layout=layout, q_start=0, scale=8**-0.5, backend="sdpa")

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="eager", fullgraph=True)(q, k, v)
    eager = attend(q, k, v)
    assert torch.equal(compiled.isnan(), eager.isnan()) and eager[0, 0, :4].isfinite().all() and eager[0, 0, 5].isnan().all()
    kit.assert_close(torch.nan_to_num(compiled), torch.nan_to_num(eager), "compiled vs eager attention with a NaN key")
    torch._dynamo.reset()


def _isolation_call(kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the layout arguments, the tensors) of one attention call of ``kind``."""
    from memzoo import ops

    g = torch.Generator().manual_seed(0)
    if kind == "small":  # sinks and extra rows, after the first blocks: sdpa's math_sdpa
        layout, q_start, tq = ops.BlockLayout(4, 4, 2), 8, 10
        nb = layout.n_query_blocks(q_start, tq)
        tensors = {n: torch.randn(2, 3, q_start + tq, 4, generator=g) for n in ("q", "k", "v")}
        tensors["q"] = tensors["q"][:, :, q_start:].contiguous()
        tensors.update(extra_k=torch.randn(2, 3, nb, 1, 4, generator=g), extra_v=torch.randn(2, 3, nb, 1, 4, generator=g))
        return dict(layout=layout, q_start=q_start), tensors
    if kind == "blocks":
        length = 200
        return dict(layout=ops.BlockLayout(block_size=4, window=4), q_start=0), {
            n: torch.randn(1, 2, length, 8, generator=g) for n in ("q", "k", "v")
        }
    layout, q_start, tq, heads = ops.BlockLayout(4, 8, 2), 20, 13, (2, 3)  # sinks, after the first blocks
    nb = layout.n_query_blocks(q_start, tq)
    shapes = dict(q=(tq, 4), k=(q_start + tq, 4), v=(q_start + tq, 5), k_mem=(q_start + tq, 4), v_mem=(q_start + tq, 5))
    tensors = {n: torch.randn(*heads, *shape, generator=g) for n, shape in shapes.items()}
    tensors.update(extra_k=torch.randn(*heads, nb, 1, 4, generator=g), extra_v=torch.randn(*heads, nb, 1, 5, generator=g))
    return dict(layout=layout, q_start=q_start), tensors


@pytest.mark.parametrize("kind", [
    "small",  # sdpa's small compiled call in plain tensor ops (math_sdpa), isolating by itself
    "blocks",  # block-gathered SDPA kernel calls
    "memory",  # memory tensors, extra rows and sinks, queries after the first blocks
])
def test_inductor_isolation_equals_eager(kind):
    """Compiled with inductor for the CPU (codegen, not only tracing), the dispatcher's
    branch-free isolation of non-finite keys and values gives eager's outputs and
    gradients, NaN patterns exactly, for finite inputs and a NaN in each key/value
    tensor, from one compiled graph (no recompile between them). (A ``torch.cond`` on
    finiteness made inductor 2.13 miscompile exactly these calls: docs/benchmarks.md.)
    sdpa's small compiled calls (``math_sdpa``) isolate by themselves, the same way."""
    from memzoo import ops

    where, tensors = _isolation_call(kind)
    names, q_start = list(tensors), where["q_start"]

    def attend(*ts):
        return ops.attend(**dict(zip(names, ts)), **where, scale=0.5, backend="sdpa")

    graphs: list[torch.fx.GraphModule] = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend=inductor, fullgraph=True)
    for case in [None, *names[1:]]:  # finite, then a NaN in k, v, ... in turn
        given = {n: t.clone() for n, t in tensors.items()}
        if case is not None:  # a row some query sees: the last key (its own), a memory row, a block's extra row
            row = {"k_mem": q_start - 2, "v_mem": q_start - 2, "extra_k": 1, "extra_v": 1}.get(case, -1)
            given[case][0, 1, row, ..., 0] = float("nan")
        runs = []
        for fn in (attend, compiled):
            leaves = [t.clone().requires_grad_() for t in given.values()]
            out = fn(*leaves)
            grads = torch.autograd.grad(out.nan_to_num().square().sum(), leaves)
            runs.append((out.detach(), *grads))
        assert case is None or runs[0][0].isnan().any(), f"{kind}: the NaN in {case} reaches no output (a vacuous case)"
        for name, want, got in zip(("output", *(f"d{n}" for n in names)), *runs):
            label = f"{kind}, NaN in {case}" if case else f"{kind}, finite"
            assert torch.equal(got.isnan(), want.isnan()), f"{label}: compiled {name} is NaN elsewhere than eager's"
            kit.assert_close(got.nan_to_num(), want.nan_to_num(), f"{label}: compiled {name} vs eager")
    assert len(graphs) == 1, f"{len(graphs)} graphs: the non-finite inputs recompiled"
    kernel = "scaled_dot_product_attention" in graphs[0].code
    assert kernel == (kind != "small"), f"{kind}: the graph {'calls' if kernel else 'does not call'} the SDPA kernel"
    torch._dynamo.reset()


def training_loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("routing", ROUTINGS, indirect=True)
@pytest.mark.parametrize("name,opts", CASES)
def test_training_step_compiles_without_graph_breaks_and_equals_eager(name, opts, routing):
    """A training step (forward over a sequence that crosses block boundaries, loss,
    backward) traces as one graph for every registered variant, and the compiled loss and
    every parameter gradient equal eager's. Token ids are checked on the device inside
    the graph (no host sync). With the CUDA routing too: its ``causal_lower_right`` bias
    broke every compiled training step on a GPU (seen on an H200, torch 2.11)."""
    check_compiled_training_step(name, opts)


@pytest.mark.parametrize("name,opts", CASES)
def test_training_step_compiles_and_equals_eager_when_propagating_non_finite(name, opts):
    """The same under :func:`memzoo.ops.propagate_non_finite` (``train.non_finite =
    "propagate"``), where the graph has no isolation of non-finite values: one graph, and
    the compiled loss and gradients equal eager's."""
    from memzoo import ops

    with ops.propagate_non_finite():
        check_compiled_training_step(name, opts)


def check_compiled_training_step(name, opts, *, backend="aot_eager", options=None):
    model = kit.tiny_model(name, opts)
    model.eval()  # no random draws (FAM's position offsets), so both runs see the same inputs
    tokens = kit.random_tokens(model, 2, 11, seed=5)
    eager = training_loss(model, tokens)
    want = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    torch._dynamo.reset()
    issue = getattr(memzoo.get_variant(name).cls, "compile_training_issue", None)
    try:
        compiled = torch.compile(training_loss, backend=backend, fullgraph=True, options=options)(model, tokens)
        got = torch.autograd.grad(compiled, list(model.parameters()), allow_unused=True)
    except RuntimeError as err:
        if issue is None or isinstance(err, torch._dynamo.exc.Unsupported):
            raise
        torch._dynamo.reset()
        return  # declared, and it still fails: the declaration stays true
    assert issue is None, f"{name}: the compiled training step now works: remove compile_training_issue ({issue})"
    kit.assert_close(compiled, eager, f"{name}: compiled training loss vs eager")
    for (pname, _), g, w in zip(model.named_parameters(), got, want):
        assert (g is None) == (w is None), f"{name}: {pname} has a gradient in one run only"
        if g is not None:
            kit.assert_close(g, w, f"{name}: compiled gradient of {pname}")
    torch._dynamo.reset()


def test_inductor_cpp_wrapper_training_step_equals_eager():
    """A tiny ``xl`` training step (memory tensors) compiled by inductor with
    ``cpp_wrapper``, as ``memzoo compare --compile`` compiles small steps: the loss and
    every gradient equal eager's. (The ``torch.cond`` isolation tried in ``8ecc781`` got
    these gradients wrong by up to 1.76x, silently; docs/benchmarks.md.)"""
    check_compiled_training_step("xl", dict(memzoo.get_variant("xl").config.conformance_options[0]),
                                 backend="inductor", options={"cpp_wrapper": True})


@pytest.mark.parametrize("name,opts", CASES)
def test_a_fresh_model_compiles_its_training_step_once(name, opts):
    """A model compiled before it ever ran eagerly (what ``memzoo compare --compile``
    does) traces its training step once: a cache filled on the first traced call (RoPE's
    per-device frequencies were) made Dynamo guard on its contents, and the second step
    recompiled the whole graph (7 s at the leaderboard size, 94 s for ``fam`` at the mid
    size, and cpp_wrapper's g++ again on top). New tokens each call."""
    model = kit.tiny_model(name, opts)
    compiled = torch.compile(training_loss, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in range(3):
                compiled(model, kit.random_tokens(model, 2, 11, seed=seed)).backward()
    except torch._dynamo.exc.RecompileError as err:
        pytest.fail(f"{name}: a second training step recompiled: {err}")
    finally:
        torch._dynamo.reset()


def test_compiled_graphs_take_rope_frequencies_already_on_the_device():
    """RoPE's frequencies are float64 on the host; a module's copy per device is made where
    the module is (built, or moved with ``.to()``), so a compiled graph reads that copy and
    never copies the frequencies itself (on CUDA a host-to-device copy in every call, and
    no CUDA-graph replay). Checked on the traced graph: no ``to`` of ``inv_freq``."""
    model = kit.tiny_model("bswa", dict(memzoo.get_variant("bswa").config.conformance_options[0]))
    model = model.to(torch.device("cpu"))
    copies = []

    def backend(gm, example_inputs):
        copies.extend(n.format_node() for n in gm.graph.nodes
                      if n.op in ("call_method", "call_function") and getattr(n.target, "__name__", n.target) == "to"
                      and "inv_freq" in str(n.args[0]))
        return gm

    torch._dynamo.reset()
    try:
        torch.compile(training_loss, backend=backend, fullgraph=True)(model, kit.random_tokens(model, 2, 11, seed=0))
    finally:
        torch._dynamo.reset()
    assert not copies, f"the compiled graph copies RoPE's frequencies: {copies}"
    rope = next(m for m in model.modules() if hasattr(m, "_on_device"))
    assert set(rope._on_device) == {torch.device("cpu")}
    moved = copy.deepcopy(model).to("meta")  # a move fills the new device's copy, float64
    rope = next(m for m in moved.modules() if hasattr(m, "_on_device"))
    assert rope._on_device[torch.device("meta")].dtype == torch.float64


def test_compiled_model_refuses_out_of_range_tokens():
    model = kit.tiny_model("bswa", dict(memzoo.get_variant("bswa").config.conformance_options[0]))
    torch._dynamo.reset()
    step = torch.compile(lambda t: model(t).logits, backend="eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 22\]"):
        step(torch.full((1, 4), 10**6, dtype=torch.long))
    torch._dynamo.reset()


def test_compiled_code_follows_use_backend():
    """The override is read while tracing and guarded: compiled code retraces for another
    ``use_backend`` instead of reusing the graph of the backend it was first traced with
    (which silently ran ``sdpa`` under ``use_backend("xformers")``, where eager refuses,
    and kept the first backend's declared features)."""
    from torch._dynamo.testing import CompileCounter

    from memzoo import ops

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    layout = ops.BlockLayout(block_size=4, window=4)

    def attend(q, k, v):
        return ops.attend(q, k, v, layout=layout, q_start=0, scale=0.5, backend="sdpa")

    counter = CompileCounter()
    compiled = torch.compile(attend, backend=counter, fullgraph=True)
    compiled(q, k, v)
    with ops.use_backend("xformers"), pytest.raises(Exception, match="xformers"):
        compiled(q, k, v)
    compiled(q, k, v)
    assert counter.frame_count == 1  # no override again: the first graph

    def features(x):
        return x * (2.0 if ops.takes_key_positions("sdpa") else 3.0)

    compiled = torch.compile(features, backend=CompileCounter(), fullgraph=True)
    x = torch.ones(2)
    assert torch.equal(compiled(x), x * 2)
    with ops.use_backend("flex"):  # flex does not take key positions
        assert torch.equal(compiled(x), x * 3)
    assert torch.equal(compiled(x), x * 2)
    torch._dynamo.reset()


def test_use_backend_in_threads_closing_out_of_order_leaves_no_override():
    """Two threads' use_backend blocks that close out of order (A enters, B enters, A
    exits, B exits) restored B's 'previous' (A's name): the process-wide override that
    compiled code reads stayed set for good, and every later compiled call ran that backend."""
    import threading

    from memzoo import ops
    from memzoo.ops import base

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with ops.use_backend("flex"):
            a_in.set()
            b_in.wait()
        a_out.set()

    def second():
        a_in.wait()
        with ops.use_backend("sdpa"):
            b_in.set()
            a_out.wait()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert base.BACKEND_OVERRIDE.name is None
