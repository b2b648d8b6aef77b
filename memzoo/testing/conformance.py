"""The conformance kit: checks every variant must pass, for contributors and for
memzoo's own test suite (``tests/test_conformance.py`` runs it over the registry).

Each ``check_*`` function raises ``AssertionError`` with a readable message. A
contributor runs them all on a new variant with::

    from memzoo.testing import run_conformance
    run_conformance("my_variant")

Ragged batches (:mod:`memzoo.ragged`): :func:`check_padded_rows` and
:func:`check_packed_rows` hold every variant to "each padded row, each packed document,
gets what it gets alone" (outputs, states, gradients, chunked, continued); a state that
is not batch-first or rows that see each other fail with the variant, row, field and
error named.

Tolerances are declared once, per dtype, in :data:`memzoo.ops.base.TOLERANCES`
(:data:`TOLERANCES` here is derived from it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

import memzoo
from memzoo.errors import InputError, StateError
from memzoo.models import MemzooLM
from memzoo.ops.base import TOLERANCES as _OPS_TOLERANCES
from memzoo.ragged import NO_DOCUMENT, RaggedState, select_rows
from memzoo.state import State

#: absolute / relative tolerance per dtype for "the same result computed another way":
#: :data:`memzoo.ops.base.TOLERANCES` (the one table; backends default to it too) as
#: ``torch.allclose`` keywords
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    dtype: {"atol": tol.atol, "rtol": tol.rtol} for dtype, tol in _OPS_TOLERANCES.items()
}

#: the shared tiny sizes the suite runs every variant at
TINY: dict[str, Any] = {"vocab_size": 23, "d_model": 16, "n_layers": 2, "n_heads": 2, "block_size": 4}

#: layer shapes every variant must also pass with: memzoo's own preset (the defaults) and
#: the pretrained families' (grouped-query / multi-query attention, a head width that is
#: not d_model / n_heads, gated MLPs without biases, q/k/v biases, checkpoint norm eps,
#: RoPE scaling). Tiny sizes, on top of :data:`TINY`.
LAYER_PRESETS: dict[str, dict[str, Any]] = {
    "memzoo": {},
    "llama": {
        "n_heads": 4, "n_kv_heads": 2, "head_dim": 6, "mlp": "swiglu", "mlp_bias": False, "d_ff": 24,
        "norm_eps": 1e-5, "rope_base": 1e5, "tie_embeddings": True,
        "rope_scaling": {"type": "llama3", "factor": 4.0, "original_max_position_embeddings": 8,
                         "low_freq_factor": 1.0, "high_freq_factor": 2.0},
    },
    "qwen2": {
        "n_heads": 2, "n_kv_heads": 1, "qkv_bias": True, "mlp": "swiglu", "mlp_bias": False, "norm_eps": 1e-6,
        "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
    },
}


def registry_cases() -> list[tuple[str, dict[str, Any], str]]:
    """``(variant, options, id)`` for every registered variant: each of its
    ``conformance_options``, then, for every non-default :data:`LAYER_PRESETS` entry, the
    first option that preset allows with the preset's layer fields. What the suite's
    registry-generated tests run over (a variant registered later is in it)."""
    cases = [
        (name, dict(opts), f"{name}-{i}")
        for name in memzoo.list_variants()
        for i, opts in enumerate(memzoo.get_variant(name).config.conformance_options)
    ]
    for name in memzoo.list_variants():
        for preset, layer in LAYER_PRESETS.items():
            if layer:
                opts = options_for_preset(name, preset)
                if opts is None:
                    raise AssertionError(f"{name}: no conformance option builds with layer preset {preset!r} ({layer})")
                cases.append((name, {**opts, **layer}, f"{name}-{preset}"))
    return cases


def options_for_preset(name: str, preset: str) -> dict[str, Any] | None:
    """The first of the variant's ``conformance_options`` that builds with layer preset
    ``preset`` (some variant options exclude some layers, e.g. xl's relative positions
    and grouped-query attention), or None if none does."""
    for opts in memzoo.get_variant(name).config.conformance_options:
        try:
            memzoo.ModelConfig(variant=name, **{**TINY, **LAYER_PRESETS[preset], **opts})
        except ValueError:
            continue
        return dict(opts)
    return None


def tiny_model(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    backend: str = "auto",
    seed: int = 0,
    **overrides: Any,
) -> MemzooLM:
    """A tiny model of variant ``name`` with deterministic weights, in eval mode."""
    torch.manual_seed(seed)
    fields = {**TINY, **(options or {}), **overrides, "backend": backend}
    model = memzoo.build_model(name, **fields).to(dtype)
    return model.eval()


def random_tokens(model: MemzooLM, batch: int, length: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (batch, length), generator=gen)


def run_chunked(model: MemzooLM, tokens: Tensor, cuts: Sequence[int], state: State | None = None) -> tuple[Tensor, State]:
    """Run ``tokens`` cut at positions ``cuts`` (sorted, inside (0, T)), carrying the state."""
    bounds = [0, *cuts, tokens.shape[1]]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        logits, state = model(tokens[:, a:b], state=state)
        outs.append(logits)
    assert state is not None
    return torch.cat(outs, dim=1), state


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    tol = TOLERANCES.get(expected.dtype, TOLERANCES[torch.float32])
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, **tol):
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {err:.3e} exceeds {tol} for {expected.dtype}")


def assert_states_equal(actual: State, expected: State, what: str = "state") -> None:
    if type(actual) is not type(expected):
        raise AssertionError(f"{what}: type {type(actual).__name__} != {type(expected).__name__}")
    if actual.pos != expected.pos:
        raise AssertionError(f"{what}: pos {actual.pos} != {expected.pos}")
    a, b = actual.to_dict(), expected.to_dict()
    if set(a) != set(b):
        raise AssertionError(f"{what}: entries differ: {sorted(set(a) ^ set(b))}")
    for key in a:
        if a[key].is_floating_point():
            assert_close(a[key].detach(), b[key].detach(), f"{what}[{key}]")
        elif not torch.equal(a[key], b[key]):
            raise AssertionError(f"{what}[{key}] differs")


def _loss(logits: Tensor, seed: int = 1) -> Tensor:
    """A loss that weighs every output differently (so gradients are informative)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(logits.shape, generator=gen).to(logits)
    return (logits * w).sum()


