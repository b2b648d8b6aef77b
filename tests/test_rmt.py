"""RMT beyond the conformance suite: the variant against the official code's segment
loop, degenerate cases, truncated BPTT keyed to absolute segments, streaming cost and
bounded state, memory reach, carry_state."""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import testing as kit
from memzoo.variants.rmt import RMTConfig, RecurrentMemoryTransformer, rmt_reference

F64 = torch.float64


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * w).sum(), inputs))


def _x(t: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, t, 16, dtype=F64, generator=torch.Generator().manual_seed(seed), requires_grad=True)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("opts", [{"num_memory_tokens": 2}, {"num_memory_tokens": 3, "bptt_segments": 2}, {"num_memory_tokens": 0}])
def test_rmt_equals_the_segment_loop(backend, opts):
    """Cached pieces == [read, tokens, write] forward passes, outputs and every gradient."""
    model = kit.tiny_model("rmt", opts, backend=backend).backbone
    x = _x(18)
    y, _ = model(x)
    ref = rmt_reference(model, x)
    kit.assert_close(y, ref, f"rmt {opts} vs segment loop")
    names, params = zip(*model.named_parameters())
    for name, a, e in zip(("x", *names), _grads(y, [x, *params]), _grads(ref, [x, *params])):
        kit.assert_close(a, e, f"grad of {name}")


def test_streaming_matches_the_segment_loop_with_gradients():
    model = kit.tiny_model("rmt", {"num_memory_tokens": 2}).backbone
    x = _x(17, seed=1, batch=1)
    ref = rmt_reference(model, x)
    (g_ref,) = _grads(ref, [x])
    for cuts in ([1, 2, 6, 7, 8, 13], list(range(1, 17))):
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, 17]):
            y, state = model(x[:, a:b], state)
            outs.append(y)
        y = torch.cat(outs, 1)
        kit.assert_close(y, ref, f"chunked at {cuts}")
        kit.assert_close(_grads(y, [x])[0], g_ref, f"input grad chunked at {cuts}")


def test_without_memory_tokens_segments_are_independent_full_passes():
    t, size = 14, 4
    full = kit.tiny_model("full")
    rmt = kit.tiny_model("rmt", {"num_memory_tokens": 0})
    rmt.load_state_dict(full.state_dict())
    tokens = kit.random_tokens(full, 2, t)
    pieces = [full(tokens[:, s : s + size]).logits for s in range(0, t, size)]
    kit.assert_close(rmt(tokens).logits, torch.cat(pieces, 1), "rmt(K=0) vs independent full segments")


def test_one_segment_equals_full_with_the_read_memory_in_front():
    t = 7
    full = kit.tiny_model("full").backbone
    rmt = kit.tiny_model("rmt", {"num_memory_tokens": 3}, block_size=8).backbone
    missing, unexpected = rmt.load_state_dict(full.state_dict(), strict=False)
    assert set(missing) == {"read_init", "write_init"} and not unexpected
    x = _x(t)
    y_full, _ = full(torch.cat([rmt.read_init.expand(2, -1, -1), x], 1))
    kit.assert_close(rmt(x).y, y_full[:, 3:], "rmt(L >= T) vs full with read memory in front")


def _memory_grad(opts: dict, out_segment: int) -> torch.Tensor:
    """|d out(segment) / d x| summed per segment, from one call of 5 segments."""
    model = kit.tiny_model("rmt", opts).backbone
    x = _x(20, seed=2, batch=1)
    y, _ = model(x)
    (g,) = torch.autograd.grad(y[:, 4 * out_segment : 4 * out_segment + 4].sum(), x)
    return g.abs().reshape(5, 4, 16).sum(dim=(1, 2))


def test_gradients_flow_through_every_segment_by_default():
    per_segment = _memory_grad({"num_memory_tokens": 2}, out_segment=4)
    assert torch.all(per_segment > 0), per_segment


