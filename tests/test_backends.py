"""Attention backends: declarations, the explaining dispatcher, and equivalence with the
reference backend, generated from the registry and from each backend's declaration.

* Model level: every registered variant x every entry of its ``conformance_options`` x
  every backend that declares it can run here x float32/float64: outputs (whole and
  streamed in chunks) and, where the backend trains on this device, every parameter
  gradient equal the reference within the backend's declared tolerance. GPU versions
  (bf16/fp16/fp32, flex and xformers kernels) skip on CPU with a reason.
* Mask level, on CPU, for the calls the registered variants really make (captured from
  tiny models) and for a grid of synthetic calls: FlexAttention's mask_mod and the exact
  xformers ``attn_bias`` objects (materialised) equal the reference layout, and the
  whole xformers path with a materialising kernel equals the reference (outputs and
  gradients). The CUDA lower-right SDPA split is run on CPU too.

Shape notation as in :mod:`memzoo.ops.layout`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

import memzoo
from memzoo import ops
from memzoo import testing as kit
from memzoo.ops import AttentionCall, BackendUnavailable, BlockLayout
from memzoo.ops import flex as flex_mod
from memzoo.ops import sdpa as sdpa_mod
from memzoo.ops import xformers_backend as xf

F32, F64 = torch.float32, torch.float64
CUDA = torch.cuda.is_available()
NO_CUDA = "needs a CUDA GPU (this machine has none); the CPU-checkable parts run in the tests above"

VARIANT_CASES = [
    pytest.param(name, i, id=f"{name}-{i}")
    for name in memzoo.list_variants()
    for i, _ in enumerate(memzoo.get_variant(name).config.conformance_options)
]


def options_of(name: str, i: int) -> dict[str, Any]:
    return dict(memzoo.get_variant(name).config.conformance_options[i])


def weighted_loss(logits: Tensor, seed: int = 1, rounded_to: torch.dtype | None = None) -> Tensor:
    """A fixed random weighting of the logits; ``rounded_to``: the weights rounded to that
    dtype first (so a float64 run gets the weights a half-precision run sees)."""
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (logits * w.to(rounded_to or logits.dtype).to(logits)).sum()


def assert_within(actual: Tensor, expected: Tensor, tol: ops.Tolerance, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.allclose(a, e, atol=tol.atol, rtol=tol.rtol):
        err = (a - e).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {err:.3e} exceeds {tol}")


HALF = (torch.bfloat16, torch.float16)


def assert_as_accurate_as_reference(actual: Tensor, reference: Tensor, truth: Tensor, tol: ops.Tolerance, what: str) -> None:
    """Half precision: measured against the float64 ``truth`` (the reference backend in
    float64 with the same rounded weights), ``actual`` may be off by at most three times what
    the reference backend run in the same precision is off, plus the backend's ``atol``
    (FlashAttention's tests use twice; rmt's float16 gradients came to 0.9 of that bound on
    the CPU; with three the largest share is 0.73, brt's bfloat16 gradients). A wrong kernel is far off (a 10% error in the scale fails 14 of the 16
    variant x half-dtype cases on CPU); the rounding both runs make is not counted against
    the backend, however many steps it gathers over (an RMT or BRT gradient sums it over
    every segment, which failed the direct comparison on an H200). A non-finite value fails."""
    assert actual.shape == reference.shape == truth.shape, f"{what}: shapes {tuple(actual.shape)}, {tuple(reference.shape)}, {tuple(truth.shape)}"
    if actual.numel() == 0:
        return
    a, r, t = (x.detach().double().cpu() for x in (actual, reference, truth))
    err, ref_err = (a - t).abs().max().item(), (r - t).abs().max().item()
    if not err <= 3 * ref_err + tol.atol:  # False for NaN too
        raise AssertionError(f"{what}: {err:.3e} from the float64 truth, more than 3 x {ref_err:.3e} (the reference backend's "
                             f"own error in this precision) + atol {tol.atol}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared CPU the thread pool's
    contention made this file ~10x slower; restored for the other test files."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def input_grads(out: Tensor, ins: dict[str, Tensor]) -> list[Tensor]:
    """d(weighted loss)/d(each input); an input the computation does not use gets zeros."""
    grads = torch.autograd.grad(weighted_loss(out), list(ins.values()), allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(ins.values(), grads)]


def backend_reasons(backend: str, device: str, dtype: torch.dtype, training: bool, head_dim: int = 8) -> list[str]:
    call = AttentionCall(device, dtype, BlockLayout(4, 4), training, False, False, head_dim, head_dim)
    return ops.get_backend(backend).not_supported_reasons(call)


# ====================================================================== declarations
@pytest.mark.parametrize("name", ops.list_backends())
def test_declarations_are_complete(name):
    backend = ops.get_backend(name)
    s = backend.support
    declared = set().union(*s.dtypes.values())
    missing = [d for d in declared if d not in s.tolerances]
    assert not missing, f"{name} runs {missing} but declares no tolerance for them"
    for dev in s.training:
        assert dev in s.dtypes, f"{name} trains on {dev!r} but does not run there"
    for dev, text in s.no_training_because.items():
        assert dev not in s.training and len(text) > 20, (name, dev)
    assert backend.rank(AttentionCall("cpu", F32, BlockLayout(4, 4), False, False, False)) >= 0
    assert "torch" in backend.versions()


def test_reasons_are_readable_strings():
    call = AttentionCall("cpu", F64, BlockLayout(None, None), True, True, True, 8, 6)
    for name, reasons in ops.explain(call).items():
        assert all(isinstance(r, str) and len(r) > 10 for r in reasons), (name, reasons)
    assert ops.explain(call)["reference"] == []
    assert any("block-gatherable" in r for r in ops.explain(call)["sdpa"])


@pytest.mark.parametrize("name", ops.list_backends())
def test_every_backend_declares_every_layout_feature_but_one(name):
    """``Support`` keeps only the layout flag some backend sets to False; sink layouts,
    memory tensors, extra rows and Dv != D are refused by no declaration (the synthetic and
    captured calls below check each backend that runs here against the reference)."""
    backend = ops.get_backend(name)
    fields = {f.name for f in dataclasses.fields(ops.Support)}
    assert not fields & {"unbounded", "memory_tensors", "extra_rows", "sinks", "value_dim_differs"}
    for device in ("cpu", "cuda"):
        plain = AttentionCall(device, F32, BlockLayout(4, 4), True, False, False, 16, 16)
        featured = AttentionCall(device, F32, BlockLayout(4, 4, sinks=2), True, True, True, 16, 8)
        assert backend.not_supported_reasons(featured) == backend.not_supported_reasons(plain), (name, device)


def test_a_backend_that_refuses_sinks_says_so_and_auto_skips_it(monkeypatch):
    sdpa = ops.get_backend("sdpa")
    monkeypatch.setattr(
        type(sdpa), "availability_reasons",
        lambda self, call: ["sink keys are not supported here"] if call.layout.sinks else [],
    )
    call = AttentionCall("cpu", F64, BlockLayout(1, 3, sinks=2), True, False, False, 8, 8)  # training
    assert any("sink keys" in r for r in sdpa.not_supported_reasons(call))
    with pytest.raises(BackendUnavailable, match="sdpa.*sink keys"):
        ops.resolve_backend("sdpa", call)
    assert ops.resolve_backend("auto", call).name == "reference"  # the next that can
    assert ops.resolve_backend("auto", dataclasses.replace(call, layout=BlockLayout(1, 3))).name == "sdpa"


def test_one_tolerance_table():
    """Backends default to :data:`memzoo.ops.TOLERANCES` and the conformance kit's table is
    derived from it: one place to change a tolerance."""
    from memzoo.testing import TOLERANCES as KIT

    assert KIT == {d: {"atol": t.atol, "rtol": t.rtol} for d, t in ops.TOLERANCES.items()}
    for name in ("sdpa", "flex"):
        assert dict(ops.get_backend(name).support.tolerances) == dict(ops.TOLERANCES), name
    xf = ops.get_backend("xformers").support.tolerances
    assert xf[torch.bfloat16] == ops.TOLERANCES[torch.bfloat16] and xf[F32].atol > ops.TOLERANCES[F32].atol


# ======================================================================== dispatch
def test_auto_picks_in_declared_order_and_never_flex_on_cpu():
    for training in (False, True):
        for dtype in (F32, F64):
            call = AttentionCall("cpu", dtype, BlockLayout(4, 8), training, False, True, 8, 8)
            picked = ops.resolve_backend("auto", call).name
            runnable = [n for n, r in ops.explain(call).items() if not r]
            assert picked == runnable[0] == "sdpa", (training, dtype, ops.explain(call))
    # what sdpa cannot gather falls to the reference, and the record says so
    call = AttentionCall("cpu", F32, BlockLayout(None, None), True, False, True)
    assert ops.resolve_backend("auto", call).name == "reference"
    assert ops.resolve_backend_name("auto", device="cpu", dtype=F32, training=True) == "sdpa"
    assert ops.resolve_backend_name("flex", device="cpu", dtype=F32, training=False) == "flex"


def test_auto_order_on_cuda_is_xformers_sdpa_flex_reference(monkeypatch):
    """The decision itself (docs/backends.md), checked without a GPU: with every run-time
    check passing, auto prefers xformers, then sdpa, then flex, then the reference."""
    monkeypatch.setattr(xf.XformersBackend, "availability_reasons", lambda self, call: [])
    call = AttentionCall("cuda", torch.bfloat16, BlockLayout(128, 256), True, True, True, 64, 64)
    assert list(ops.explain(call)) == ["xformers", "sdpa", "flex", "reference"]
    assert ops.resolve_backend("auto", call).name == "xformers"
    # float64 is not declared by xformers or CUDA flex: sdpa takes it
    call64 = AttentionCall("cuda", F64, BlockLayout(128, 256), True, False, False, 64, 64)
    assert ops.resolve_backend("auto", call64).name == "sdpa"
    # flex on CUDA refuses heads narrower than its kernels take, with the reason
    narrow = AttentionCall("cuda", F32, BlockLayout(4, 4), False, False, False, 8, 8)
    assert any("below the 16" in r for r in ops.get_backend("flex").not_supported_reasons(narrow))


def test_named_backend_that_cannot_run_lists_every_backend():
    call = AttentionCall("cpu", F32, BlockLayout(4, 4), True, False, False, 8, 8)
    with pytest.raises(BackendUnavailable) as err:
        ops.resolve_backend("flex", call)
    msg = str(err.value)
    assert "backend 'flex' cannot run this call (cpu, float32, training" in msg
    assert "no backward on CPU" in msg and "torch.no_grad()" in msg
    for name in ops.list_backends():
        assert f"  {name}: " in msg, f"{name} missing from:\n{msg}"
    assert "xformers has no CPU operator" in msg


def test_nothing_switches_silently_and_the_record_says_what_ran():
    model = kit.tiny_model("bswa", {"memory_blocks": 1}, dtype=F32, backend="flex")
    tokens = torch.randint(0, 20, (1, 9))
    with pytest.raises(BackendUnavailable, match="flex.*no backward on CPU"):
        model(tokens)  # grad enabled: flex cannot train on CPU, and no other backend steps in
    with torch.no_grad(), ops.record_backends() as rec:
        model(tokens)
    assert rec.names == ["flex"] and rec.counts["flex"] == model.backbone.n_layers
    with torch.no_grad(), ops.record_backends() as outer, memzoo.use_backend("sdpa"):
        with ops.record_backends() as inner:
            model(tokens)  # the context overrides the model's own backend
        model(tokens)
    assert inner.names == ["sdpa"] and outer.counts["sdpa"] == 2 * inner.counts["sdpa"]
    assert "sdpa" in str(outer)


# ====================================================== model-level equivalence (CPU)
def model_cases(device: str, dtypes: tuple[torch.dtype, ...]):
    """variant x backend x dtype, for every backend but the oracle; each case skips with the
    backend's own reasons when it declares it cannot run here."""
    return [
        pytest.param(name, backend, dtype, id=f"{name}-{backend}-{kit_dtype(dtype)}")
        for name in memzoo.list_variants()
        for backend in ops.list_backends()
        if backend != "reference"
        for dtype in dtypes
    ]