def _param_grads(model: MemzooLM, loss: Tensor) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


# ---------------------------------------------------------------------- checks
def check_shapes(model: MemzooLM, tokens: Tensor) -> None:
    logits, state = model(tokens)
    b, t = tokens.shape
    if logits.shape != (b, t, model.vocab_size):
        raise AssertionError(f"logits shape {tuple(logits.shape)} != {(b, t, model.vocab_size)}")
    if not isinstance(state, model.backbone.State):
        raise AssertionError(f"state is a {type(state).__name__}, expected {model.backbone.State.__name__}")
    if state.pos != t:
        raise AssertionError(f"state.pos {state.pos} != tokens streamed {t}")
    if not torch.isfinite(logits).all():
        raise AssertionError("logits contain NaN or inf")
    backbone_out = model.backbone(model.embed(tokens))
    if backbone_out.y.shape != (b, t, model.backbone.d_model):
        raise AssertionError(f"backbone output shape {tuple(backbone_out.y.shape)} != {(b, t, model.backbone.d_model)}")


def check_causality(model: MemzooLM, tokens: Tensor, at: int) -> None:
    """Changing tokens at positions >= ``at`` never changes outputs before ``at``."""
    changed = tokens.clone()
    changed[:, at:] = (changed[:, at:] + 1) % model.vocab_size
    with torch.no_grad():
        a, _ = model(tokens)
        b, _ = model(changed)
    assert_close(b[:, :at], a[:, :at], f"outputs before position {at} after changing later tokens")


def check_state_equivalence(model: MemzooLM, tokens: Tensor, cuts: Sequence[int]) -> None:
    """Chunked run (any cuts) == one call: outputs and final state, under ``no_grad``
    and under ``inference_mode``."""
    with torch.no_grad():
        whole, whole_state = model(tokens)
        chunked, chunked_state = run_chunked(model, tokens, cuts)
    assert_close(chunked, whole, f"outputs chunked at {list(cuts)} vs one call")
    assert_states_equal(chunked_state, whole_state, f"final state chunked at {list(cuts)} vs one call")
    with torch.inference_mode():
        inferred, inferred_state = run_chunked(model, tokens, cuts)
    assert_close(inferred, whole, f"outputs chunked at {list(cuts)} under inference_mode vs one call")
    assert_states_equal(inferred_state, whole_state, f"final state chunked at {list(cuts)} under inference_mode")


