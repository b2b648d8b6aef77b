"""Block-Recurrent Transformer beyond the conformance suite: the fast path against the
block-by-block reference (outputs, states, every gradient), the degenerate case (no
state read = bswa with one memory block), the state layers training and reaching beyond
the window (the lucidrains port's issue #3), the receptive field, gates, bounded state."""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import testing as kit
from memzoo.variants.brt import GATES, Gate
from memzoo.variants.naive import brt_reference

F64 = torch.float64
SIZE = 4  # the kit's block_size


def _x(t: int, seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, t, 16, dtype=F64, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("preset", ["memzoo", "llama", "qwen2"])
@pytest.mark.parametrize("gate", GATES)
def test_fast_path_equals_the_block_loop(gate, preset, backend):
    model = kit.tiny_model("brt", {"num_states": 3, "gate": gate}, backend=backend, **kit.LAYER_PRESETS[preset]).backbone
    x = _x(18)
    y, state = model(x)
    ref, cells = brt_reference(model, x)
    kit.assert_close(y, ref, f"brt {gate} vs block loop")
    kit.assert_close(state.cells, cells, "final states")
    names, params = zip(*model.named_parameters())
    for name, a, e in zip(("x", *names), _grads(y, [x, *params]), _grads(ref, [x, *params])):
        kit.assert_close(a, e, f"grad of {name}")


@pytest.mark.parametrize("layer", [0, 1])
def test_streaming_equals_the_block_loop_with_gradients(layer):
    model = kit.tiny_model("brt", {"num_states": 2, "recurrent_layer": layer, "gate": "lstm:dual"}).backbone
    x = _x(15, seed=1, batch=1)
    ref, cells = brt_reference(model, x)
    params = [x, *model.cell.parameters()]
    expected = _grads(ref, params)
    for cuts in ([1, 2, 6, 7, 8, 13], list(range(1, 15))):
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, 15]):
            y, state = model(x[:, a:b], state)
            outs.append(y)
        y = torch.cat(outs, 1)
        kit.assert_close(y, ref, f"chunked at {cuts} vs block loop")
        kit.assert_close(state.cells, cells, "states after streaming")
        for a, e in zip(_grads(y, params), expected):
            kit.assert_close(a, e, "gradient through the streamed states")


def _cut_state_reads(model: memzoo.MemzooLM) -> memzoo.MemzooLM:
    with torch.no_grad():
        model.backbone.cell.cross_o_proj.weight.zero_()  # tokens no longer read the states
    return model


def test_without_state_reads_it_is_bswa_with_one_memory_block():
    brt = kit.tiny_model("brt", {"num_states": 3})
    bswa = kit.tiny_model("bswa", {"memory_blocks": 1})
    missing, unexpected = brt.load_state_dict(bswa.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("backbone.cell.") for k in missing)
    _cut_state_reads(brt)
    tokens = kit.random_tokens(bswa, 2, 19)
    kit.assert_close(brt(tokens).logits, bswa(tokens).logits, "brt without state reads vs bswa(m=1)")


def _reach(model: memzoo.MemzooLM, length: int, at: int = 0) -> torch.Tensor:
    tokens = kit.random_tokens(model, 1, length)
    changed = tokens.clone()
    changed[0, at] = (changed[0, at] + 1) % model.vocab_size
    with torch.no_grad():
        return (model(tokens).logits - model(changed).logits).abs().amax(dim=(0, 2))


@pytest.mark.parametrize("layers,recurrent", [(1, 0), (2, 1), (3, 1)])
def test_receptive_field(layers, recurrent):
    """Through the states token 0 reaches every later position (12 blocks on here); the
    windows alone reach exactly the positions < (n_layers + 1)·L (bswa with m = 1), so
    everything beyond comes through the state."""
    opts = {"num_states": 3, "recurrent_layer": recurrent}
    length = 12 * SIZE
    window_reach = (layers + 1) * SIZE
    diff = _reach(kit.tiny_model("brt", opts, n_layers=layers), length)
    assert torch.all(diff > 0), f"positions token 0 does not reach: {torch.nonzero(diff == 0).flatten().tolist()}"
    cut = _reach(_cut_state_reads(kit.tiny_model("brt", opts, n_layers=layers)), length)
    assert torch.all(cut[:window_reach] > 0) and torch.all(cut[window_reach:] == 0), cut


