"""The decode fast paths (issue 10) against the general code they stand in for.

Each shortcut a decode step takes (RoPE's angle memo and joint rotation, the one-token
paths of ``sinks``, ``brt``, ``infini`` and ``rmt``) is compared here with the general
path it replaces, on the same inputs: exactly (``torch.equal``) where the shortcut does
the same arithmetic, to the conformance tolerance where it only skips padding rows.
"""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo.layers.positions import _ANGLES, _ANGLES_ENTRIES, RoPE, RopeScaling
from memzoo.variants.kv import KVCacheBackbone
from memzoo.variants.sinks import Sinks


def _plain_rotate(rope: RoPE, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE without the memo or the joint rotation: angles made for this call alone."""
    return rope._turn(x, *rope._angles(pos, x))


def test_rope_query_key_equals_rotating_each_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    for scaling in (None, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64)):
        rope = RoPE(16, 500.0, scaling)
        for b, h, hkv, t in ((1, 4, 4, 1), (1, 4, 2, 3), (2, 4, 1, 1), (3, 2, 2, 5)):
            q = torch.randn(b, h, t, 16, generator=gen) * 10
            k = torch.randn(b, hkv, t, 16, generator=gen) * 10
            pos = torch.arange(1000, 1000 + t)
            rq, rk = rope.query_key(q, k, pos)
            assert torch.equal(rq, _plain_rotate(rope, q, pos)) and torch.equal(rk, _plain_rotate(rope, k, pos))
            assert rq.shape == q.shape and rk.shape == k.shape
            rq2, rk2 = rope.query_key(q, k, pos)  # the angles come from the memo now
            assert torch.equal(rq2, rq) and torch.equal(rk2, rk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_rotation_equals_rotating_the_halves(dtype) -> None:
    """RoPE's rotation (``x·[cos, cos] + roll(x)·[-sin, sin]``, the training path's 4 ops)
    is Hugging Face's ``x·cos + rotate_half(x)·sin`` on the halves, bitwise: outputs and
    input gradients, shared and per-row positions, with and without a scaling factor."""
    gen = torch.Generator().manual_seed(1)
    for scaling in (None, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64)):
        rope = RoPE(16, 10000.0, scaling)
        for pos in (torch.arange(100, 107), torch.randint(0, 60000, (3, 7), generator=gen)):
            x = (torch.randn(3, 2, 7, 16, generator=gen) * 5).to(dtype).requires_grad_()
            ang = pos.to(torch.float64)[..., None] * rope.inv_freq
            ang = ang[:, None] if ang.dim() == 3 else ang
            cos, sin = (t * rope.attention_factor for t in (ang.cos(), ang.sin()))
            cos, sin = cos.to(dtype), sin.to(dtype)
            x1, x2 = x.chunk(2, dim=-1)
            want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
            got = rope.key(x, pos)
            g = torch.randn(x.shape, generator=gen).to(dtype)
            assert torch.equal(got, want)
            assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_rope_computes_its_factors_in_one_op(dynamic) -> None:
    """Traced, RoPE's factors come from the op ``memzoo::rope_factors`` (one node the graph
    cannot inline into every rotated element) and rotate exactly as eager, shared and
    per-row positions, with a scaling factor, static and dynamic shapes."""
    rope = RoPE(16, 500.0, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64))
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(3, 4, 5, 16, generator=gen), torch.randn(3, 2, 5, 16, generator=gen)
    for pos in (torch.arange(7, 12), torch.randint(0, 60000, (3, 5), generator=gen)):
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm

        torch._dynamo.reset()
        got = torch.compile(rope.query_key, backend=backend, fullgraph=True, dynamic=dynamic)(q, k, pos)
        want = (_plain_rotate(rope, q, pos), _plain_rotate(rope, k, pos))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        assert sum(t.startswith("memzoo.rope_factors") for t in targets) == 1, targets
    torch._dynamo.reset()


def test_rope_angle_memo_is_shared_by_equal_ropes_and_notices_changes() -> None:
    a, b, other = RoPE(8), RoPE(8), RoPE(8, base=20.0)
    x = torch.randn(1, 2, 1, 8)
    pos = torch.tensor([7])
    first = a.key(x, pos)
    key = (8, 10000.0, None, x.dtype, x.device, id(pos))
    assert _ANGLES[key][0] is pos
    assert torch.equal(b.key(x, pos), first)  # same frequencies: the memo's angles
    assert not torch.equal(other.key(x, pos), first)  # other frequencies: an entry of their own
    pos.fill_(9)  # in place: the version changes, the memo is not used
    assert torch.equal(a.key(x, pos), _plain_rotate(a, x, torch.tensor([9])))
    assert not torch.equal(a.key(x, pos), first)
    same_values = torch.tensor([9])  # another tensor with equal values: computed anew, equal
    assert torch.equal(a.key(x, same_values), a.key(x, pos))
    for p in range(20):  # bounded: the oldest entries go
        a.key(x, torch.tensor([p]))
    assert len(_ANGLES) <= _ANGLES_ENTRIES and key not in _ANGLES


# ------------------------------------------------------------------ sinks
def _stream(model, x: torch.Tensor, state=None):
    """``x`` (B, T, D) through ``model`` one token at a time (the decode path)."""
    ys = []
    for i in range(x.shape[1]):
        y, state = model(x[:, i : i + 1], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize("sinks, window, kv_heads, batch", [(2, 3, 2, 1), (1, 1, 1, 2), (0, 3, 2, 1), (0, 1, 2, 1), (3, 5, 1, 2)])
def test_sinks_decode_on_a_full_cache_equals_the_engine_exactly(positions, sinks, window, kv_heads, batch) -> None:
    """Every one-token step from a fresh state on, through ``Sinks.step`` (which takes
    ``decode_full_cache`` once the cache is full) and through the K/V engine's step:
    the same outputs and states, bit for bit, and the same gradients."""
    torch.manual_seed(0)
    model = memzoo.build_backbone(
        "sinks", d_model=16, n_heads=2, n_kv_heads=kv_heads, n_layers=2, block_size=4, num_sinks=sinks, window=window,
        positions=positions,
    ).double()
    x = torch.randn(batch, sinks + window + 6, 16, dtype=torch.float64, requires_grad=True)
    state_fast = state_engine = None
    outs = []
    for i in range(x.shape[1]):
        xi = x[:, i : i + 1]
        state_fast = model._checked(xi, state_fast)
        state_engine = model._checked(xi, state_engine)
        y_fast, state_fast = model.step(xi, state_fast)
        y_engine, state_engine = KVCacheBackbone.step(model, xi, state_engine)
        assert torch.equal(y_fast, y_engine), i
        for a, b in zip(state_fast.tensors(), state_engine.tensors()):
            assert a.shape == b.shape and torch.equal(a, b), i
        assert state_fast.pos == state_engine.pos == i + 1
        outs.append((y_fast, y_engine))
    w = torch.randn(batch, 1, 16, dtype=torch.float64)
    fast = torch.autograd.grad(sum((a * w).sum() for a, _ in outs), [x, *model.parameters()], retain_graph=True)
    engine = torch.autograd.grad(sum((b * w).sum() for _, b in outs), [x, *model.parameters()])
    for a, b in zip(fast, engine):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert sinks + window - 1 < x.shape[1]  # the full-cache path ran


def test_sinks_decode_path_is_taken_once_the_cache_is_full(monkeypatch) -> None:
    model = memzoo.build_backbone("sinks", d_model=16, n_heads=2, n_layers=1, block_size=4, num_sinks=2, window=3)
    calls = []
    original = Sinks.decode_full_cache
    monkeypatch.setattr(Sinks, "decode_full_cache", lambda self, x, s: calls.append(s.pos) or original(self, x, s))
    with torch.no_grad():
        _stream(model, torch.randn(1, 8, 16))
    assert calls == [4, 5, 6, 7]  # S + W - 1 = 4 onwards


# ------------------------------------------------------------ derived tensors
def test_state_derived_tensors_are_reused_only_for_unchanged_sources() -> None:
    state = memzoo.build_backbone("bswa", d_model=8, n_heads=2, n_layers=1, block_size=4).init_state(1)
    src, weight = torch.randn(1, 2, 3, 4), torch.nn.Parameter(torch.randn(3))
    value = src * 2
    with torch.no_grad():
        state.keep_derived("x", (src, weight), value)
        assert state.derived("x", (src, weight)) is value
        assert state.derived("x", (src.clone(), weight)) is None  # another tensor
        assert state.derived("x", (src,)) is None and state.derived("y", (src, weight)) is None
        weight.add_(1)  # an in-place change of a source (optimizer.step, load_state_dict)
        assert state.derived("x", (src, weight)) is None
        state.keep_derived("x", (src, weight), value)
        weight.data = torch.zeros(3)  # new storage (.to())
        assert state.derived("x", (src, weight)) is None
        state.keep_derived("x", (src,), value)
        assert state.map(lambda t: t).derived("x", (src,)) is None  # not carried by map / to / detach
    fresh = memzoo.build_backbone("bswa", d_model=8, n_heads=2, n_layers=1, block_size=4).init_state(1)
    fresh.keep_derived("x", (src,), value)  # with autograd on: nothing is kept (no graph is held)
    with torch.inference_mode():
        inf = torch.randn(2)
        fresh.keep_derived("y", (inf,), inf)  # inference tensors have no version counter
    with torch.no_grad():
        assert fresh.derived("x", (src,)) is None and fresh.derived("y", (inf,)) is None


VARIANTS_WITH_ROTATED_CACHE = [
    ("brt", {"num_states": 3}),
    ("brt", {"num_states": 2, "recurrent_layer": 0, "gate": "lstm:dual"}),
    ("infini", {"update": "delta"}),
    ("infini", {"update": "linear", "memory_positions": "rotated"}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant, options", VARIANTS_WITH_ROTATED_CACHE)
def test_decoding_with_kept_derived_tensors_equals_recomputing_them_exactly(variant, options, dtype, monkeypatch) -> None:
    """Token by token (no grad), each step with the tensors the last step kept (rotated
    cached keys; brt's state keys/values) and each step from a copy of the state without
    them (the general path): the same logits and states, bit for bit; and they are used."""
    memzoo.list_variants()  # loads the infini plug-in
    torch.manual_seed(0)
    model = memzoo.build_model(variant, vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, block_size=8, **options)
    model = model.to(dtype).eval()
    tokens = torch.randint(0, 50, (2, 29))
    hits = []
    original = memzoo.State.derived

    def spy(self, name, sources):
        out = original(self, name, sources)
        hits.append(name if out is not None else None)
        return out

    monkeypatch.setattr(memzoo.State, "derived", spy)
    with torch.no_grad():
        kept = plain = model.init_state(2, dtype=dtype)
        for i in range(tokens.shape[1]):
            a, kept = model.decode_step(tokens[:, i : i + 1], kept)
            b, plain = model.decode_step(tokens[:, i : i + 1], plain.map(lambda t: t))  # map drops what is kept
            assert torch.equal(a, b), i
            assert all(torch.equal(x, y) for x, y in zip(kept.tensors(), plain.tensors())), i
    assert "rotated_k.1" in hits
    if variant == "brt":
        assert "state_kv" in hits