def kit_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_model(model, tokens: Tensor, cuts: list[int]) -> tuple[Tensor, Tensor, memzoo.State]:
    """(whole-sequence logits, chunked logits, final state of the whole run)."""
    whole, state = model(tokens)
    chunked, _ = kit.run_chunked(model, tokens, cuts)
    return whole, chunked, state


def check_against_reference(name: str, backend: str, dtype: torch.dtype, device: str, sizes: dict[str, int]) -> None:
    impl = ops.get_backend(backend)
    head_dim = sizes["d_model"] // sizes["n_heads"]
    infer_reasons = backend_reasons(backend, device, dtype, False, head_dim)
    if infer_reasons:
        pytest.skip(f"{backend} declares it cannot run on {device}/{kit_dtype(dtype)}: " + "; ".join(infer_reasons))
    trains = not backend_reasons(backend, device, dtype, True, head_dim)
    tol = impl.tolerance(dtype)
    cuts = [3, 4, 9]  # a mid-block chunk, a one-token chunk, a chunk across blocks
    for i, opts in enumerate(memzoo.get_variant(name).config.conformance_options):
        ref = kit.tiny_model(name, dict(opts), dtype=dtype, backend="reference", **sizes).to(device)
        fast = kit.tiny_model(name, dict(opts), dtype=dtype, backend=backend, **sizes).to(device)
        fast.load_state_dict(ref.state_dict())
        models = [ref, fast]
        if dtype in HALF:  # the float64 truth, with the very same (rounded) weights
            truth = kit.tiny_model(name, dict(opts), dtype=F64, backend="reference", **sizes).to(device)
            truth.load_state_dict(ref.state_dict())
            models.append(truth)
        tokens = kit.random_tokens(ref, 2, 13, seed=i).to(device)
        what = f"{name} {opts} on {backend} ({device}, {kit_dtype(dtype)})"

        def check(got: Tensor, *want: Tensor, label: str) -> None:
            if len(want) == 1:
                assert_within(got, want[0], tol, f"{what}: {label}")
            else:
                assert_as_accurate_as_reference(got, *want, tol, f"{what}: {label}")

        with torch.no_grad():
            runs = [run_model(model, tokens, cuts) if model is not fast else None for model in models]
            with ops.record_backends() as rec:
                runs[1] = run_model(fast, tokens, cuts)
        assert rec.names == [backend], f"{what}: attention ran on {rec} (a call bypassed or switched backend)"
        (r_whole, r_chunk, r_state), (f_whole, f_chunk, f_state), *truth_run = runs
        t_whole, t_chunk, t_state = truth_run[0] if truth_run else (None, None, None)
        check(f_whole, r_whole, *([t_whole] if truth_run else []), label="logits")
        check(f_chunk, r_chunk, *([t_chunk] if truth_run else []), label=f"logits streamed in chunks at {cuts}")
        for key, value in f_state.to_dict().items():
            if value.is_floating_point():
                want = [r_state.to_dict()[key]] + ([t_state.to_dict()[key]] if truth_run else [])
                check(value, *want, label=f"state[{key}]")
        if not trains:
            continue
        grads = []
        for model in models:
            logits, _ = kit.run_chunked(model, tokens, cuts)
            params = [p for p in model.parameters() if p.requires_grad]
            grads.append(torch.autograd.grad(weighted_loss(logits, rounded_to=dtype), params, allow_unused=True))
        for (pname, _), g_ref, g_fast, *g_truth in zip(ref.named_parameters(), *grads):
            if g_ref is None:
                assert g_fast is None, f"{what}: {pname} gets a gradient only on {backend}"
                continue
            check(g_fast, g_ref, *g_truth, label=f"grad of {pname}")


