"""BSWA beyond the conformance suite: degenerate case, receptive field, bounded state,
stop-gradient ablation."""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import testing as kit


def test_bswa_with_enough_memory_blocks_equals_full():
    t, size = 19, 4
    n_blocks = -(-t // size)
    torch.manual_seed(0)
    full = kit.tiny_model("full")
    bswa = kit.tiny_model("bswa", {"memory_blocks": n_blocks})
    bswa.load_state_dict(full.state_dict())
    tokens = kit.random_tokens(full, 2, t)
    kit.assert_close(bswa(tokens).logits, full(tokens).logits, "bswa(m >= n_blocks) vs full")
    short = kit.tiny_model("bswa", {"memory_blocks": 1})
    short.load_state_dict(full.state_dict())
    assert not torch.allclose(short(tokens).logits, full(tokens).logits), "m=1 must differ from full at T=19"


@pytest.mark.parametrize("m,layers", [(0, 1), (1, 2), (2, 1), (1, 3)])
def test_receptive_field(m, layers):
    """Token 0 reaches exactly the positions < (n_layers·m + 1)·L.

    Each layer carries a change m blocks further (block b is memory for blocks
    b+1..b+m), and the change starts in block 0, so after n layers it spans blocks
    0..n·m. That is within the looser bound n_layers·(m+1)·L of variants.md, which
    is also asserted."""
    size = 4
    model = kit.tiny_model("bswa", {"memory_blocks": m}, n_layers=layers)
    reach = (layers * m + 1) * size
    assert reach <= layers * (m + 1) * size
    tokens = kit.random_tokens(model, 1, layers * (m + 1) * size + 2 * size)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.vocab_size
    with torch.no_grad():
        diff = (model(tokens).logits - model(changed).logits).abs().amax(dim=(0, 2))
    assert torch.all(diff[layers * (m + 1) * size :] == 0), "changed beyond n_layers·(m+1)·L"
    assert torch.all(diff[reach:] == 0), f"changed beyond the exact reach {reach}: {diff[reach:]}"
    assert torch.all(diff[:reach] > 0), f"unchanged within reach {reach}: {diff[:reach]}"


def test_streaming_state_is_bounded_and_static_once_full():
    size, m = 4, 2
    model = kit.tiny_model("bswa", {"memory_blocks": m})
    state = None
    sizes = []
    with torch.no_grad():
        for i in range(60):
            _, state = model(torch.full((1, 1), i % 20), state=state)
            sizes.append(state.k[0].shape[2])
    ring = (m + 1) * size  # a ring buffer of the window and the own block: it fills, then keeps its shape
    assert sizes == [*range(1, ring + 1), *[ring] * (60 - ring)], sizes
    assert state.pos == 60


def _grad_to_memory(stop_gradient: bool) -> torch.Tensor:
    model = kit.tiny_model("bswa", {"memory_blocks": 1, "stop_gradient_memory": stop_gradient}, n_layers=1)
    tokens = kit.random_tokens(model, 1, 8)
    x = model.embed(tokens).detach().requires_grad_(True)
    y, _ = model.backbone(x)
    (g,) = torch.autograd.grad(y[:, 4:].sum(), x)  # block 1's outputs
    return g[:, :4]  # gradient into block 0 (block 1's memory)


def test_gradient_flows_into_memory_blocks_by_default():
    assert _grad_to_memory(False).abs().sum() > 0


def test_stop_gradient_memory_blocks_the_memory_gradient():
    assert _grad_to_memory(True).abs().sum() == 0


def test_stop_gradient_does_not_change_forward_values():
    a = kit.tiny_model("bswa", {"memory_blocks": 1})
    b = kit.tiny_model("bswa", {"memory_blocks": 1, "stop_gradient_memory": True})
    tokens = kit.random_tokens(a, 2, 13)
    kit.assert_close(b(tokens).logits, a(tokens).logits, "stop-gradient forward values")


def test_state_to_detach_and_reset_rows():
    model = kit.tiny_model("bswa", {"memory_blocks": 1})
    tokens = kit.random_tokens(model, 2, 6)
    _, state = model(tokens)
    assert state.detach().k[0].grad_fn is None
    assert state.to(torch.float32).dtype == torch.float32
    assert state.nbytes == sum(t.numel() * 8 for t in state.tensors())
    _, other = model(kit.random_tokens(model, 2, 6, seed=5))
    mixed = state.where(torch.tensor([True, False]), other)
    assert torch.equal(mixed.k[1][0], state.k[1][0]) and torch.equal(mixed.k[1][1], other.k[1][1])
    with pytest.raises(memzoo.StateError, match="bool tensor of shape"):
        state.where(torch.tensor([1, 0]), other)
    with pytest.raises(memzoo.StateError, match="same batch, shapes, dtype"):
        state.where(torch.tensor([True, False]), other.to(torch.float32))
