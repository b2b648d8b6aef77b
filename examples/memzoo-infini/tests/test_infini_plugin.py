"""The plug-in's own tests, beyond memzoo's conformance kit (which memzoo's suite runs on
every registered variant, this one included): the fast path against the slow segment
loop (outputs, memory and every gradient), the degenerate closed gate, what the memory
can and cannot reach, the delta rule, the bounded state. ``make test`` runs them."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

import memzoo
from memzoo import testing as kit
from memzoo_infini import InfiniAttention, infini_reference
from memzoo_infini.variant import retrieve, scan, sigma, write

torch.set_num_threads(1)
F64 = torch.float64
OPTIONS = [
    {"update": "delta"},
    {"update": "linear"},
    {"update": "delta", "memory_positions": "rotated", "gate_init": 1.0},
    {"update": "linear", "memory_positions": "rotated"},
]


def _x(t: int, seed: int = 0, batch: int = 2, width: int = 16) -> torch.Tensor:
    return torch.randn(batch, t, width, dtype=F64, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def test_registered_through_the_entry_point():
    names = [ep.name for ep in metadata.entry_points(group="memzoo.variants")]
    assert "infini" in names, names
    assert memzoo.get_variant("infini").cls is InfiniAttention


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("preset", ["memzoo", "llama"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_fast_path_equals_the_segment_loop(opts, preset, backend):
    """One call == the per-segment loop: outputs, final memory and normaliser, and the
    gradient of every parameter and of the input (GQA, head_dim != D/H, SwiGLU in llama)."""
    model = kit.tiny_model("infini", opts, backend=backend, **kit.LAYER_PRESETS[preset]).backbone
    x = _x(18)  # four complete segments and a partial one
    y, state = model(x)
    ref, mems, norms = infini_reference(model, x)
    kit.assert_close(y, ref, f"infini {opts} vs segment loop")
    for i in range(model.n_layers):
        kit.assert_close(state.mem[i], mems[i], f"memory of layer {i}")
        kit.assert_close(state.norm[i], norms[i], f"normaliser of layer {i}")
    names, params = zip(*model.named_parameters())
    for name, a, e in zip(("x", *names), _grads(y, [x, *params]), _grads(ref, [x, *params])):
        kit.assert_close(a, e, f"grad of {name}")


@pytest.mark.parametrize("rule", ["delta", "linear"])
@pytest.mark.parametrize("fresh", [True, False])
def test_batched_scan_equals_block_by_block_writes(rule, fresh):
    """:func:`scan` (the fast path's batched writes) == :func:`write` block after block:
    every memory and normaliser, and the gradients into the keys, values and the memory it
    starts from (GQA-sized heads, a non-empty starting memory unless ``fresh``)."""
    gen = torch.Generator().manual_seed(7)
    b, hkv, n, size, dh = 2, 2, 4, 3, 5
    sk = sigma(torch.randn(b, hkv, n * size, dh, dtype=F64, generator=gen)).requires_grad_()
    v = torch.randn(b, hkv, n * size, dh, dtype=F64, generator=gen, requires_grad=True)
    if fresh:
        mem, norm = torch.zeros(b, hkv, dh, dh, dtype=F64), torch.zeros(b, hkv, dh, dtype=F64)
    else:
        mem = torch.randn(b, hkv, dh, dh, dtype=F64, generator=gen, requires_grad=True)
        norm = (torch.rand(b, hkv, dh, dtype=F64, generator=gen) + 0.5).requires_grad_()
    reads, last, norms = scan(mem, norm, sk, v, size, rule, fresh=fresh, n_read=n + 1)
    mems = reads
    want_m, want_z = [mem], [norm]
    for j in range(n):
        block = slice(j * size, (j + 1) * size)
        m, z = write(want_m[-1], want_z[-1], sk[:, :, block], v[:, :, block], rule)
        want_m.append(m)
        want_z.append(z)
    want_mems, want_norms = torch.stack(want_m, 2).flatten(0, 1), torch.stack(want_z, 2).flatten(0, 1)
    kit.assert_close(mems, want_mems, f"{rule} scan: memories")
    kit.assert_close(last, want_mems[:, n], f"{rule} scan: last memory")
    kit.assert_close(scan(mem, norm, sk, v, size, rule, fresh=fresh, n_read=n)[0], want_mems[:, :n], f"{rule} scan: {n} read")
    kit.assert_close(norms, want_norms, f"{rule} scan: normalisers")
    inputs = [sk, v] + ([] if fresh else [mem, norm])
    got = _grads(torch.cat([mems.flatten(1), norms.flatten(1)], 1), inputs)
    want = _grads(torch.cat([want_mems.flatten(1), want_norms.flatten(1)], 1), inputs)
    for name, a, e in zip(("σ(K)", "V", "memory", "normaliser"), got, want):
        kit.assert_close(a, e, f"{rule} scan: gradient of {name}")


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_continued_state_equals_the_segment_loop(opts):
    """A call that continues a state in mid-block and completes blocks (the batched scan
    from a written memory) == the segment loop over the whole input, outputs and the
    gradients of every parameter and of both calls' inputs (through the state)."""
    model = kit.tiny_model("infini", opts, **kit.LAYER_PRESETS["llama"]).backbone
    x = _x(19, seed=2)
    ref, mems, norms = infini_reference(model, x)
    y1, state = model(x[:, :6])  # one block written, two tokens of the next held
    y2, state = model(x[:, 6:], state)
    y = torch.cat([y1, y2], 1)
    kit.assert_close(y, ref, f"infini {opts}: continued state vs segment loop")
    for i in range(model.n_layers):
        kit.assert_close(state.mem[i], mems[i], f"memory of layer {i}")
        kit.assert_close(state.norm[i], norms[i], f"normaliser of layer {i}")
    names, params = zip(*model.named_parameters())
    for name, a, e in zip(("x", *names), _grads(y, [x, *params]), _grads(ref, [x, *params])):
        kit.assert_close(a, e, f"grad of {name}")


def test_streaming_token_by_token_equals_the_segment_loop():
    model = kit.tiny_model("infini", {"update": "delta"}).backbone
    x = _x(13, seed=1, batch=1)
    ref, mems, _ = infini_reference(model, x)
    state, outs = None, []
    for i in range(13):
        y, state = model(x[:, i : i + 1], state)
        outs.append(y)
    y = torch.cat(outs, 1)
    kit.assert_close(y, ref, "token by token vs segment loop")
    kit.assert_close(state.mem[1], mems[1], "memory after streaming")
    for a, e in zip(_grads(y, [x]), _grads(ref, [x])):
        kit.assert_close(a, e, "input gradient through the streamed memory")


def _closed(model: memzoo.MemzooLM) -> memzoo.MemzooLM:
    with torch.no_grad():
        model.backbone.gate.fill_(-1e4)  # sigmoid(-1e4) == 0 in float64: no memory at all
    return model


def test_closed_gate_is_block_local_attention():
    """sigmoid(β) = 0 leaves the local attention alone: bswa with no memory blocks."""
    infini = _closed(kit.tiny_model("infini"))
    bswa = kit.tiny_model("bswa", {"memory_blocks": 0})
    missing, unexpected = infini.load_state_dict(bswa.state_dict(), strict=False)
    assert missing == ["backbone.gate"] and not unexpected
    _closed(infini)
    tokens = kit.random_tokens(bswa, 2, 17)
    kit.assert_close(infini(tokens).logits, bswa(tokens).logits, "closed-gate infini vs bswa(m=0)")


def _reach(model: memzoo.MemzooLM, length: int) -> torch.Tensor:
    """Per position, how much the output moves when token 0 changes."""
    tokens = kit.random_tokens(model, 1, length)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.vocab_size
    with torch.no_grad():
        return (model(tokens).logits - model(changed).logits).abs().amax(dim=(0, 2))


def test_receptive_field_is_unbounded_through_the_memory_only():
    """Token 0 reaches every later position (through the memory, 10 blocks on), and
    nothing beyond its own block when the gate shuts the memory off: the local attention
    never crosses a block boundary, and a block's memory holds complete blocks only."""
    size, length = 4, 44
    diff = _reach(kit.tiny_model("infini"), length)
    assert torch.all(diff > 0), f"positions token 0 does not reach: {torch.nonzero(diff == 0).flatten().tolist()}"
    closed = _reach(_closed(kit.tiny_model("infini")), length)
    assert torch.all(closed[:size] > 0) and torch.all(closed[size:] == 0), closed


def test_memory_is_read_only_after_its_block_completes():
    """The memory holds complete blocks only: after 6 or 7 tokens (block 1 partial) it is
    still the memory of block 0, and block 1's tokens wait in the state as keys/values."""
    model = kit.tiny_model("infini").backbone
    x = _x(7, batch=1).detach()
    with torch.no_grad():
        _, s6 = model(x[:, :6])
        _, s7 = model(x[:, :7])
        _, s4 = model(x[:, :4])
    for a, b in ((s6, s4), (s7, s4)):
        kit.assert_close(a.mem[0], b.mem[0], "memory inside block 1 is block 0's")
    # block 1's tokens 4, 5, 6 wait in the first slots of the ring (L = 4 rows, unrotated keys)
    _, k_raw, _ = model.layers[0].project_raw(x)
    assert s7.k[0].shape[2] == 4 and s4.k[0].shape[2] == 4
    kit.assert_close(s7.k[0][:, :, :3], k_raw[:, :, 4:7], "the partial block's keys")


def test_delta_rule_writes_only_what_the_memory_does_not_retrieve():
    gen = torch.Generator().manual_seed(0)
    mem = torch.randn(1, 2, 4, 4, dtype=F64, generator=gen)
    norm = torch.rand(1, 2, 4, dtype=F64, generator=gen) + 0.5
    sk = sigma(torch.randn(1, 2, 3, 4, dtype=F64, generator=gen))
    known = retrieve(sk, mem, norm)  # values the memory already gives for these keys
    delta_mem, delta_norm = write(mem, norm, sk, known, "delta")
    kit.assert_close(delta_mem, mem, "delta write of already-retrievable values")
    linear_mem, linear_norm = write(mem, norm, sk, known, "linear")
    assert not torch.allclose(linear_mem, mem)
    kit.assert_close(delta_norm, linear_norm, "the normaliser is the same for both rules")


def test_first_segment_retrieves_nothing():
    """M = 0, z = 0: the retrieval is exactly 0 (the denominator is 1 there)."""
    sq = sigma(torch.randn(1, 2, 3, 4, dtype=F64))
    out = retrieve(sq, torch.zeros(1, 2, 4, 4, dtype=F64), torch.zeros(1, 2, 4, dtype=F64))
    assert torch.equal(out, torch.zeros_like(out))


def test_state_is_bounded_and_static_once_full():
    model = kit.tiny_model("infini")
    state, sizes = None, set()
    with torch.no_grad():
        for i in range(40):
            _, state = model(torch.full((1, 1), i % 20), state=state)
            assert state.k[0].shape[2] == min(i + 1, 4), "a ring of one block's K/V: it fills, then keeps its shape"
            if i >= 3:
                sizes.add(tuple(tuple(t.shape) for t in state.tensors()))
    assert len(sizes) == 1, f"one shape once the first block is complete, got {sorted(sizes)}"


def test_config_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="linear.*delta"):
        memzoo.build_model("infini", update="hebbian")
    with pytest.raises(ValueError, match="unrotated.*rotated"):
        memzoo.build_model("infini", memory_positions="both")