def check_state_owns_its_memory(model: MemzooLM, batch_size: int = 2) -> None:
    """No state tensor shares storage with a parameter (an optimizer step must not
    change states that already exist)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for state in (model.init_state(batch_size), model(torch.zeros(batch_size, 3, dtype=torch.long)).state):
        shared = [i for i, t in enumerate(state.tensors()) if t.numel() and t.untyped_storage().data_ptr() in params]
        if shared:
            raise AssertionError(f"{type(state).__name__} tensors {shared} share storage with parameters")


def check_state_shapes_settle(model: MemzooLM, length: int = 48, batch_size: int = 2) -> None:
    """Streamed one token at a time, a state's tensors either settle into one set of shapes
    (a bounded variant: its caches are ring buffers that fill, then keep their shape, so a
    decode step never changes shape; :mod:`memzoo.variants.ring`) or grow at every token
    (an unbounded cache, ``full``'s), and never shrink: a cache that grows and shrinks with
    the position in a block makes every decode step a new shape."""
    tokens = random_tokens(model, batch_size, length)
    shapes, state = [], None
    with torch.no_grad():
        for i in range(length):
            state = model(tokens[:, i : i + 1], state=state).state
            shapes.append([tuple(t.shape) for t in state.tensors()])
    sizes = [sum(torch.Size(s).numel() for s in step) for step in shapes]
    shrinks = [i + 1 for i in range(length - 1) if sizes[i + 1] < sizes[i]]
    if shrinks:
        raise AssertionError(
            f"{model.variant}: the state shrinks after tokens {shrinks[:5]} (elements per step: {sizes[:16]} ...): "
            "keep bounded caches in ring buffers (memzoo.variants.ring) so their shape settles"
        )
    tail = shapes[length // 2 :]
    grows = all(sizes[i + 1] > sizes[i] for i in range(length // 2, length - 1))
    if not grows and any(step != tail[0] for step in tail):
        raise AssertionError(
            f"{model.variant}: after {length // 2} tokens the state neither keeps one shape nor grows at every token "
            f"(elements per step: {sizes[length // 2:]})"
        )


def check_gradient_equivalence(model: MemzooLM, tokens: Tensor, cuts: Sequence[int]) -> None:
    """Gradients of a loss on all outputs: chunked with the state not detached == one call."""
    whole, _ = model(tokens)
    chunked, _ = run_chunked(model, tokens, cuts)
    g_whole = _param_grads(model, _loss(whole))
    g_chunk = _param_grads(model, _loss(chunked))
    for name in g_whole:
        assert_close(g_chunk[name], g_whole[name], f"grad of {name}, chunked at {list(cuts)} vs one call")


def check_gradient_is_the_derivative(model: MemzooLM, tokens: Tensor, *, seed: int = 0, eps: float = 1e-6) -> None:
    """The gradients are the derivative of the outputs: autograd's directional derivative
    of a loss along a random direction of every parameter equals the central finite
    difference of the forward (float64). Every other gradient check compares two paths
    that may share a backward; this one catches a wrong custom ``backward``.

    Run over one block from a fresh state and over one block continuing a state (made
    without gradients, at a block boundary): within a block no variant cuts a gradient on
    purpose (memory detached across segments, truncated BPTT), so there the gradient must
    be the true derivative."""
    if next(model.parameters()).dtype != torch.float64:
        raise ValueError("check_gradient_is_the_derivative needs a float64 model (finite differences)")
    size = model.backbone.block_size
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d * d).sum() for d in direction))
    direction = [d / norm for d in direction]
    with torch.no_grad():
        _, prefix = model(tokens[:, :size])
    for start, state, label in ((0, None, "one block from a fresh state"), (size, prefix, "one block continuing a state")):
        block = tokens[:, start : start + size]
        if block.shape[1] == 0:
            continue
        logits, _ = model(block, state=state)
        grads = torch.autograd.grad(_loss(logits), params, allow_unused=True)
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction) if g is not None)
        values = []
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            try:
                for sign in (1.0, -1.0):
                    for p, d in zip(params, direction):
                        p.add_(sign * eps * d)
                    values.append(float(_loss(model(block, state=state)[0])))
                    for p, w in zip(params, saved):
                        p.copy_(w)  # exactly (p + e - e is not p in floating point)
            finally:
                for p, w in zip(params, saved):
                    p.copy_(w)
        numeric = (values[0] - values[1]) / (2 * eps)
        if abs(numeric - analytic) > 1e-5 * max(1.0, abs(numeric)):
            raise AssertionError(
                f"{label}: the gradient along a random parameter direction is {analytic:.8g}, but the outputs change "
                f"at {numeric:.8g} (central finite difference, eps={eps}); a backward does not match its forward"
            )


def check_every_parameter_gets_gradient(model: MemzooLM, tokens: Tensor) -> None:
    logits, _ = model(tokens)
    grads = _param_grads(model, _loss(logits))
    dead = [n for n, g in grads.items() if not torch.isfinite(g).all()]
    if dead:
        raise AssertionError(f"non-finite gradients for {dead}")
    zero = [n for n, g in grads.items() if g.abs().sum() == 0]
    if zero:
        raise AssertionError(f"parameters with no gradient after {tokens.shape[1]} tokens: {zero}")


def check_backend_matches_reference(model: MemzooLM, tokens: Tensor, backend: str = "auto", state_cut: int | None = None) -> None:
    """``backend`` gives the reference backend's outputs and gradients (also mid-stream)."""
    prefix_state = None
    if state_cut:
        with torch.no_grad():
            _, prefix_state = model(tokens[:, :state_cut])
        tokens = tokens[:, state_cut:]
    results = {}
    for name in (backend, "reference"):
        with memzoo.use_backend(name):
            logits, state = model(tokens, state=prefix_state)
            results[name] = (logits, state, _param_grads(model, _loss(logits)))
    (fa, sa, ga), (fr, sr, gr) = results[backend], results["reference"]
    assert_close(fa.detach(), fr.detach(), f"outputs of backend {backend!r} vs reference")
    assert_states_equal(sa, sr, f"state of backend {backend!r} vs reference")
    for name in gr:
        assert_close(ga[name], gr[name], f"grad of {name}, backend {backend!r} vs reference")


def check_state_roundtrip(model: MemzooLM, tokens: Tensor) -> None:
    """to_dict/from_dict and a safetensors file give back the same state, and it continues identically."""
    with torch.no_grad():
        _, state = model(tokens)
        flat = state.to_dict()
        again = type(state).from_dict(flat)
        assert_states_equal(again, state, "state after to_dict/from_dict")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "state.safetensors"
            memzoo.save_state(state, path)
            loaded = memzoo.load_state(path)
        for key, value in loaded.to_dict().items():
            if not torch.equal(value, flat[key]):
                raise AssertionError(f"state entry {key!r} changed through a safetensors file")
        nxt = tokens[:, :3]
        a, _ = model(nxt, state=state)
        b, _ = model(nxt, state=loaded)
    assert_close(b, a, "outputs continued from a loaded state")
    # a state cast with state.to(dtype) loads into the model cast to the same dtype; the
    # model it came from refuses that file when it loads, not at its first call
    other = torch.float32 if state.dtype == torch.bfloat16 else torch.bfloat16
    low = copy.deepcopy(model).to(other)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.safetensors"
        memzoo.save_state(state.to(other), path)
        try:
            memzoo.load_state(path, model=low)
        except StateError as err:
            raise AssertionError(f"a state cast with state.to({other}) does not load into the model cast to it: {err}") from err
        _expect(StateError, ["dtype"], lambda: memzoo.load_state(path, model=model), "load_state of a state in another dtype")
    if state.nbytes != sum(v.numel() * v.element_size() for k, v in flat.items() if not k.startswith("__")):
        raise AssertionError("state.nbytes does not count its tensors")


def _expect(exc: type[Exception], words: Sequence[str], fn: Any, what: str, hint: str = "") -> None:
    """``fn()`` raises ``exc`` with each of ``words`` in its message; anything else is an
    AssertionError naming the check (``what``) and what was expected, ``hint`` after it."""
    try:
        fn()
    except exc as err:
        msg = str(err)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"{what}: error message {msg!r} lacks {missing}{hint}") from err
        return
    except Exception as err:
        raise AssertionError(
            f"{what}: expected a {exc.__name__} saying {list(words)}, got {type(err).__name__}: {err}{hint}"
        ) from err
    raise AssertionError(f"{what}: no {exc.__name__} raised{hint}")


