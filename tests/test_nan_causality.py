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


def runnable_backends(names: list[str] | None = None, dtype: torch.dtype = torch.float32, training: bool = False) -> list[str]:
    """Of ``names`` (default: every registered backend), those that run inference (or
    ``training``) on this CPU in ``dtype``."""
    out = []
    for name in memzoo.list_backends() if names is None else names:
        try:
            ops.resolve_backend_name(name, device="cpu", dtype=dtype, training=training)
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
