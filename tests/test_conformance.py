"""The conformance suite, generated from the registry: every registered variant, with
every entry of its config's ``conformance_options``, passes every check of
:mod:`memzoo.testing`. A new variant is tested here the moment it registers."""

from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import testing as kit

CASES = [pytest.param(name, opts, id=case_id) for name, opts, case_id in kit.registry_cases()]


def test_every_variant_declares_conformance_options():
    assert CASES, "no registered variants"
    for name in memzoo.list_variants():
        assert memzoo.get_variant(name).config.conformance_options, name
        for preset in kit.LAYER_PRESETS:
            assert kit.options_for_preset(name, preset) is not None, f"{name} builds with no option under preset {preset}"


@functools.lru_cache(maxsize=None)
def _model(name: str, opts_key: str, dtype: torch.dtype = torch.float64):
    return kit.tiny_model(name, json.loads(opts_key), dtype=dtype)


def model_for(name, opts, dtype=torch.float64):
    return _model(name, json.dumps(opts, sort_keys=True), dtype)


def cutting(max_len: int = 22):
    """(batch, T, sorted cut points) including 1-token chunks and cuts inside blocks."""

    @st.composite
    def strat(draw):
        batch = draw(st.integers(1, 2))
        length = draw(st.integers(1, max_len))
        token_by_token = draw(st.booleans()) if length > 1 else False
        if token_by_token:
            cuts = list(range(1, length))
        else:
            cuts = sorted(draw(st.sets(st.integers(1, max(1, length - 1)), max_size=max(0, length - 1)))) if length > 1 else []
        seed = draw(st.integers(0, 2**16))
        return batch, length, cuts, seed

    return strat()


@pytest.mark.parametrize("name,opts", CASES)
@given(case=cutting())
def test_state_equivalence_float64(name, opts, case):
    batch, length, cuts, seed = case
    model = model_for(name, opts)
    tokens = kit.random_tokens(model, batch, length, seed)
    kit.check_state_equivalence(model, tokens, cuts)


@pytest.mark.parametrize("name,opts", CASES)
@given(case=cutting(max_len=14))
def test_gradient_equivalence_float64(name, opts, case):
    batch, length, cuts, seed = case
    model = model_for(name, opts)
    tokens = kit.random_tokens(model, batch, length, seed)
    kit.check_gradient_equivalence(model, tokens, cuts)


def _cuts(draw, width):
    if width < 2:
        return []
    return sorted(draw(st.sets(st.integers(1, width - 1), max_size=width - 1)))


def _spans(draw, batch, width):
    """Per row a contiguous run of real tokens: padded left, right, both, not at all, or empty."""
    spans = []
    for _ in range(batch):
        n = draw(st.integers(0, width))
        a = draw(st.integers(0, width - n))
        spans.append((a, a + n))
    return spans


@st.composite
def padding(draw, max_width: int = 12):
    """(spans, width, mask dtype, cuts, length of an unpadded next call, seed)."""
    batch = draw(st.integers(2, 3))
    width = draw(st.integers(1, max_width))
    spans = _spans(draw, batch, width)
    return spans, width, draw(st.sampled_from([torch.long, torch.bool, torch.int32, torch.uint8])), _cuts(draw, width), draw(st.integers(0, 4)), draw(st.integers(0, 2**16))


@st.composite
def packing(draw, max_width: int = 12):
    """(document ids (B, width) with boundaries anywhere, spans or None, cuts, seed).
    Cuts sometimes fall exactly on document boundaries; an id may come back later in a row."""
    batch = draw(st.integers(2, 3))
    width = draw(st.integers(1, max_width))
    ids = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < width:
            row += [draw(st.integers(0, 3))] * draw(st.integers(1, width))
        ids.append(row[:width])
    spans = _spans(draw, batch, width) if draw(st.booleans()) else None
    cuts = _cuts(draw, width)
    if draw(st.booleans()):
        cuts = sorted(set(cuts) | {j for row in ids for j in range(1, width) if row[j] != row[j - 1]})
    return ids, spans, cuts, draw(st.integers(0, 2**16))


# ragged batches: few examples per case (44 cases), each checks outputs, states and gradients
@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=2, deadline=None)
@given(case=padding())
@example(case=([(0, 0), (2, 5), (0, 3)], 6, torch.long, [2, 5], 2, 0))  # an empty row, both sides, left
def test_padded_rows_float64(name, opts, case):
    spans, width, mask_dtype, cuts, more, seed = case
    model = model_for(name, opts)
    tokens, mask = kit.padded_batch(model, spans, width, seed, mask_dtype)
    nxt = kit.random_tokens(model, len(spans), more, seed + 1) if more else None
    kit.check_padded_rows(model, tokens, mask, cuts=cuts, more=nxt, seed=seed)