#: where a variant's refusal of a damaged state comes from, said when a check finds none
STATE_SHAPES_HINT = (
    " (a backbone refuses a malformed state through expected_state_shapes(pos, batch_size): every state field's "
    "shape at a position, checked on every call; see docs/adding-a-variant.md)"
)


def check_bad_inputs(model: MemzooLM, other_options: dict[str, Any] | None = None) -> None:
    """Bad tokens and foreign states are refused with errors that say what is valid."""
    v = model.vocab_size
    good = torch.zeros(2, 5, dtype=torch.long)
    _expect(InputError, ["int64"], lambda: model(good.float()), "float tokens")
    _expect(InputError, ["int64"], lambda: model(good.int()), "int32 tokens")
    _expect(InputError, ["(B, T)"], lambda: model(good[0]), "1-D tokens")
    _expect(InputError, ["(B, T)"], lambda: model(good[:, :0]), "empty tokens")
    _expect(InputError, [f"[0, {v - 1}]"], lambda: model(torch.full((2, 5), v)), "token id == vocab_size")
    _expect(InputError, [f"[0, {v - 1}]"], lambda: model(torch.full((2, 5), -1)), "negative token id")
    _expect(InputError, ["Tensor", "list"], lambda: model([[1, 2]]), "a list instead of a tensor")

    with torch.no_grad():
        _, state = model(good)
    _expect(StateError, ["batch size"], lambda: model(good[:1], state=state), "state of another batch size")
    other_dtype = torch.float32 if state.dtype == torch.float64 else torch.float64
    _expect(StateError, ["dtype"], lambda: model(good, state=state.to(other_dtype)), "state of another dtype")
    _expect(StateError, ["on meta"], lambda: model(good, state=state.to("meta")), "state on another device")
    _expect(StateError, ["State"], lambda: model(good, state=object()), "a non-state object")

    # every field in the dtype the variant makes it in (floating fields in the state's one
    # dtype), and a single-tensor field is one tensor
    kinds = model.backbone._state_field_kinds() or {}  # the fields a fresh state gives a dtype (all, for memzoo's own)
    for name, value in state.tensor_fields().items():
        many = isinstance(value, (list, tuple))
        items = list(value) if many else [value]
        if not items or name not in kinds:
            continue
        wrong = torch.int64 if kinds[name] is None else torch.float32
        cast = [t.to(wrong) for t in value] if many else value.to(wrong)
        _expect(StateError, ["dtype", name], lambda: model(good, state=dataclasses.replace(state, **{name: cast})),
                f"state field {name!r} stored as {wrong}")
        if not many and name in model.backbone.expected_state_shapes(state.pos, state.batch_size):
            _expect(StateError, [name, "single tensor"], lambda: model(good, state=dataclasses.replace(state, **{name: [value]})),
                    f"state field {name!r} given as a list")

    # one tensor of the first floating field in another floating dtype: the state's dtype
    # then reads as that one, and the message still names the field
    floating = [t for t in state.tensors() if t.is_floating_point()]
    items = {n: list(v) if isinstance(v, (list, tuple)) else [v] for n, v in state.tensor_fields().items()}
    first = next((n for n, ts in items.items() if ts and ts[0].is_floating_point()), None)
    if first is not None and len(floating) > 1:
        value = getattr(state, first)
        odd = torch.float32 if state.dtype == torch.float64 else torch.float64
        mixed = [value[0].to(odd), *value[1:]] if isinstance(value, (list, tuple)) else value.to(odd)
        _expect(StateError, ["dtype", first], lambda: model(good, state=dataclasses.replace(state, **{first: mixed})),
                f"state field {first!r} partly stored as {odd}")

    # damaged states: a wrong position (where the shapes show it), a missing layer
    flat = state.to_dict()
    shapes = model.backbone.expected_state_shapes
    if shapes(state.pos + 1, state.batch_size) != shapes(state.pos, state.batch_size):
        moved = dict(flat, __pos__=flat["__pos__"] + 1)
        _expect(StateError, ["malformed state"], lambda: model(good, state=type(state).from_dict(moved)), "state with a wrong pos",
                STATE_SHAPES_HINT)
    last = f".{model.backbone.n_layers - 1}"
    if model.backbone.n_layers > 1 and any(k.endswith(last) for k in flat):
        short = {k: v for k, v in flat.items() if not k.endswith(last)}
        _expect(StateError, ["malformed state", "one per layer"], lambda: model(good, state=type(state).from_dict(short)),
                "state missing a layer", STATE_SHAPES_HINT)

    # another config of the same variant
    name = model.variant
    cfg = model.config.model_dump()
    cfg["d_ff"] = (model.backbone.d_ff or 0) + 2
    other = memzoo.build_model(memzoo.ModelConfig.model_validate(cfg)).to(state.dtype)
    with torch.no_grad():
        _, foreign = other(good)
    _expect(StateError, ["another config", "d_ff"], lambda: model(good, state=foreign), "state of another config")

    # another variant
    others = [n for n in memzoo.list_variants() if n != name]
    if others:
        alien = tiny_model(others[0], _first_options(others[0]), dtype=state.dtype or torch.float64)
        with torch.no_grad():
            _, alien_state = alien(good)
        _expect(StateError, [others[0]], lambda: model(good, state=alien_state), "state of another variant")

    _expect(ValueError, ["unknown field", "valid fields"], lambda: memzoo.build_model(name, not_a_field=1), "unknown field")
    _expect(ValueError, ["unknown variant", name], lambda: memzoo.build_model(name + "_nope"), "unknown variant")


