"""The conformance kit: checks every variant must pass, for contributors and for
memzoo's own test suite (``tests/test_conformance.py`` runs it over the registry).

Each ``check_*`` function raises ``AssertionError`` with a readable message. A
contributor runs them all on a new variant with::

    from memzoo.testing import run_conformance
    run_conformance("my_variant")

Tolerances are declared once, per dtype, in :data:`memzoo.ops.base.TOLERANCES`
(:data:`TOLERANCES` here is derived from it).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

import memzoo
from memzoo.errors import InputError, StateError
from memzoo.models import MemzooLM
from memzoo.ops.base import TOLERANCES as _OPS_TOLERANCES
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


def check_gradient_equivalence(model: MemzooLM, tokens: Tensor, cuts: Sequence[int]) -> None:
    """Gradients of a loss on all outputs: chunked with the state not detached == one call."""
    whole, _ = model(tokens)
    chunked, _ = run_chunked(model, tokens, cuts)
    g_whole = _param_grads(model, _loss(whole))
    g_chunk = _param_grads(model, _loss(chunked))
    for name in g_whole:
        assert_close(g_chunk[name], g_whole[name], f"grad of {name}, chunked at {list(cuts)} vs one call")


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
    if state.nbytes != sum(v.numel() * v.element_size() for k, v in flat.items() if not k.startswith("__")):
        raise AssertionError("state.nbytes does not count its tensors")


def _expect(exc: type[Exception], words: Sequence[str], fn: Any, what: str) -> None:
    try:
        fn()
    except exc as err:
        msg = str(err)
        missing = [w for w in words if w not in msg]
        if missing:
            raise AssertionError(f"{what}: error message {msg!r} lacks {missing}") from err
        return
    raise AssertionError(f"{what}: no {exc.__name__} raised")


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

    # damaged states: a wrong position (where the shapes show it), a missing layer
    flat = state.to_dict()
    shapes = model.backbone.expected_state_shapes
    if shapes(state.pos + 1, state.batch_size) != shapes(state.pos, state.batch_size):
        moved = dict(flat, __pos__=flat["__pos__"] + 1)
        _expect(StateError, ["malformed state"], lambda: model(good, state=type(state).from_dict(moved)), "state with a wrong pos")
    last = f".{model.backbone.n_layers - 1}"
    if model.backbone.n_layers > 1 and any(k.endswith(last) for k in flat):
        short = {k: v for k, v in flat.items() if not k.endswith(last)}
        _expect(StateError, ["malformed state", "one per layer"], lambda: model(good, state=type(state).from_dict(short)), "state missing a layer")

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
    check_backend_matches_reference(model, long)
    check_backend_matches_reference(model, long, state_cut=size + 2)
    check_state_roundtrip(model, long)
    check_state_owns_its_memory(model)
    check_bad_inputs(model)
    for trial in range(trials):
        tokens = random_tokens(model, rng.randint(1, 2), rng.randint(1, 5 * size + 1), seed + trial)
        cuts = random_cuts(rng, tokens.shape[1])
        check_state_equivalence(model, tokens, cuts)
        check_gradient_equivalence(model, tokens, cuts)
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
