"""The decode fast paths (issue 10) against the general code they stand in for.

Each shortcut a decode step takes (RoPE's angle memo and joint rotation, the one-token
paths of ``brt``, ``infini`` and ``rmt``, the ring buffers read in slot order by every
bounded variant) is compared here with the general path it replaces, on the same inputs:
exactly (``torch.equal``) where the shortcut does the same arithmetic, to the conformance
tolerance where it computes the same thing another way.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import memzoo
from memzoo import testing as kit
from memzoo.layers.positions import _ANGLES, _ANGLES_ENTRIES, _ANGLES_MAX, RoPE, RopeScaling


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


def test_moved_and_unrotated_queries_equal_rotating_the_raw_query_there() -> None:
    """``moved(query(q, p), d) == query(q, p + d)`` and ``unrotate(key(k, p), p) == k``
    (float64), with and without an attention factor (yarn), for RoPE and NoPE: what the
    sinks variant's late queries use for the cache position ``S+W-1``."""
    from memzoo.layers.positions import NoPositions

    gen = torch.Generator().manual_seed(3)
    yarn = RoPE(16, 500.0, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64))
    assert yarn.attention_factor != 1.0, "the yarn case has no attention factor: the test lost a case"
    for scheme in (RoPE(16, 500.0), yarn, NoPositions(16)):
        x = torch.randn(2, 3, 5, 16, generator=gen, dtype=torch.float64)
        pos, by = torch.arange(40, 45), torch.tensor([-40, -3, 0, 7, -44])
        torch.testing.assert_close(scheme.moved(scheme.query(x, pos), by), scheme.query(x, pos + by), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scheme.unrotate(scheme.key(x, pos), pos), x, rtol=1e-12, atol=1e-12)


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


def test_positions_at_rotates_as_at_each_position_apart() -> None:
    """A scan's rotations made at once (``positions_at``) apply exactly what ``query``/``key``
    at each ``pos[:, j]`` apply, for RoPE (sliced factors, bitwise) and for a scheme that
    keeps the base class's default (NoPE)."""
    from memzoo.layers.positions import NoPositions

    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([[[-2, -1], [6, 7], [14, 15]], [[3, 4], [11, 12], [19, 20]]])  # (B, n, F)
    q, k = torch.randn(2, 4, 2, 8, generator=gen), torch.randn(2, 2, 2, 8, generator=gen)
    for scheme in (RoPE(8), RoPE(8, 500.0, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64)), NoPositions(8)):
        at = scheme.positions_at(pos, q)
        assert len(at) == pos.shape[1]
        for j, one in enumerate(at):
            want_q, want_k = scheme.query(q, pos[:, j]), scheme.key(k, pos[:, j])
            assert torch.equal(scheme.query_at(q, one), want_q) and torch.equal(scheme.key_at(k, one), want_k)
            got_q, got_k = scheme.query_key_at(q, k, one)
            assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
            if isinstance(scheme, RoPE):
                assert not torch.equal(got_k, k)  # it did rotate
    with pytest.raises(ValueError, match="must match"):
        RoPE(8).query_key_at(q, k.double(), RoPE(8).positions_at(pos, q)[0])


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


def test_rope_angle_memo_shares_a_long_calls_angles_only_while_its_positions_live() -> None:
    """A training step's or a prefill's positions (more than ``_ANGLES_MAX``): the layers
    share one computation of the angles, and the memo does not keep them after the call."""
    rope = RoPE(8)
    x = torch.randn(1, 2, _ANGLES_MAX + 1, 8)
    pos = torch.arange(_ANGLES_MAX + 1)
    first = rope._cos_sin(pos, x)
    assert all(a is b for a, b in zip(rope._cos_sin(pos, x), first))  # the second layer's: the same tensors
    assert torch.equal(rope.key(x, pos), _plain_rotate(rope, x, pos))
    key = (8, 10000.0, None, x.dtype, x.device, id(pos))
    cos = weakref.ref(first[0])
    del first, pos
    gc.collect()
    assert key not in _ANGLES and cos() is None  # gone with the positions
    pos = torch.arange(_ANGLES_MAX + 1)
    pos.add_(1)  # in place: the version changes, the memo is not used
    rope._cos_sin(pos, x)
    pos.sub_(1)
    assert torch.equal(rope.key(x, pos), _plain_rotate(rope, x, pos))


