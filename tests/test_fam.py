"""TransformerFAM beyond the conformance suite: the fast path equals the paper's per-block
loop (outputs, state, every gradient), fam_len=0 is BSWA, the parameter budget, the
unbounded receptive field, gradients through the FAM recurrence, positions, the first
update's zero residual, the prompt pass, Random Position Offset, the partial-block rule
and Random State Passing helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import testing as kit
from memzoo.variants.fam import FAM, FAMState

D, H, L = 16, 2, 4  # the tiny sizes of the conformance kit


def backbone(seed: int = 0, **options) -> FAM:
    torch.manual_seed(seed)
    fields = dict(d_model=D, n_heads=H, n_layers=2, block_size=L, memory_blocks=1, fam_len=2)
    fields.update(options)
    model = memzoo.build_backbone("fam", **fields).double().eval()
    assert isinstance(model, FAM)
    return model


def grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    """Gradients of a loss that weighs every output differently, for every parameter and x."""
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    named = {n: p for n, p in model.named_parameters()} | {"x": x}
    out = torch.autograd.grad((y * w).sum(), list(named.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), out)}


# --------------------------------------------------------------- fast == reference
@settings(max_examples=40)
@given(
    m=st.integers(0, 2),
    fam_len=st.integers(0, L),
    layers=st.integers(1, 2),
    stop_gradient=st.booleans(),
    init=st.sampled_from(["prompt", "prefix"]),
    prefix_len=st.integers(0, 7),
    length=st.integers(1, 14),
    batch=st.integers(1, 2),
)
def test_fast_path_equals_reference_loop(m, fam_len, layers, stop_gradient, init, prefix_len, length, batch):
    """Outputs, final state and every gradient (parameters and input), from a fresh state
    and from a mid-stream state whose graph reaches back into the prefix."""
    model = backbone(memory_blocks=m, fam_len=fam_len, n_layers=layers, stop_gradient_memory=stop_gradient, init=init)
    x = torch.randn(batch, prefix_len + length, D, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (model.forward, model.forward_reference):
        state = None
        outs = []
        if prefix_len:
            y0, state = run(x[:, :prefix_len])
            outs.append(y0)
        y, state = run(x[:, prefix_len:], state)
        outs.append(y)
        y = torch.cat(outs, dim=1)
        results.append((y, state, grads(model, x, y)))
    (yf, sf, gf), (yr, sr, gr) = results
    kit.assert_close(yf.detach(), yr.detach(), "outputs fast vs reference")
    kit.assert_states_equal(sf, sr, "final state fast vs reference")
    for name in gr:
        kit.assert_close(gf[name], gr[name], f"grad of {name} fast vs reference")


def test_reference_is_chunk_invariant_too():
    model = backbone(memory_blocks=1, fam_len=3)
    x = torch.randn(2, 19, D, dtype=torch.float64)
    whole, s_whole = model(x)
    state, outs = None, []
    for a, b in [(0, 1), (1, 6), (6, 8), (8, 9), (9, 19)]:
        y, state = model.forward_reference(x[:, a:b], state)
        outs.append(y)
    kit.assert_close(torch.cat(outs, 1).detach(), whole.detach(), "reference chunked vs fast whole")
    kit.assert_states_equal(state, s_whole)


# ------------------------------------------------------------------- vs BSWA
def test_fam_len_zero_equals_bswa_with_the_same_weights():
    bswa = kit.tiny_model("bswa", {"memory_blocks": 1})
    fam = kit.tiny_model("fam", {"memory_blocks": 1, "fam_len": 0}, seed=1)
    fam.load_state_dict(bswa.state_dict())  # strict: no extra parameter at fam_len=0
    tokens = kit.random_tokens(bswa, 2, 19)
    (a, sa), (b, sb) = bswa(tokens), fam(tokens)
    kit.assert_close(b, a, "fam(fam_len=0) vs bswa")
    for i in range(2):
        kit.assert_close(sb.k[i], sa.k[i], "k cache")
        kit.assert_close(sb.v[i], sa.v[i], "v cache")
    streamed, _ = kit.run_chunked(fam, tokens, [3, 4, 11])
    kit.assert_close(streamed, a, "fam(fam_len=0) streamed vs bswa")


@pytest.mark.parametrize("fam_len,init,layers", [(0, "prompt", 2), (3, "prompt", 2), (4, "prompt", 3), (2, "prefix", 3)])
def test_parameter_count_is_bswa_plus_the_initial_fam(fam_len, init, layers):
    common = dict(d_model=D, n_heads=H, n_layers=layers, block_size=L, memory_blocks=2)
    n_bswa = sum(p.numel() for p in memzoo.build_backbone("bswa", **common).parameters())
    n_fam = sum(p.numel() for p in memzoo.build_backbone("fam", fam_len=fam_len, init=init, **common).parameters())
    extra = fam_len * D * (layers if init == "prefix" else 1)
    assert n_fam == n_bswa + extra


def test_bswa_weights_load_into_fam_and_only_the_prompt_is_missing():
    bswa = kit.tiny_model("bswa", {"memory_blocks": 1})
    fam = kit.tiny_model("fam", {"memory_blocks": 1, "fam_len": 2})
    result = fam.load_state_dict(bswa.state_dict(), strict=False)
    assert result.missing_keys == ["backbone.prompt"] and not result.unexpected_keys


@pytest.mark.parametrize("m,layers", [(0, 1), (1, 2)])
def test_receptive_field_is_unbounded_through_the_fam(m, layers):
    """Changing token 0 changes fam's outputs far beyond BSWA's reach n_layers·(m+1)·L;
    BSWA with the same weights does not change there."""
    fam = kit.tiny_model("fam", {"memory_blocks": m, "fam_len": 2}, n_layers=layers)
    bswa = kit.tiny_model("bswa", {"memory_blocks": m}, n_layers=layers)
    bswa.load_state_dict(fam.state_dict(), strict=False)
    reach = layers * (m + 1) * L
    tokens = kit.random_tokens(fam, 1, reach + 6 * L)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % fam.vocab_size
    with torch.no_grad():
        d_fam = (fam(tokens).logits - fam(changed).logits).abs().amax(dim=(0, 2))
        d_bswa = (bswa(tokens).logits - bswa(changed).logits).abs().amax(dim=(0, 2))
    assert torch.all(d_bswa[reach:] == 0)
    assert torch.all(d_fam[reach:] > 1e-12), f"fam unchanged beyond {reach}: {d_fam[reach:]}"


def test_gradient_reaches_the_prompt_and_flows_back_through_the_recurrence():
    """m=0, one layer: block 5 sees block 0 only through F_1 ... F_4."""
    model = backbone(memory_blocks=0, fam_len=2, n_layers=1)
    x = torch.randn(1, 6 * L, D, dtype=torch.float64, requires_grad=True)
    y, _ = model(x)
    g_x, g_prompt = torch.autograd.grad(y[:, 5 * L :].sum(), [x, model.prompt])
    assert g_x[:, :L].abs().sum() > 0, "no gradient from block 5 into block 0"
    assert g_prompt.abs().sum() > 0, "no gradient into the prompt"
    bswa = kit.tiny_model("bswa", {"memory_blocks": 0}, n_layers=1).backbone
    bswa.load_state_dict(model.state_dict(), strict=False)
    (g_bswa,) = torch.autograd.grad(bswa(x)[0][:, 5 * L :].sum(), x)
    assert g_bswa[:, : 5 * L].abs().sum() == 0


def test_prefix_init_gives_every_layer_its_own_learned_fam():
    model = backbone(fam_len=2, init="prefix", n_layers=3)
    x = torch.randn(1, 3 * L, D, dtype=torch.float64)
    (g,) = torch.autograd.grad(model(x)[0].sum(), model.prefix)
    assert model.prompt is None and model.prefix.shape == (3, 2, D)
    assert all(g[i].abs().sum() > 0 for i in range(3))
    state = model.init_state(2)
    for i in range(3):
        assert torch.equal(state.fam[i], model.prefix[i].expand(2, -1, -1))


# ------------------------------------------------------ white box: what one layer does
def _manual_layer(layer, h, fam, r, q_pos, f_pos, block_keys_from=None):
    """One layer of FAM for one complete block from scratch, m = 0: returns the block's
    outputs and the updated FAM (explicit softmax, no memzoo.ops)."""
    def proj(z, pos):
        q, k, v = layer.project_raw(z)
        return layer.positions.query(q, pos), layer.positions.key(k, pos), v

    q, k, v = proj(h, q_pos)
    fq, fk, fv = proj(fam, f_pos)
    s = layer.positions.scale
    keys, values = torch.cat([fk, k], 2), torch.cat([fv, v], 2)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(L, fam.shape[1], dtype=torch.bool), causal], 1)
    tok = torch.softmax((q @ keys.transpose(-1, -2) * s).masked_fill(~mask, -math.inf), -1) @ values
    new = torch.softmax(fq @ keys.transpose(-1, -2) * s, -1) @ values
    a = r * fam + layer.self_attn.o_proj(new.transpose(1, 2).flatten(-2))
    f_new = a + layer.mlp(layer.post_attention_layernorm(a))
    hh = h + layer.self_attn.o_proj(tok.transpose(1, 2).flatten(-2))
    return hh + layer.mlp(layer.post_attention_layernorm(hh)), f_new


def test_positions_and_first_update_zero_residual_by_hand():
    """One layer, m=0: block 0 with F_0 at -F..-1 and a zero residual, block 1 with F_1 at
    L-F..L-1 and residual 1, written out by hand; with a row offset added everywhere."""
    model = backbone(memory_blocks=0, fam_len=3, n_layers=1)
    layer = model.layers[0]
    x = torch.randn(2, 2 * L, D, dtype=torch.float64)
    fresh = model.init_state(2)
    state = model.new_sequence(fresh.fam, fresh.residual, offset=torch.tensor([0, 1000]))
    y, out_state = model(x, state)
    f0 = model.prompt.expand(2, -1, -1)
    off = state.offset[:, None]
    y0, f1 = _manual_layer(layer, x[:, :L], f0, 0.0, torch.arange(L) + off, torch.arange(-3, 0) + off)
    y1, f2 = _manual_layer(layer, x[:, L:], f1, 1.0, torch.arange(L, 2 * L) + off, torch.arange(L - 3, L) + off)
    kit.assert_close(y, torch.cat([y0, y1], 1), "outputs vs the hand-written layer")
    kit.assert_close(out_state.fam[0], f2, "FAM after two blocks vs by hand")
    # a residual of 1 on the first update gives a different FAM: the zero residual is real
    _, f1_wrong = _manual_layer(layer, x[:, :L], f0, 1.0, torch.arange(L) + off, torch.arange(-3, 0) + off)
    _, s1 = model(x[:, :L], state)
    kit.assert_close(s1.fam[0], f1, "F_1")
    assert not torch.allclose(s1.fam[0], f1_wrong)


def test_fam_positions_used_by_the_fast_path():
    """Record every (B, F)-shaped position tensor handed to RoPE: the FAM input of block c
    sits at c·L-F .. c·L-1 plus the row offset, for its keys (made once, when the FAM is
    made) and for its queries (rotated only for an update)."""
    model = backbone(memory_blocks=1, fam_len=2, n_layers=1)
    rope = model.layers[0].positions
    seen: dict[str, list[list[list[int]]]] = {"key": [], "query": []}
    for kind in seen:
        def recording(t, pos, original=getattr(rope, kind), kind=kind):
            if pos.shape[-1] == 2:
                seen[kind].append(pos.tolist())
            return original(t, pos)
        setattr(rope, kind, recording)

    # the scan makes every update's rotations at once (positions_at) and applies them with
    # the *_at methods: record the positions each one was made for
    made_for: dict[int, list[list[int]]] = {}

    def recording_at(pos, like, original=rope.positions_at):
        made = original(pos, like)
        for j, at in enumerate(made):
            made_for[id(at)] = pos[:, j].tolist()
        return made
    rope.positions_at = recording_at
    for name, kinds in (("query_at", ("query",)), ("key_at", ("key",)), ("query_key_at", ("query", "key"))):
        def recording_one(*args, original=getattr(rope, name), kinds=kinds):
            for kind in kinds:
                seen[kind].append(made_for[id(args[-1])])
            return original(*args)
        setattr(rope, name, recording_one)

    def shifted(*blocks):
        return [[[a + 5, b + 5], [a, b]] for a, b in blocks]

    fresh = model.init_state(2)
    seen["key"].clear()
    with torch.no_grad():
        state = model.new_sequence(fresh.fam, fresh.residual, offset=torch.tensor([5, 0]))
        assert seen["key"] == shifted([-2, -1]) and seen["query"] == []
        _, state = model(torch.randn(2, 6, D, dtype=torch.float64), state)  # block 0, block 1 partial
        assert seen["key"] == shifted([-2, -1], [2, 3])  # F_1 made at block 1's FAM positions
        assert seen["query"] == shifted([-2, -1])  # F_0's, for its update; block 1 is not complete
        model(torch.randn(2, 5, D, dtype=torch.float64), state)  # positions 6..10: blocks 1, 2
        assert seen["key"] == shifted([-2, -1], [2, 3], [6, 7])
        assert seen["query"] == shifted([-2, -1], [2, 3])  # F_1 (from the state) updated at block 1's end
        seen["key"].clear(), seen["query"].clear()
        model(torch.randn(2, 10, D, dtype=torch.float64), state)  # positions 6..15: blocks 1, 2, 3 complete
        assert seen["key"] == shifted([6, 7], [10, 11], [14, 15])  # F_2, F_3, F_4
        assert seen["query"] == shifted([2, 3], [6, 7], [10, 11])  # F_1, F_2, F_3 for their updates; F_4 unused
    assert model.fam_positions(0, torch.zeros(1, dtype=torch.long)).tolist() == [[-2, -1]]


def test_the_fam_keys_in_the_state_belong_to_its_fam():
    model = backbone(memory_blocks=1, fam_len=3, position_offset_max=100).train()
    x = torch.randn(2, 11, D, dtype=torch.float64)
    state = model.init_state(2)
    for a, b in [(0, 3), (3, 4), (4, 11)]:
        _, state = model(x[:, a:b], state)
        fk, fv = model.fam_kv(state.fam, state.pos // L, state.offset)
        for i in range(2):
            kit.assert_close(state.fam_k[i], fk[i], "cached FAM keys")
            kit.assert_close(state.fam_v[i], fv[i], "cached FAM values")


def test_initial_fam_is_each_layers_input_for_the_prompt_with_full_attention():
    model = backbone(fam_len=3, n_layers=3)
    state = model.init_state(2)
    h = model.prompt[None]
    pos = torch.arange(-3, 0)
    for i, layer in enumerate(model.layers):
        kit.assert_close(state.fam[i], h.expand(2, -1, -1), f"initial FAM of layer {i}")
        q, k, v = layer.project(h, pos)
        probs = torch.softmax(q @ k.transpose(-1, -2) * layer.positions.scale, -1)  # no mask: full attention
        h = layer.feed_forward(layer.attend_residual(h, probs @ v))
    assert torch.all(state.residual == 0) and state.pos == 0
    # non-causal: the last prompt vector reaches layer 1's first FAM row
    (g,) = torch.autograd.grad(state.fam[1][0, 0].sum(), model.prompt)
    assert g[-1].abs().sum() > 0


# -------------------------------------------------------------- partial blocks
def test_a_partial_block_gets_outputs_but_no_fam_update():
    model = backbone(memory_blocks=0, fam_len=2)
    x = torch.randn(2, 3 * L, D, dtype=torch.float64)
    with torch.no_grad():
        _, s_two = model(x[:, : 2 * L])
        for r in range(1, L):
            _, s_part = model(x[:, : 2 * L + r])
            for a, b in zip(s_part.fam, s_two.fam):
                kit.assert_close(a, b, f"FAM after {r} tokens of a partial block")
        _, s_three = model(x)
        assert not torch.allclose(s_three.fam[0], s_two.fam[0]), "no update when the block completed"
        # the partial block's queries see the previous FAM
        y, _ = model(x[:, 2 * L : 2 * L + 2], s_two)
        bumped = model.replace_fam(s_two, [f + 1 for f in s_two.fam])
        y_bumped, _ = model(x[:, 2 * L : 2 * L + 2], bumped)
        assert (y - y_bumped).abs().amin() > 0
        # residual weight: 0 until the first block completes
        assert torch.all(model(x[:, : L - 1])[1].residual == 0)
        assert torch.all(model(x[:, :L])[1].residual == 1)


# ------------------------------------------------------- Random Position Offset
def test_offsets_are_drawn_only_in_training():
    model = backbone(position_offset_max=63_000)
    assert torch.all(model.init_state(64).offset == 0)  # eval mode
    model.train()
    torch.manual_seed(0)
    offsets = model.init_state(4000).offset
    assert offsets.dtype == torch.int64 and offsets.min() >= 0 and offsets.max() < 63_000
    zero = (offsets == 0).double().mean().item()
    assert 0.45 < zero < 0.55, f"fraction zeroed {zero}, expected ~1/2"  # 4000 draws: sd 0.008
    nonzero = offsets[offsets > 0].double()
    assert abs(nonzero.mean().item() / 63_000 - 0.5) < 0.05 and nonzero.max() > 60_000
    assert torch.all(backbone(position_offset_max=0).train().init_state(64).offset == 0)  # switched off


def test_state_equivalence_in_training_mode_with_offsets():
    model = backbone(memory_blocks=1, fam_len=2, position_offset_max=63_000).train()
    torch.manual_seed(1)
    state = model.init_state(3)  # offsets 5845, 0, 29124 with this seed
    assert torch.any(state.offset > 0)
    x = torch.randn(3, 17, D, dtype=torch.float64)
    whole, s_whole = model(x, state)
    s, outs = state, []
    for a, b in [(0, 2), (2, 3), (3, 9), (9, 17)]:
        y, s = model(x[:, a:b], s)
        outs.append(y)
    kit.assert_close(torch.cat(outs, 1), whole, "chunked vs whole with offsets")
    kit.assert_states_equal(s, s_whole)
    assert torch.equal(s.offset, state.offset)
    # RoPE is relative: a whole-sequence offset changes nothing but rounding
    plain, _ = model(x, model.new_sequence(state.fam, state.residual, torch.zeros_like(state.offset)))
    kit.assert_close(whole, plain, "outputs with vs without offsets")


# ------------------------------------------------------- Random State Passing
def test_carry_state_keeps_only_the_fam():
    model = backbone(memory_blocks=1, fam_len=2, position_offset_max=1000).train()
    x = torch.randn(2, 2 * L + 1, D, dtype=torch.float64)
    _, state = model(x)
    torch.manual_seed(1)
    carried = model.carry_state(state)
    assert isinstance(carried, FAMState) and carried.pos == 0
    assert all(k.shape[2] == 0 for k in carried.k + carried.v)
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(carried.fam, state.fam))
    assert torch.equal(carried.residual, state.residual) and torch.all(carried.residual == 1)
    torch.manual_seed(1)
    assert torch.equal(carried.offset, model.draw_offsets(2, x.device))  # new offsets, drawn (training)
    assert torch.any(carried.offset > 0)  # [0, 139] with this seed
    # a new sequence from the carried FAM differs from one from the learned prompt
    model.eval()
    carried, fresh = model.carry_state(state), model.init_state(2)
    y_carried, _ = model(x[:, :3], carried)
    y_fresh, _ = model(x[:, :3], fresh)
    assert not torch.allclose(y_carried, y_fresh)
    # per-row reset to the learned FAM
    mixed = carried.where(torch.tensor([True, False]), fresh)
    y_mixed, _ = model(x[:, :3], mixed)
    kit.assert_close(y_mixed[0], y_carried[0], "kept row")
    kit.assert_close(y_mixed[1], y_fresh[1], "reset row")
    with pytest.raises(memzoo.StateError):
        model.carry_state(kit.tiny_model("bswa").init_state(1))


# ---------------------------------------------------------------------- config
def test_config_refuses_fam_longer_than_a_block():
    with pytest.raises(ValueError, match="fam_len .* must be <= block_size"):
        memzoo.build_model("fam", block_size=4, fam_len=5)
    with pytest.raises(ValueError, match="position_offset_max"):
        memzoo.build_model("fam", block_size=4, fam_len=2, position_offset_max=-1)
    model = memzoo.build_model("fam", d_model=D, n_heads=H, block_size=4, fam_len=4, memory_blocks=0)
    assert model(torch.zeros(1, 9, dtype=torch.long)).logits.shape == (1, 9, 256)


def test_fam_runs_on_the_shared_kv_engine():
    """FAM is BSWA's K/V engine plus the extra-rows hook: it has no step, window or cache
    rule of its own (one implementation of the engine, tested with every K/V variant)."""
    from memzoo.variants.bswa import BSWA
    from memzoo.variants.kv import BlockWindowBackbone, KVCacheBackbone

    assert issubclass(FAM, BlockWindowBackbone) and issubclass(BSWA, BlockWindowBackbone)
    for name in ("step", "layout", "keep_from", "evict", "cached_positions"):
        assert name not in vars(FAM), f"FAM defines its own {name}"
    assert FAM.step is KVCacheBackbone.step and "extra_rows" in vars(FAM)
    model = backbone(memory_blocks=1, fam_len=2)
    assert model.layout() == BSWA.layout(model)