def _first_options(name: str) -> dict[str, Any]:
    return dict(memzoo.get_variant(name).config.conformance_options[0])


# ------------------------------------------------------------ ragged batches
#: what a ragged call needs of a variant's state, said when a check trips over it
BATCH_FIRST_HINT = (
    "ragged batches select and stack state rows along dim 0 (memzoo.ragged.select_rows / cat_rows), so every "
    "tensor of a state must be batch-first, (B, ...), and rows must not see each other"
)


@contextlib.contextmanager
def _contract(variant: str, what: str) -> Iterator[None]:
    """Failures inside as one readable ``AssertionError`` naming the variant and the
    check; an exception the variant raises on valid input becomes one too (with what a
    ragged call needs of a state), not a raw traceback."""
    try:
        yield
    except AssertionError as err:
        if str(err).startswith(f"{variant}: "):
            raise
        raise AssertionError(f"{variant}: {what}: {err}") from err
    except Exception as err:
        raise AssertionError(f"{variant}: {what} raised {type(err).__name__}: {err} ({BATCH_FIRST_HINT})") from err


def row_spans(mask: Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each row's real tokens in ``attention_mask`` (B, T); (0, 0) for none."""
    spans = []
    for row in mask.bool().tolist():
        n = sum(row)
        a = row.index(True) if n else 0
        spans.append((a, a + n))
    return spans


def padded_batch(
    model: MemzooLM, spans: Sequence[tuple[int, int]], width: int, seed: int = 0, mask_dtype: torch.dtype = torch.long
) -> tuple[Tensor, Tensor]:
    """Tokens (B, width) and an ``attention_mask`` with row i real at columns
    ``spans[i] = (start, end)``; pads hold random ids too (they must not matter)."""
    tokens = random_tokens(model, len(spans), width, seed)
    mask = torch.zeros(len(spans), width, dtype=torch.bool)
    for i, (a, e) in enumerate(spans):
        mask[i, a:e] = True
    return tokens, mask.to(mask_dtype)


def random_spans(rng: random.Random, batch: int, width: int) -> list[tuple[int, int]]:
    """Per row a contiguous run of real tokens in ``width`` columns: padded left, right,
    both or not at all; now and then a row with none."""
    spans = []
    for _ in range(batch):
        n = 0 if rng.random() < 0.15 else rng.randint(1, width)
        a = rng.randint(0, width - n)
        spans.append((a, a + n))
    return spans


def random_documents(rng: random.Random, batch: int, width: int) -> Tensor:
    """``document_ids`` (B, width): boundaries anywhere (not only on blocks), ids that
    sometimes come back later in the row (a new document all the same)."""
    ids = torch.zeros(batch, width, dtype=torch.long)
    for i in range(batch):
        cur = rng.randint(0, 3)
        for j in range(width):
            if j and rng.random() < 0.3:
                cur = rng.choice([d for d in range(5) if d != cur])
            ids[i, j] = cur
    return ids


def state_row(state: "State | RaggedState", i: int) -> State:
    """Row ``i`` of a plain or ragged state, as a plain state of batch size 1."""
    if isinstance(state, RaggedState):
        return state.row(i)
    return select_rows(state, [i])


def assert_rows_equal(actual: "State | RaggedState", expected: Sequence[State], what: str) -> None:
    """Row i of ``actual`` equals the batch-1 state ``expected[i]`` (every tensor and ``pos``)."""
    if actual.batch_size != len(expected):
        raise AssertionError(f"{what}: batch size {actual.batch_size} != {len(expected)}")
    for i, want in enumerate(expected):
        assert_states_equal(state_row(actual, i), want, f"{what}, row {i}")


def assert_any_states_equal(actual: "State | RaggedState", expected: "State | RaggedState", what: str) -> None:
    """Two plain or ragged states hold the same: kind, per-row positions, document ids, every row."""
    kinds = [type(s).__name__ for s in (actual, expected)]
    if isinstance(actual, RaggedState) != isinstance(expected, RaggedState):
        raise AssertionError(f"{what}: a {kinds[0]} where a {kinds[1]} was expected")
    if isinstance(actual, RaggedState) and isinstance(expected, RaggedState):
        if not torch.equal(actual.positions, expected.positions):
            raise AssertionError(f"{what}: row positions {actual.positions.tolist()} != {expected.positions.tolist()}")
        docs = [None if s.documents is None else s.documents.tolist() for s in (actual, expected)]
        if docs[0] != docs[1]:
            raise AssertionError(f"{what}: documents {docs[0]} != {docs[1]}")
        assert_rows_equal(actual, expected.rows(), what)
    else:
        assert_states_equal(actual, expected, what)


def _state_tensors(model: MemzooLM, batch_size: int) -> Iterator[tuple[str, str, Tensor]]:
    """(when, field label, tensor) of a fresh state of ``batch_size`` rows and of the state after a call."""
    fresh = model.init_state(batch_size)
    with torch.no_grad():
        _, after = model(torch.zeros(batch_size, 2, dtype=torch.long))
    for when, state in (("the fresh state", fresh), ("the state after a call", after)):
        for name, value in state.tensor_fields().items():
            items = value if isinstance(value, (list, tuple)) else [value]
            for j, t in enumerate(items):
                yield when, f"{name}[{j}]" if isinstance(value, (list, tuple)) else name, t


def check_state_is_batch_first(model: MemzooLM, batch_size: int = 3) -> None:
    """Every state tensor has the batch on dim 0 (fresh and after a call), else rows of a
    ragged batch cannot be cut out and stacked. Checked at ``batch_size`` and at a batch
    size that no other dimension of the state has (a heads-first field passes when the
    batch size happens to equal the head count)."""
    sizes = {n for _, _, t in _state_tensors(model, 1) for n in t.shape}
    unique = next(b for b in itertools.count(2) if b not in sizes)
    for b in dict.fromkeys((batch_size, unique)):
        for when, label, t in _state_tensors(model, b):
            if t.dim() == 0 or t.shape[0] != b:
                raise AssertionError(
                    f"{model.variant}: {when} of a batch of {b}: field {label!r} has shape "
                    f"{tuple(t.shape)}, not batch-first ({BATCH_FIRST_HINT})"
                )


def _grads(loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    """d loss / d inputs, zeros for inputs it does not depend on (or when nothing does)."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _capture_embeddings(model: MemzooLM, into: list[Tensor]) -> Any:
    return model.embed.register_forward_hook(lambda module, args, out: into.append(out))


def _run_chunks(call: Any, cuts: Sequence[int], width: int, *columns: Tensor | None) -> tuple[Tensor, Any]:
    """``call(*column_slices, state)`` per chunk between ``cuts``, the state carried."""
    bounds = [0, *cuts, width]
    outs, state = [], None
    for a, b in zip(bounds[:-1], bounds[1:]):
        out, state = call(*[c[:, a:b] if c is not None else None for c in columns], state)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def check_padded_rows(
    model: MemzooLM, tokens: Tensor, attention_mask: Tensor, *, cuts: Sequence[int] = (),
    more: Tensor | None = None, seed: int = 1,
) -> None:
    """A padded batch (``attention_mask`` (B, T), rows padded left, right, both or
    empty) gives each row what it gets alone without padding: logits at its real tokens,
    zeros at pads, its final state (every tensor and ``pos``; ``state.row(i)``), and
    gradients (a loss over real tokens only): every parameter's and every real token
    embedding's equal the sum of the rows' alone, pad embeddings get none. With ``cuts``:
    the batch fed in chunks (each with its slice of the mask, the state carried) gives
    the same outputs and state as one call and as the rows alone. With ``more`` (B, T2):
    an unpadded next call continues every row as alone."""
    b, t = tokens.shape
    spans = row_spans(attention_mask)
    what = f"padded batch, rows real at columns {[f'{a}:{e}' for a, e in spans]} of {t}"
    with _contract(model.variant, what):
        check_state_is_batch_first(model, b)
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(b, t, model.vocab_size, generator=gen).to(model.embed.weight.dtype)
        real = attention_mask.bool()
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        names = [n for n, p in model.named_parameters() if p.requires_grad]

        embedded: list[Tensor] = []
        handle = _capture_embeddings(model, embedded)
        try:
            logits, state = model(tokens, attention_mask=attention_mask)
            alone: list[tuple[Tensor | None, State]] = []
            for i, (a, e) in enumerate(spans):
                if e > a:
                    alone.append(model(tokens[i : i + 1, a:e]))
                else:
                    alone.append((None, model.init_state(1)))
        finally:
            handle.remove()
        emb, emb_alone = embedded[0], iter(embedded[1:])

        for i, ((a, e), (row_logits, _)) in enumerate(zip(spans, alone)):
            if row_logits is not None:
                assert_close(logits[i, a:e].detach(), row_logits[0].detach(), f"row {i} logits at its real tokens vs the row alone")
            pads = logits[i][~real[i]]
            if pads.numel() and bool(pads.ne(0).any()):
                raise AssertionError(f"row {i} logits at padding are not 0 (max abs {pads.abs().max().item():.3e})")
        assert_rows_equal(state, [s for _, s in alone], "final state vs the row alone")

        # gradients of a loss over real tokens
        loss = (logits * w * real[..., None]).sum()
        loss_alone = sum(
            ((row_logits * w[i : i + 1, a:e]).sum() for i, ((a, e), (row_logits, _)) in enumerate(zip(spans, alone))
             if row_logits is not None),
            logits.new_zeros(()),
        )
        alone_embs = [next(emb_alone) for a, e in spans if e > a]
        grads = _grads(loss, [*params, emb])
        grads_alone = _grads(loss_alone, [*params, *alone_embs])
        for name, g, g1 in zip(names, grads, grads_alone):
            assert_close(g, g1, f"grad of {name}: padded batch vs the sum of the rows alone")
        g_emb, rest = grads[len(params)], iter(grads_alone[len(params):])
        for i, (a, e) in enumerate(spans):
            if e > a:
                assert_close(g_emb[i, a:e], next(rest)[0], f"row {i} grad of its real token embeddings vs the row alone")
            pad_grad = g_emb[i][~real[i]]
            if pad_grad.numel() and bool(pad_grad.ne(0).any()):
                raise AssertionError(f"row {i} pad token embeddings get gradient (max abs {pad_grad.abs().max().item():.3e})")

        alone_states = [s.detach() for _, s in alone]
        with torch.no_grad():
            if cuts:
                chunked, chunked_state = _run_chunks(
                    lambda tok, m, st: model(tok, st, attention_mask=m), cuts, t, tokens, attention_mask
                )
                assert_close(chunked, logits.detach(), f"logits chunked at {list(cuts)} vs one call")
                assert_any_states_equal(chunked_state, state, f"final state chunked at {list(cuts)} vs one call")
                assert_rows_equal(chunked_state, alone_states, f"final state chunked at {list(cuts)} vs the row alone")
            if more is not None:
                nxt, nxt_state = model(more, state)
                for i in range(b):
                    row_logits, row_state = model(more[i : i + 1], alone_states[i])
                    assert_close(nxt[i], row_logits[0], f"row {i} logits of the next (unpadded) call vs the row alone")
                    assert_states_equal(state_row(nxt_state, i), row_state, f"state after the next call, row {i} vs the row alone")


def documents_of_rows(document_ids: Tensor, spans: Sequence[tuple[int, int]]) -> list[list[tuple[int, int, int]]]:
    """Per row, its documents ``(start, end, id)``: maximal runs of one id within the real tokens."""
    out = []
    ids = document_ids.tolist()
    for row, (a, e) in zip(ids, spans):
        docs: list[tuple[int, int, int]] = []
        for j in range(a, e):
            if docs and docs[-1][2] == row[j]:
                docs[-1] = (docs[-1][0], j + 1, row[j])
            else:
                docs.append((j, j + 1, row[j]))
        out.append(docs)
    return out


def check_packed_rows(
    model: MemzooLM, document_ids: Tensor, attention_mask: Tensor | None = None, *, cuts: Sequence[int] = (),
    seed: int = 0,
) -> None:
    """Packed documents (``document_ids`` (B, T), boundaries anywhere; with padding too
    if ``attention_mask``), at the backbone level: each document's outputs equal that
    document run alone from a fresh state, pads give 0; the final state's row i is its
    last document's alone state and ``documents`` its last id; gradients of a loss over
    real tokens (parameters, inputs) equal the sum of the documents' alone, pads get
    none. With ``cuts``: fed in chunks, the same outputs and state (a boundary on a chunk
    boundary starts a new document: the state remembers each row's last id)."""
    backbone = model.backbone
    b, t = document_ids.shape
    spans = row_spans(attention_mask) if attention_mask is not None else [(0, t)] * b
    docs = documents_of_rows(document_ids, spans)
    what = f"packed batch, documents (start, end, id) {docs} of {t} columns"
    with _contract(model.variant, what):
        check_state_is_batch_first(model, b)
        gen = torch.Generator().manual_seed(seed)
        dtype = backbone.param_dtype
        x = torch.randn(b, t, backbone.d_model, generator=gen).to(dtype).requires_grad_(True)
        w = torch.randn(b, t, backbone.d_model, generator=gen).to(dtype)
        real = torch.zeros(b, t, dtype=torch.bool)
        for i, (a, e) in enumerate(spans):
            real[i, a:e] = True
        y, state = backbone(x, attention_mask=attention_mask, document_ids=document_ids)
        params = [p for _, p in backbone.named_parameters() if p.requires_grad]
        names = [n for n, p in backbone.named_parameters() if p.requires_grad]

        loss_alone = y.new_zeros(())
        last: list[State] = []
        inputs: list[tuple[int, int, int, Tensor]] = []
        for i, row in enumerate(docs):
            row_state = backbone.init_state(1)
            for a, e, d in row:
                xi = x[i : i + 1, a:e].detach().requires_grad_(True)
                yi, row_state = backbone(xi)
                assert_close(y[i, a:e].detach(), yi[0].detach(), f"row {i} document {d} at columns {a}:{e} vs alone from a fresh state")
                loss_alone = loss_alone + (yi * w[i : i + 1, a:e]).sum()
                inputs.append((i, a, e, xi))
            last.append(row_state)
            pads = y[i][~real[i]]
            if pads.numel() and bool(pads.ne(0).any()):
                raise AssertionError(f"row {i} outputs at padding are not 0 (max abs {pads.abs().max().item():.3e})")
        if not isinstance(state, RaggedState) or state.documents is None:
            raise AssertionError(f"the state after a call with document_ids is a {type(state).__name__} without documents")
        want_docs = [row[-1][2] if row else NO_DOCUMENT for row in docs]
        if state.documents.tolist() != want_docs:
            raise AssertionError(f"state.documents {state.documents.tolist()} != each row's last id {want_docs}")
        assert_rows_equal(state, [s.detach() for s in last], "final state vs the row's last document alone")

        loss = (y * w * real[..., None]).sum()
        grads = _grads(loss, [*params, x])
        grads_alone = _grads(loss_alone, [*params, *[xi for *_, xi in inputs]])
        for name, g, g1 in zip(names, grads, grads_alone):
            assert_close(g, g1, f"grad of {name}: packed batch vs the sum of the documents alone")
        g_x = grads[len(params)]
        for (i, a, e, xi), g1 in zip(inputs, grads_alone[len(params):]):
            assert_close(g_x[i, a:e], g1[0], f"row {i} grad of its inputs at columns {a}:{e} vs the document alone")
        pad_grad = g_x[~real]
        if pad_grad.numel() and bool(pad_grad.ne(0).any()):
            raise AssertionError(f"inputs at padding get gradient (max abs {pad_grad.abs().max().item():.3e})")

        if cuts:
            with torch.no_grad():
                chunked, chunked_state = _run_chunks(
                    lambda xs, d, m, st: backbone(xs, st, attention_mask=m, document_ids=d),
                    cuts, t, x.detach(), document_ids, attention_mask,
                )
            assert_close(chunked, y.detach(), f"outputs chunked at {list(cuts)} vs one call")
            assert_any_states_equal(chunked_state, state, f"final state chunked at {list(cuts)} vs one call")
            assert_rows_equal(chunked_state, [s.detach() for s in last], f"final state chunked at {list(cuts)} vs the documents alone")


def random_cuts(rng: random.Random, length: int) -> list[int]:
    """Sorted distinct cut points in (0, length): sometimes none, sometimes every position."""
    if length < 2:
        return []
    mode = rng.random()
    if mode < 0.15:
        return list(range(1, length))  # token by token
    k = rng.randint(0, length - 1)
    return sorted(rng.sample(range(1, length), k))


def run_conformance(name: str, options: dict[str, Any] | None = None, *, trials: int = 5, seed: int = 0) -> None:
    """Run every check on variant ``name`` (a contributor's one-liner). Raises on failure."""
    opts = _first_options(name) if options is None else options
    rng = random.Random(seed)
    model = tiny_model(name, opts)
    size = model.backbone.block_size
    long = random_tokens(model, 2, 3 * size + 3, seed)
    check_shapes(model, long)
    check_causality(model, long, at=size + 1)
    check_every_parameter_gets_gradient(model, long)
    check_gradient_is_the_derivative(model, long)
    check_backend_matches_reference(model, long)
    check_backend_matches_reference(model, long, state_cut=size + 2)
    check_state_roundtrip(model, long)
    check_state_owns_its_memory(model)
    check_state_shapes_settle(model)
    check_state_is_batch_first(model)
    check_bad_inputs(model)
    for trial in range(trials):
        tokens = random_tokens(model, rng.randint(1, 2), rng.randint(1, 5 * size + 1), seed + trial)
        cuts = random_cuts(rng, tokens.shape[1])
        check_state_equivalence(model, tokens, cuts)
        check_gradient_equivalence(model, tokens, cuts)
    for trial in range(2):  # ragged batches: padded rows (chunked, continued), packed documents
        width = rng.randint(1, 3 * size)
        batch = rng.randint(2, 3)
        tokens, mask = padded_batch(model, random_spans(rng, batch, width), width, seed + trial)
        more = random_tokens(model, batch, rng.randint(1, size + 1), seed + trial + 1)
        check_padded_rows(model, tokens, mask, cuts=random_cuts(rng, width), more=more)
        packed_mask = padded_batch(model, random_spans(rng, batch, width), width)[1] if trial else None
        check_packed_rows(model, random_documents(rng, batch, width), packed_mask, cuts=random_cuts(rng, width))
    model32 = tiny_model(name, opts, dtype=torch.float32)
    check_state_equivalence(model32, long, random_cuts(rng, long.shape[1]))
    for preset, layer in LAYER_PRESETS.items():
        if not layer:
            continue
        preset_opts = options_for_preset(name, preset) if options is None else opts
        if preset_opts is None:
            raise AssertionError(f"{name}: no conformance option builds with layer preset {preset!r} ({layer})")
        shaped = tiny_model(name, preset_opts, **layer)
        check_backend_matches_reference(shaped, long)
        check_every_parameter_gets_gradient(shaped, long)
        tokens = random_tokens(shaped, 2, 3 * size + 1, seed)
        cuts = random_cuts(rng, tokens.shape[1])
        check_state_equivalence(shaped, tokens, cuts)
        check_gradient_equivalence(shaped, tokens, cuts)
        width = 2 * size + 1
        tokens, mask = padded_batch(shaped, random_spans(rng, 3, width), width, seed)
        check_padded_rows(shaped, tokens, mask, cuts=random_cuts(rng, width))