# ------------------------------------------------------------------ sinks
def _stream(model, x: torch.Tensor, state=None):
    """``x`` (B, T, D) through ``model`` one token at a time (the decode path)."""
    ys = []
    for i in range(x.shape[1]):
        y, state = model(x[:, i : i + 1], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


CASES = [pytest.param(name, opts, id=case_id) for name, opts, case_id in kit.registry_cases()]


@pytest.mark.parametrize("name,opts", CASES)
def test_decode_in_ring_order_equals_the_general_path(name, opts, monkeypatch) -> None:
    """One token at a time from a fresh state, three times: through the decode step on a
    full ring (its new row written, the rows the token sees read in order), the same with
    one shape at every step (``ring.static_shapes``: every row at its position, keys at
    explicit positions) and through the general path (the cache read in position order):
    the same outputs, states and gradients."""
    model = kit.tiny_model(name, opts).backbone
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, model.d_model, generator=gen, dtype=torch.float64, requires_grad=True)
    if not any(model.decodes_in_ring_order(p, 1) for p in range(x.shape[1])):
        pytest.skip(f"{name} {opts}: decodes_in_ring_order is False at every position (a growing state, or a variant "
                    "that does not declare a ring-order decode step)")
    runs = {}
    for path in ("static", "ring", "general"):
        if path == "general":  # never the decode step's own path: the cache read in position order
            monkeypatch.setattr(model, "decodes_in_ring_order", lambda start, n_tokens: False)
        with memzoo.ring.static_shapes() if path == "static" else contextlib.nullcontext():
            y, state = _stream(model, x)
        runs[path] = (y, state, torch.autograd.grad((y * y.detach().cos()).sum(), [x, *model.parameters()], allow_unused=True))
    y2, s2, g2 = runs["general"]
    for path in ("static", "ring"):
        y1, s1, g1 = runs[path]
        kit.assert_close(y1, y2, f"{name}: outputs, {path} decode steps")
        kit.assert_states_equal(s1, s2, f"{name}: final state, {path} decode steps")
        for a, b, what in zip(g1, g2, ["x", *(n for n, _ in model.named_parameters())]):
            if a is None or b is None:
                assert a is None and b is None, what
                continue
            kit.assert_close(a, b, f"{name}: grad of {what}, {path} decode steps")


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


@pytest.mark.parametrize("variant,options", CASES)
def test_a_call_with_gradients_after_a_no_grad_step_trains_every_weight(variant, options) -> None:
    """A state made by no-grad decode steps may keep tensors computed from the weights
    (brt's state keys/values, memos of a contributor's variant); a next call that records
    gradients must not reuse them, or the weights they come from get none: its gradients
    equal those from a copy of the state (which keeps nothing)."""
    model = kit.tiny_model(variant, options)
    tokens = kit.random_tokens(model, 1, 14, seed=4)
    with torch.no_grad():
        _, state = model(tokens[:, :9])
        _, state = model.decode_step(tokens[:, 9:10], state)  # keeps its derived tensors
    grads = []
    for given in (state, state.map(lambda t: t.clone())):  # the copy keeps none
        model.zero_grad(set_to_none=True)
        model(tokens[:, 10:], given).logits.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, expected in grads[1].items():
        got = grads[0][name]
        assert (got is None) == (expected is None), f"{variant}: grad of {name} is {got}, from a fresh copy {expected}"
        if expected is not None:
            kit.assert_close(got, expected, f"{variant} {options}: grad of {name}")


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