def test_a_loaded_state_with_a_memory_it_could_not_have_is_refused(tmp_path):
    """A state before its first complete block has written nothing: a memory there (a
    hand-edited or damaged file) would be dropped by the next call, so loading refuses it,
    as it refuses a negative normaliser; the states the model makes load."""
    model = kit.tiny_model("infini", {"update": "delta"})
    tokens = kit.random_tokens(model, 1, 11)
    with torch.no_grad():
        _, early = model(tokens[:, :3])  # block_size 4: no block complete
        _, later = model(tokens)  # two blocks written
    for name, state in (("early", early), ("later", later)):
        memzoo.save_state(state, str(tmp_path / f"{name}.safetensors"))
        memzoo.load_state(str(tmp_path / f"{name}.safetensors"), model=model)
    primed = early.map(lambda t: t.clone())
    primed.mem[1].add_(0.5)
    memzoo.save_state(primed, str(tmp_path / "primed.safetensors"))
    with pytest.raises(memzoo.StateError, match=r"'mem\[1\]' must be zero at position 3"):
        memzoo.load_state(str(tmp_path / "primed.safetensors"), model=model)
    negative = later.map(lambda t: t.clone())
    negative.norm[0][0, 0, 0] = -1.0
    memzoo.save_state(negative, str(tmp_path / "negative.safetensors"))
    with pytest.raises(memzoo.StateError, match=r"'norm\[0\]' must be >= 0"):
        memzoo.load_state(str(tmp_path / "negative.safetensors"), model=model)