def test_the_state_reads_only_completed_blocks():
    """A change inside block 2 leaves the states alone while block 2 is partial and
    changes them once it completes (the update is on the block grid)."""
    model = kit.tiny_model("brt", {"num_states": 2}).backbone
    x = _x(12, batch=1).detach()
    y = x.clone()
    y[0, 9] += 1.0
    with torch.no_grad():
        assert torch.equal(model(x[:, :11])[1].cells, model(y[:, :11])[1].cells)
        assert not torch.allclose(model(x)[1].cells, model(y)[1].cells)


def test_the_state_layers_train():
    """The recurrent weights get gradient from outputs far beyond every window (through
    the states), and a gradient step on them alone changes those outputs."""
    model = kit.tiny_model("brt", {"num_states": 3, "gate": "lstm:dual"})
    tokens = kit.random_tokens(model, 2, 12 * SIZE)
    far = slice(10 * SIZE, None)  # beyond the window reach (n_layers + 1)·L = 12 by far
    logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits[:, far].flatten(0, 1), tokens[:, far].flatten())
    names, params = zip(*model.backbone.cell.named_parameters())
    grads = torch.autograd.grad(loss, params)
    dead = [n for n, g in zip(names, grads) if not g.abs().sum() > 0]
    assert not dead, f"recurrent parameters with no gradient from far outputs: {dead}"
    # and the gradient into the first block's tokens (the states carry it back 10 blocks)
    x = model.embed(tokens).detach().requires_grad_(True)
    y, _ = model.backbone(x)
    (gx,) = torch.autograd.grad(y[:, far].sum(), x)
    assert gx[:, :SIZE].abs().sum() > 0, "no gradient reaches block 0 through the states"
    before = logits[:, far].detach()
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 0.5 * g
        after = model(tokens).logits[:, far]
    assert (after - before).abs().max() > 1e-3, "a step on the recurrent weights did not change far outputs"


def test_gates_start_as_documented():
    c, a = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 3, 8, dtype=F64)
    fixed = Gate("fixed", 8).to(F64)
    g = torch.sigmoid(torch.tensor(1.0, dtype=F64))
    kit.assert_close(fixed(c, a), c * g + a * (1 - g), "fixed gate at init")
    lstm = Gate("lstm", 8).to(F64)
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()
    # z = tanh(0) = 0, f = σ(0 + 1): the old state kept with weight σ(1), nothing written
    kit.assert_close(lstm(c, a), c * g, "lstm gate with zero weights")


@pytest.mark.parametrize("kind", ["fixed", "lstm"])
def test_gate_scan_form_equals_the_gate(kind):
    """Gate.apply (the scan's form: σ(b_g) computed once, a lerp) == Gate.forward (the
    reference's), values and the gradients of the states, the input and every weight."""
    gen = torch.Generator().manual_seed(4)
    c = torch.randn(2, 3, 8, dtype=F64, generator=gen, requires_grad=True)
    a = torch.randn(2, 3, 8, dtype=F64, generator=gen, requires_grad=True)
    gate = Gate(kind, 8).to(F64)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, dtype=F64, generator=gen))
    inputs = [c, a, *gate.parameters()]
    got, want = gate.apply(c, a, gate.weight()), gate(c, a)
    kit.assert_close(got, want, f"{kind} gate: scan form")
    w = torch.randn(want.shape, dtype=F64, generator=gen)
    for x, y in zip(torch.autograd.grad((got * w).sum(), inputs), torch.autograd.grad((want * w).sum(), inputs)):
        kit.assert_close(x, y, f"{kind} gate: scan form gradient")


def test_streaming_state_is_bounded_and_static_once_full():
    model = kit.tiny_model("brt", {"num_states": 3})
    state, sizes = None, []
    with torch.no_grad():
        for i in range(40):
            _, state = model(torch.full((1, 1), i % 20), state=state)
            sizes.append(state.k[0].shape[2])
    ring = 2 * SIZE  # a ring buffer of the previous and the own block: it fills, then keeps its shape
    assert sizes == [*range(1, ring + 1), *[ring] * (40 - ring)] and state.cells.shape == (1, 3, 16)


def test_config_errors_say_what_is_valid():
    with pytest.raises(ValueError, match=r"recurrent_layer 2 is out of range for n_layers=2: valid are -2 \.\. 1"):
        memzoo.build_model("brt", n_layers=2, recurrent_layer=2)
    with pytest.raises(ValueError, match="fixed:skip"):
        memzoo.build_model("brt", gate="fixed")
    with pytest.raises(ValueError, match="num_states"):
        memzoo.build_model("brt", num_states=0)