CPU_SIZES = {"d_model": 16, "n_heads": 2, "n_layers": 2, "block_size": 4}


@pytest.mark.parametrize("name,backend,dtype", model_cases("cpu", (F32, F64)))
def test_backend_equals_reference_cpu(name, backend, dtype):
    check_against_reference(name, backend, dtype, "cpu", CPU_SIZES)


@pytest.mark.parametrize("name,backend,dtype", model_cases("cpu", HALF))
def test_backend_equals_reference_cpu_half_precision(name, backend, dtype):
    """bfloat16 and float16 on the CPU, at the GPU test's sizes: the half-precision
    criterion (:func:`assert_as_accurate_as_reference`) runs in CI, not only on a GPU,
    and a variant whose gradients are not finite in half precision fails here (infini's
    were NaN in float16)."""
    check_against_reference(name, backend, dtype, "cpu", cuda_sizes(backend))


def test_flex_model_built_with_backend_flex_matches_reference_for_every_variant():
    """The issue's flex check spelled out: ``build_model(..., backend="flex")`` per
    registered variant, under ``torch.no_grad()``, against ``backend="reference"``."""
    for name in memzoo.list_variants():
        for opts in memzoo.get_variant(name).config.conformance_options:
            ref = kit.tiny_model(name, dict(opts), dtype=F64, backend="reference")
            flex = kit.tiny_model(name, dict(opts), dtype=F64, backend="flex")
            flex.load_state_dict(ref.state_dict())
            tokens = kit.random_tokens(ref, 1, 11)
            with torch.no_grad():
                assert_within(flex(tokens).logits, ref(tokens).logits, ops.get_backend("flex").tolerance(F64), f"{name} {opts}")