@pytest.mark.parametrize("name,opts", CASES)
@settings(max_examples=2, deadline=None)
@given(case=packing())
@example(case=([[0, 0, 1, 1, 1, 0, 0], [2, 2, 2, 2, 3, 3, 3]], [(0, 7), (1, 6)], [2, 4], 0))  # a boundary on a cut, an id back
def test_packed_rows_float64(name, opts, case):
    ids, spans, cuts, seed = case
    model = model_for(name, opts)
    width = len(ids[0])
    mask = kit.padded_batch(model, spans, width)[1] if spans is not None else None
    kit.check_packed_rows(model, torch.tensor(ids), mask, cuts=cuts, seed=seed)


@pytest.mark.parametrize("name,opts", CASES)
def test_state_equivalence_float32(name, opts):
    model = model_for(name, opts, torch.float32)
    rng = random.Random(0)
    for trial in range(3):
        tokens = kit.random_tokens(model, 2, 21, trial)
        kit.check_state_equivalence(model, tokens, kit.random_cuts(rng, 21))


@pytest.mark.parametrize("name,opts", CASES)
def test_shapes_and_causality(name, opts):
    model = model_for(name, opts)
    tokens = kit.random_tokens(model, 2, 15)
    kit.check_shapes(model, tokens)
    for at in (1, 5, 9, 14):
        kit.check_causality(model, tokens, at)


@pytest.mark.parametrize("name,opts", CASES)
def test_every_parameter_gets_gradient(name, opts):
    model = model_for(name, opts)
    kit.check_every_parameter_gets_gradient(model, kit.random_tokens(model, 2, 15))


@pytest.mark.parametrize("name,opts", CASES)
@pytest.mark.parametrize("state_cut", [None, 6])
def test_default_backend_matches_reference(name, opts, state_cut):
    model = model_for(name, opts)
    kit.check_backend_matches_reference(model, kit.random_tokens(model, 2, 17), "auto", state_cut=state_cut)


@pytest.mark.parametrize("name,opts", CASES)
def test_state_roundtrip(name, opts):
    model = model_for(name, opts)
    kit.check_state_roundtrip(model, kit.random_tokens(model, 2, 11))


@pytest.mark.parametrize("name,opts", CASES)
def test_state_owns_its_memory(name, opts):
    kit.check_state_owns_its_memory(model_for(name, opts))


@pytest.mark.parametrize("name,opts", CASES)
def test_state_shapes_settle_or_grow(name, opts):
    kit.check_state_shapes_settle(model_for(name, opts))


@pytest.mark.parametrize("name,opts", CASES)
def test_bad_inputs_are_refused(name, opts):
    kit.check_bad_inputs(model_for(name, opts))


@pytest.mark.parametrize("name", memzoo.list_variants())
def test_build_backbone_contract(name):
    opts = dict(memzoo.get_variant(name).config.conformance_options[0])
    fields = {k: v for k, v in kit.TINY.items() if k != "vocab_size"}
    torch.manual_seed(0)
    backbone = memzoo.build_backbone(name, **fields, **opts)
    x = torch.randn(2, 9, fields["d_model"])
    y, state = backbone(x, None)
    assert y.shape == x.shape and state.pos == 9
    y2, state2 = backbone(x[:, :4], None)
    y3, state3 = backbone(x[:, 4:], state2)
    kit.assert_close(torch.cat([y2, y3], 1).detach(), y.detach(), "backbone chunked vs whole")
    assert backbone.init_state(batch_size=3).batch_size == 3


@pytest.mark.parametrize("name", memzoo.list_variants())
def test_run_conformance_kit(name):
    """The contributor's one-liner runs green on every built-in variant."""
    kit.run_conformance(name, trials=2)


@pytest.mark.parametrize("name,opts", CASES)
def test_gradient_is_the_derivative(name, opts):
    model = model_for(name, opts)
    kit.check_gradient_is_the_derivative(model, kit.random_tokens(model, 2, 2 * model.backbone.block_size))


def test_the_kit_catches_a_backward_that_does_not_match_its_forward():
    """Every other gradient check compares two paths that share the variant's backward; a
    custom autograd function with a wrong backward passed the whole kit."""
    from dataclasses import dataclass

    from memzoo.registry import register_variant, unregister_variant
    from memzoo.variants.bswa import BSWA, BSWAConfig
    from memzoo.variants.kv import KVState

    class Doubled(torch.autograd.Function):  # identity forward, twice the gradient
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return 2 * grad

    @dataclass
    class WrongState(KVState):
        pass

    @register_variant("zz_wrong_backward", config=BSWAConfig)
    class Wrong(BSWA):
        State = WrongState

        def attend(self, *args, **kwargs):
            return Doubled.apply(super().attend(*args, **kwargs))

    try:
        model = kit.tiny_model("zz_wrong_backward", {"memory_blocks": 1})
        with pytest.raises(AssertionError, match="a backward does not match its forward"):
            kit.check_gradient_is_the_derivative(model, kit.random_tokens(model, 2, 12))
    finally:
        unregister_variant("zz_wrong_backward")


def test_the_derivative_check_leaves_the_weights_as_they_were():
    """The finite difference moved every parameter by +eps·d and back: p + e - e is not p
    in floating point, so the kit changed the model it checked (by ulps)."""
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kit.check_gradient_is_the_derivative(model, kit.random_tokens(model, 1, 3 * model.backbone.block_size))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