def test_truncated_bptt_cuts_at_absolute_segment_multiples():
    opts = {"num_memory_tokens": 2, "bptt_segments": 2}
    g3 = _memory_grad(opts, out_segment=3)  # read memory of segment 2 is cut: reaches segments 2, 3
    assert torch.all(g3[:2] == 0) and torch.all(g3[2:4] > 0), g3
    g4 = _memory_grad(opts, out_segment=4)  # segment 4's read memory is cut too
    assert torch.all(g4[:4] == 0) and g4[4] > 0, g4
    g1 = _memory_grad(opts, out_segment=1)  # segment 0 is never cut: the learned memory learns
    assert torch.all(g1[:2] > 0), g1


def test_truncation_does_not_change_forward_values():
    a = kit.tiny_model("rmt", {"num_memory_tokens": 2})
    b = kit.tiny_model("rmt", {"num_memory_tokens": 2, "bptt_segments": 1})
    tokens = kit.random_tokens(a, 2, 13)
    kit.assert_close(b(tokens).logits, a(tokens).logits, "bptt_segments forward values")


def test_memory_reaches_any_distance():
    model = kit.tiny_model("rmt", {"num_memory_tokens": 2})
    tokens = kit.random_tokens(model, 1, 40)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.vocab_size
    with torch.no_grad():
        diff = (model(tokens).logits - model(changed).logits).abs().amax(dim=(0, 2))
    assert diff[-1] > 0 and diff[36:].min() > 0
    no_mem = kit.tiny_model("rmt", {"num_memory_tokens": 0})
    with torch.no_grad():
        diff0 = (no_mem(tokens).logits - no_mem(changed).logits).abs().amax(dim=(0, 2))
    assert torch.all(diff0[4:] == 0) and diff0[3] > 0


def test_decoding_never_recomputes_the_segment_and_state_is_bounded(monkeypatch):
    """Token-by-token: each call runs 1 row through the stack, plus the K read rows at a
    segment start and the K write rows at a segment end; the cache holds <= K + L - 1 rows."""
    size, n_mem = 4, 3
    model = kit.tiny_model("rmt", {"num_memory_tokens": n_mem}, block_size=size)
    rows: list[int] = []
    original = RecurrentMemoryTransformer._run

    def counting(self, z, start, k_cache, v_cache, pos=None, in_buffer=False):
        rows.append(z.shape[1])
        return original(self, z, start, k_cache, v_cache, pos, in_buffer)

    monkeypatch.setattr(RecurrentMemoryTransformer, "_run", counting)
    state, cached = None, []
    with torch.no_grad():
        for i in range(6 * size):
            _, state = model(torch.full((1, 1), i % 20), state=state)
            cached.append(state.k[0].shape[2])
    expected = [n_mem + 1 if i % size == 0 else (1 + n_mem if i % size == size - 1 else 1) for i in range(6 * size)]
    assert rows == expected
    assert cached == [n_mem + size] * (6 * size) and state.pos == 6 * size  # one shape from the first token on
    assert not any(k.any() for k in state.k)  # at a segment boundary: no rows computed yet


def test_carry_state_keeps_the_memory_only():
    model = kit.tiny_model("rmt", {"num_memory_tokens": 2})
    tokens = kit.random_tokens(model, 2, 10)
    _, state = model(tokens)
    carried = model.backbone.carry_state(state)
    assert carried.pos == 0 and all(k.shape[2] == 0 for k in carried.k)
    kit.assert_close(carried.mem, state.mem.detach(), "carried memory")
    assert not carried.mem.requires_grad
    logits, nxt = model(tokens[:, :5], state=carried)
    fresh, _ = model(tokens[:, :5])
    assert nxt.pos == 5 and not torch.allclose(logits, fresh)


def test_config_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="num_memory_tokens"):
        memzoo.build_model("rmt", num_memory_tokens=-1)
    with pytest.raises(ValueError, match="bptt_segments"):
        memzoo.build_model("rmt", bptt_segments=-2)
    assert RMTConfig().num_memory_tokens == 10 and RMTConfig().bptt_segments == 0
    assert not [n for n, _ in kit.tiny_model("rmt", {"num_memory_tokens": 0}).backbone.named_parameters() if "init" in n]