# ======================================================= model-level equivalence (GPU)
def cuda_sizes(backend: str) -> dict[str, int]:
    least = ops.get_backend(backend).support.min_head_dim.get("cuda", 8)
    return {"d_model": 2 * max(8, least), "n_heads": 2, "n_layers": 2, "block_size": 4}


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("name,backend,dtype", model_cases("cuda", (F32, torch.bfloat16, torch.float16)))
def test_backend_equals_reference_cuda(name, backend, dtype):
    check_against_reference(name, backend, dtype, "cuda", cuda_sizes(backend))


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("backend", ["flex", "xformers", "sdpa"])
def test_kernels_on_cuda_bf16_long_blocks(backend):
    """A realistic tile shape (L=128, m=1, F=16, D=64) in bf16, outputs and input grads."""
    reasons = backend_reasons(backend, "cuda", torch.bfloat16, True, 64)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))
    layout = BlockLayout(128, 128)
    ins = synthetic_inputs(tq=640, tk=640, nb=5, f=16, memory=True, seed=0, dtype=torch.bfloat16, d=64, dv=64, device="cuda")
    outs = {}
    for name in (backend, "reference"):
        out = ops.attend(**ins, layout=layout, q_start=0, scale=0.125, backend=name)
        outs[name] = (out, input_grads(out.float(), ins))
    tol = ops.get_backend(backend).tolerance(torch.bfloat16)
    assert_within(outs[backend][0], outs["reference"][0], tol, f"{backend} bf16 output")
    for key, ga, gr in zip(ins, outs[backend][1], outs["reference"][1]):
        assert_within(ga, gr, tol, f"{backend} bf16 grad of {key}")


# ========================================== the calls registered variants really make
@dataclass
class Call:
    """One captured ``ops.attend`` call (tensors detached, float64)."""

    layout: BlockLayout
    q_start: int
    scale: float
    tensors: dict[str, Tensor]

    @property
    def shape_key(self) -> tuple:
        t = self.tensors
        f = t["extra_k"].shape[3] if "extra_k" in t else 0
        return (self.layout, self.q_start, t["q"].shape[2], t["k"].shape[2], f, "k_mem" in t)


@functools.lru_cache(maxsize=None)
def captured_calls(name: str, i: int) -> tuple[Call, ...]:
    """Every attend call a tiny model of this variant makes over a sequence streamed in
    chunks that start mid-block, end mid-block and have one token (deduplicated by shape)."""
    model = kit.tiny_model(name, options_of(name, i), dtype=F64, backend="reference")
    tokens = kit.random_tokens(model, 2, 15, seed=i)
    reference = ops.get_backend("reference")
    seen: dict[tuple, Call] = {}

    def spy(inputs: ops.AttentionInputs) -> Tensor:
        tensors = inputs.tensors()
        call = Call(inputs.layout, inputs.q_start, inputs.scale, {n: t.detach().clone() for n, t in tensors.items()})
        seen.setdefault(call.shape_key, call)
        return type(reference).attend(reference, inputs)

    reference.attend = spy  # instance attribute: shadows the method while capturing
    try:
        with torch.no_grad():
            kit.run_chunked(model, tokens, [3, 4, 10])
            model(tokens)
    finally:
        del reference.attend
    assert seen, f"{name}: no ops.attend call went through the dispatcher"
    return tuple(seen.values())


def synthetic_inputs(tq, tk, nb, f, memory, seed, dtype=F64, d=4, dv=3, device="cpu", b=2, h=2):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_(True)

    ins = {"q": rnd(b, h, tq, d), "k": rnd(b, h, tk, d), "v": rnd(b, h, tk, dv)}
    if memory:
        ins["k_mem"], ins["v_mem"] = rnd(b, h, tk, d), rnd(b, h, tk, dv)
    if f:
        ins["extra_k"], ins["extra_v"] = rnd(b, h, nb, f, d), rnd(b, h, nb, f, dv)
    return ins


def synthetic_calls() -> list[Call]:
    """Layouts and call offsets beyond what today's variants make: unbounded layouts with
    memory tensors and extra rows, windows that are not block multiples, many blocks,
    one-query calls, calls whose keys start mid-window."""
    specs = [
        # (block_size, window, q_start, tq, run keys before q_start, F, memory tensors, sinks)
        (4, 4, 0, 13, 0, 0, False, 0),
        (4, 4, 5, 7, 5, 2, True, 0),
        (4, 8, 9, 1, 9, 0, True, 0),
        (3, 5, 7, 10, 2, 1, True, 0),
        (4, 0, 6, 9, 2, 3, False, 0),
        (2, 3, 11, 6, 4, 0, True, 0),
        (4, None, 5, 6, 5, 2, True, 0),
        (None, None, 3, 5, 3, 0, False, 0),
        (None, None, 0, 6, 0, 2, True, 0),
        (None, 2, 4, 3, 4, 0, False, 0),
        (5, 10, 40, 23, 12, 1, False, 0),
        # attention sinks: from position 0 (sinks and run meet), mid-stream with a gap
        # between them, token windows (L=1) and block windows, with memory tensors and
        # extra rows, one-query decode calls, queries that are themselves sinks
        (1, 2, 0, 9, 0, 0, False, 2),
        (1, 3, 12, 5, 3, 0, False, 2),
        (1, 3, 20, 1, 3, 0, True, 4),
        (4, 4, 0, 3, 0, 0, False, 5),
        (4, 4, 10, 9, 6, 2, True, 3),
        (2, 0, 7, 4, 0, 1, False, 1),
        (3, 6, 30, 8, 6, 0, True, 2),
        (None, None, 9, 4, 2, 0, False, 3),
        (4, None, 9, 4, 2, 0, False, 3),
        # decode steps whose cache holds exactly the query's window (sdpa's unmasked path):
        # bswa/fam (with extra rows), sinks (a token window after the sinks), full
        (4, 8, 19, 1, 11, 2, False, 0),
        (1, 3, 20, 1, 3, 0, False, 2),
        (None, None, 9, 1, 9, 0, False, 0),
    ]
    calls = []
    for seed, (size, window, q_start, tq, back, f, memory, sinks) in enumerate(specs):
        layout = BlockLayout(size, window, sinks)
        nb = layout.n_query_blocks(q_start, tq)
        n_sink = layout.n_sink_rows(q_start + tq)
        run_start = max(n_sink, q_start - back)
        ins = synthetic_inputs(tq, n_sink + q_start + tq - run_start, nb, f, memory, seed)
        calls.append(Call(layout, q_start, 0.6, {n: t.detach() for n, t in ins.items()}))
    return calls


def source_mask(call: Call) -> Tensor:
    """The reference layout over the key source ``[extra rows | k | k_mem]`` that flex and
    xformers both index: (Tq, nb·F + Tk (+ Tk)) bool, True = may attend. Written from
    :class:`BlockLayout` directly, like the reference backend."""
    layout, t = call.layout, call.tensors
    tq, tk = t["q"].shape[2], t["k"].shape[2]
    end = call.q_start + tq
    q_pos, k_pos = torch.arange(call.q_start, end), layout.key_positions(end, tk)
    visible = layout.visible(q_pos[:, None], k_pos[None, :])
    memory = layout.is_memory(q_pos[:, None], k_pos[None, :])
    parts = []
    if "extra_k" in t:
        nb, f = t["extra_k"].shape[2:4]
        q_block = layout.block_start(q_pos) // (layout.block_size or 1)
        parts.append((torch.arange(nb * f) // f)[None, :] == (q_block - q_block[0])[:, None])
    if "k_mem" in t:
        parts += [visible & ~memory, visible & memory]
    else:
        parts.append(visible)
    return torch.cat(parts, dim=1)


CALL_SETS = [*VARIANT_CASES, pytest.param("synthetic", -1, id="synthetic")]


def calls_for(name: str, i: int) -> list[Call]:
    return synthetic_calls() if name == "synthetic" else list(captured_calls(name, i))


def shape_args(call: Call) -> tuple:
    layout, q_start, tq, tk, f, memory = call.shape_key
    return layout, q_start, tq, tk, f, memory


# ----------------------------------------------------------------------- flex masks
@pytest.mark.parametrize("name,i", CALL_SETS)
def test_flex_mask_mod_equals_reference_layout(name, i):
    for call in calls_for(name, i):
        layout, q_start, tq, tk, f, memory = shape_args(call)
        nb = layout.n_query_blocks(q_start, tq)
        mask_mod, _ = flex_mod.layout_mask_mod(layout, q_start, tq, tk, f, nb, memory)
        expected = source_mask(call)
        got = flex_mod.dense_mask(mask_mod, tq, expected.shape[1])
        assert torch.equal(got, expected), f"{name}: flex mask differs for {call.shape_key}"


def test_compiled_flex_block_mask_equals_eager_for_every_mask_feature():
    """On a GPU the block masks are built by ``torch.compile(create_block_mask)``; the
    same compiled builder runs here on the CPU, once per combination of mask features
    (no blocks, a window, sinks, extra rows, a k_mem copy) that the registered variants'
    calls and the synthetic calls make, and must give the eager builder's block mask.
    (It caught ``(kp < start) == mem_copy``, an == between booleans that inductor's
    bounds analysis refuses: the compiled builder raised on every k_mem-copy call.)"""
    from torch.nn.attention.flex_attention import create_block_mask

    by_feature: dict[tuple, Call] = {}
    for param in CALL_SETS:
        for call in calls_for(*param.values):
            layout, q_start, tq, tk, f, memory = shape_args(call)
            feature = (layout.block_size is None, layout.window is None, layout.n_sink_rows(q_start + tq) > 0, f > 0, memory)
            by_feature.setdefault(feature, call)
    assert any(feature[-1] for feature in by_feature), "no call has a k_mem copy: the test lost its main case"
    build = flex_mod.compiled_block_mask_builder()
    for feature, call in by_feature.items():
        layout, q_start, tq, tk, f, memory = shape_args(call)
        mask_mod, _ = flex_mod.layout_mask_mod(layout, q_start, tq, tk, f, layout.n_query_blocks(q_start, tq), memory)
        n_kv = source_mask(call).shape[1]
        eager = create_block_mask(mask_mod, None, None, tq, n_kv, device="cpu")
        compiled = build(mask_mod, None, None, tq, n_kv, device="cpu")
        assert torch.equal(compiled.to_dense(), eager.to_dense()), f"compiled block mask differs for {call.shape_key}"
        assert torch.equal(compiled.full_kv_num_blocks, eager.full_kv_num_blocks), f"full blocks differ for {call.shape_key}"


def test_flex_block_masks_are_cached_per_shape_and_phase():
    layout = BlockLayout(4, 4)
    masks = []
    for q_start in (5, 9, 6):  # 5 and 9 share the phase inside a block; 6 does not
        mod, key = flex_mod.layout_mask_mod(layout, q_start, 3, 7, 0, 1, False)
        masks.append(flex_mod.cached_block_mask(mod, key, 3, 7, torch.device("cpu")))
    assert masks[0] is masks[1] and masks[0] is not masks[2]


@pytest.mark.parametrize("name,i", CALL_SETS)
def test_flex_forward_equals_reference_on_the_variant_calls(name, i):
    tol = ops.get_backend("flex").tolerance(F64)
    for call in calls_for(name, i):
        kwargs = dict(layout=call.layout, q_start=call.q_start, scale=call.scale)
        with torch.no_grad():
            want = ops.attend(**call.tensors, **kwargs, backend="reference")
            got = ops.attend(**call.tensors, **kwargs, backend="flex")
        assert_within(got, want, tol, f"{name}: flex output for {call.shape_key}")


# -------------------------------------------------------------------- xformers masks
def attn_bias_or_skip() -> Any:
    try:
        return xf.attn_bias_module()
    except ImportError as exc:
        pytest.skip(f"xformers is not importable ({exc}); install it with `pip install xformers==0.0.35 --no-deps`")


@pytest.mark.parametrize("name,i", CALL_SETS)
def test_xformers_bias_equals_reference_layout(name, i):
    """Materialise the exact attn_bias the backend passes (batch 2, folded into the
    sequence list) and map it back onto the key source: every key the reference layout
    shows a query appears exactly once in its row, nothing else does, and no query sees
    another batch row's keys."""
    ab = attn_bias_or_skip()
    batch = 2
    for call in calls_for(name, i):
        plan = xf.plan_call(*shape_args(call))
        bias = xf.make_bias(plan, batch)
        expected = source_mask(call).double()  # (Tq, n_source)
        tq, n_kv = expected.shape[0], len(plan.kv_index)
        assert plan.n_source == expected.shape[1] and int(plan.kv_index.max()) < plan.n_source
        if plan.simple:
            assert type(bias) is ab.LowerTriangularFromBottomRightMask
            allowed = bias.materialize((tq, n_kv)) == 0
            got = torch.zeros_like(expected).index_add_(1, plan.kv_index, allowed.double())
            assert torch.equal(got, expected), f"{name}: bottom-right mask differs for {call.shape_key}"
            continue
        assert type(bias) is ab.BlockDiagonalCausalFromBottomRightMask
        allowed = bias.materialize((batch * tq, batch * n_kv)) == 0
        for r in range(batch):
            for c in range(batch):
                tile = allowed[r * tq : (r + 1) * tq, c * n_kv : (c + 1) * n_kv]
                if r != c:
                    assert not tile.any(), f"{name}: batch row {r} sees row {c}'s keys"
                    continue
                got = torch.zeros_like(expected).index_add_(1, plan.kv_index, tile.double())
                assert torch.equal(got, expected), f"{name}: block-diagonal mask differs for {call.shape_key}"


def test_xformers_plan_covers_partial_blocks_and_block_counts():
    """Sequence lengths by hand: L=4, W=4, queries [5, 14), keys [1, 14), F=2."""
    plan = xf.plan_call(BlockLayout(4, 4), 5, 9, 13, 2, True)
    assert plan.q_seqlens == (3, 4, 2)  # blocks 1 (partial start), 2, 3 (partial end)
    assert plan.kv_seqlens == (2 + 7, 2 + 8, 2 + 6)  # extra + [1..8), [4..12), [8..14)
    assert not plan.simple
    full = xf.plan_call(BlockLayout(None, None), 3, 4, 7, 0, False)
    assert full.simple and full.q_seqlens == (4,) and full.kv_seqlens == (7,)


def test_xformers_sinks_that_are_memory_come_from_the_memory_tensors():
    """One block whose sinks lie before it (memory) while the run starts at the block: the
    sinks and the run meet, but the plan must not be ``simple`` (that path reads k/v alone,
    so the sink rows skipped k_mem/v_mem: 1.99 off the reference)."""
    attn_bias_or_skip()
    layout = BlockLayout(2, 0, 2)  # block [2, 4); sinks 0, 1 are its memory
    assert not xf.plan_call(layout, 2, 2, 4, 0, True).simple
    gen = torch.Generator().manual_seed(0)
    q, k, v, k_mem, v_mem = (torch.randn(1, 1, n, 8, generator=gen, dtype=F64) for n in (2, 4, 4, 4, 4))
    inputs = ops.AttentionInputs(q, k, v, layout, 2, 0.5, k_mem, v_mem)
    got = xf.attend_planned(xf.materialized_kernel, inputs)
    want = ops.attend(q, k, v, k_mem=k_mem, v_mem=v_mem, layout=layout, q_start=2, scale=0.5, backend="reference")
    assert_within(got, want, ops.Tolerance(1e-12, 1e-10), "sinks read from k_mem")


@pytest.mark.parametrize("name,i", CALL_SETS)
def test_xformers_path_with_a_materialising_kernel_equals_reference(name, i):
    """Everything but xformers' CUDA kernel (gather, bias, batch folding, un-gather),
    outputs and every input gradient in float64."""
    attn_bias_or_skip()
    for call in calls_for(name, i):
        ins = {n: t.clone().requires_grad_(True) for n, t in call.tensors.items()}
        kwargs = dict(layout=call.layout, q_start=call.q_start, scale=call.scale)
        if "rel_q" in ins:  # xl's relative positions: xformers declares it does not implement them
            with pytest.raises(ValueError, match="relative-position keys .* not implemented for xformers"):
                xf.attend_planned(xf.materialized_kernel, ops.AttentionInputs(**ins, **kwargs))
            continue
        want = ops.attend(**ins, **kwargs, backend="reference")
        got = xf.attend_planned(xf.materialized_kernel, ops.AttentionInputs(**ins, **kwargs))
        tol = ops.get_backend("reference").tolerance(F64)
        close = ops.Tolerance(1e-12, 1e-10) if tol.atol == 0 else tol
        assert_within(got, want, close, f"{name}: output for {call.shape_key}")
        g_want, g_got = input_grads(want, ins), input_grads(got, ins)
        for key, a, b in zip(ins, g_got, g_want):
            assert_within(a, b, close, f"{name}: grad of {key} for {call.shape_key}")


def test_xformers_refuses_cpu_with_the_reason_and_remedy():
    reasons = backend_reasons("xformers", "cpu", F32, False)
    assert reasons[0].startswith("xformers has no CPU operator") and "backend='sdpa'" in reasons[0]
    with pytest.raises(BackendUnavailable, match="xformers has no CPU operator"):
        ops.attend(*(torch.zeros(1, 1, 2, 4) for _ in range(3)), layout=BlockLayout(2, 2), q_start=0, scale=1.0, backend="xformers")


def test_xformers_install_diagnosis():
    """Each install problem is named with its remedy (pure function of the metadata)."""
    cuda_build = {"torch": "2.10.0+cu128", "cuda": 1208, "hip": None, "python": "3.10.19"}
    (missing,) = xf.diagnose(None, None, "2.13.0+cu128", "12.8", "3.11.7")
    assert "not installed" in missing and "pip install xformers" in missing
    mismatch = xf.diagnose("0.0.35", cuda_build, "2.13.0+cu128", "12.8", "3.11.7")
    assert len(mismatch) == 1
    for words in ("built for torch 2.10.0+cu128", "this is torch 2.13.0+cu128", "pip install torch==2.10.0",
                  "xformers built for torch 2.13.0", "refuses every CUDA operator"):
        assert words in mismatch[0], words
    assert xf.diagnose("0.0.35", cuda_build, "2.10.0+cu128", "12.8", "3.10.19") == []
    cpu_torch = xf.diagnose("0.0.35", cuda_build, "2.10.0+cpu", None, "3.10.19")
    assert cpu_torch and "CPU-only build" in cpu_torch[0]
    assert "built without CUDA" in xf.diagnose("0.0.35", {**cuda_build, "cuda": None}, "2.10.0", "12.8", "3.10")[0]
    # what this machine's install says is one of those, and is what the backend reports
    installed, reasons = xf.install_status()
    call = AttentionCall("cuda", F32, BlockLayout(4, 4), False, False, False, 8, 8)
    if reasons:
        assert all(r in ops.get_backend("xformers").not_supported_reasons(call) for r in reasons)


# --------------------------------------------------------------- sdpa lower-right split
@pytest.mark.parametrize("name,i", CALL_SETS)
def test_sdpa_lower_right_split_equals_reference(name, i):
    """The CUDA path (full-history blocks through causal_lower_right, the rest masked),
    forced on CPU: outputs and every input gradient equal the reference."""
    split_sdpa = sdpa_mod.SDPABackend()
    split_sdpa.lower_right_devices = frozenset({"cpu"})
    for call in calls_for(name, i):
        if not call.layout.bounded and ("extra_k" in call.tensors or "k_mem" in call.tensors):
            continue  # sdpa declares these unsupported
        ins = {n: t.clone().requires_grad_(True) for n, t in call.tensors.items()}
        kwargs = dict(layout=call.layout, q_start=call.q_start, scale=call.scale)
        want = ops.attend(**ins, **kwargs, backend="reference")
        got = split_sdpa.attend(ops.AttentionInputs(**ins, **kwargs))
        tol = ops.get_backend("sdpa").tolerance(F64)
        assert_within(got, want, tol, f"{name}: output for {call.shape_key}")
        g_want, g_got = input_grads(want, ins), input_grads(got, ins)
        for key, a, b in zip(ins, g_got, g_want):
            assert_within(a, b, tol, f"{name}: grad of {key} for {call.shape_key}")


def test_decode_calls_that_see_every_key_are_in_the_synthetic_set():
    """sdpa runs a one-query call that may see every key passed as plain attention (no
    gather, no mask); the synthetic calls above include such calls, with extra rows and
    with sinks, and calls that must not take that path (keys outside the window, memory
    tensors), so the split test compares both paths with the reference."""
    flags = [
        (c.layout.one_query_sees_every_key(c.q_start, c.tensors["q"].shape[2], c.tensors["k"].shape[2]), "extra_k" in c.tensors,
         c.layout.sinks > 0)
        for c in synthetic_calls()
    ]
    assert (True, True, False) in flags and (True, False, True) in flags
    assert any(not seen for seen, _, _ in flags)
    layout = BlockLayout(4, 8)
    assert layout.one_query_sees_every_key(19, 1, 12)      # keys [8, 20): exactly the window
    assert not layout.one_query_sees_every_key(19, 1, 13)  # key 7 lies outside it
    assert not layout.one_query_sees_every_key(19, 2, 12)  # two queries


def test_sdpa_full_history_split_point():
    layout = BlockLayout(4, 8)  # m = 2 blocks of memory
    assert sdpa_mod.full_history_from(layout, q_start=0, k_start=0) == 2  # blocks 0, 1 lack memory
    assert sdpa_mod.full_history_from(layout, q_start=13, k_start=5) == 1  # block 3 needs keys from 4
    assert sdpa_mod.full_history_from(layout, q_start=16, k_start=8) == 0
    # the synthetic calls exercise both halves of the split
    splits = [
        (sdpa_mod.full_history_from(c.layout, c.q_start, c.layout.run_start(c.q_start + c.tensors["q"].shape[2], c.tensors["k"].shape[2])),
         c.layout.n_query_blocks(c.q_start, c.tensors["q"].shape[2]))
        for c in synthetic_calls()
        if c.layout.bounded
    ]
    assert any(0 < s < nb for s, nb in splits) and any(s == 0 for s, _ in splits)


def test_attend_resolves_a_call_shape_once_and_forgets_on_request(monkeypatch):
    """ops.attend remembers what a call shape resolved to (per backend name and context
    override), so a decode loop does not re-run every backend's checks per layer and
    token; a refusal is never remembered, and forget_resolutions() starts afresh."""
    checked = []
    sdpa_cls = type(ops.get_backend("sdpa"))
    real = sdpa_cls.not_supported_reasons
    monkeypatch.setattr(sdpa_cls, "not_supported_reasons", lambda self, call: checked.append(call) or real(self, call))
    ops.forget_resolutions()
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 6, 8)
    layout = BlockLayout(4, 4)
    for _ in range(3):
        ops.attend(q, k, k, layout=layout, q_start=5, scale=0.3)
    assert len(checked) == 1
    with ops.record_backends() as rec, memzoo.use_backend("reference"):
        ops.attend(q, k, k, layout=layout, q_start=5, scale=0.3)  # the override is part of the key
    assert rec.names == ["reference"]
    ops.attend(q, k, k, layout=layout, q_start=5, scale=0.3, backend="sdpa")  # another name: checked once more
    assert len(checked) == 2
    ops.forget_resolutions()
    ops.attend(q, k, k, layout=layout, q_start=5, scale=0.3)
    assert len(checked) == 3
    monkeypatch.setattr(sdpa_cls, "not_supported_reasons", lambda self, call: ["refused for this test"])
    ops.forget_resolutions()
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match="refused for this test"):
            ops.attend(q, k, k, layout=layout, q_start=5, scale=0.3, backend="sdpa")
    monkeypatch.undo()
    ops.forget_resolutions()
