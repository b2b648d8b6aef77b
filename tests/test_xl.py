"""Transformer-XL beyond the conformance suite: the relative position scheme against the
paper's formula, the variant against a slow segment-by-segment reference, both halves
of the stop-gradient, the degenerate case, receptive field and bounded state."""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import ops
from memzoo import testing as kit
from memzoo.layers import POSITION_SCHEMES, make_positions
from memzoo.layers.relative import RelativePositions, relative_attention_reference
from memzoo.ops import BlockLayout
from memzoo.variants.xl import XLConfig, xl_reference

F64 = torch.float64


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 3) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return list(torch.autograd.grad((out * w).sum(), inputs, allow_unused=False))


def _scheme(heads: int = 3, head_dim: int = 4, rel_dim: int = 10, seed: int = 0) -> RelativePositions:
    torch.manual_seed(seed)
    scheme = RelativePositions(head_dim, heads, rel_dim).to(F64)
    with torch.no_grad():  # biases away from their small init, so every term matters
        scheme.u.normal_()
        scheme.v.normal_()
    return scheme


# ------------------------------------------------------------ the position scheme
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("q_start,n_keys,window", [(0, 11, None), (9, 14, 5), (100_003, 9, 3), (7, 7, 0)])
def test_relative_scheme_equals_the_papers_formula(backend, q_start, n_keys, window):
    """query(q, i)·key(k, j) as ordinary attention == explicit (i-j) encoding, outputs
    and gradients of q, k, v, u, v-bias and W_r, with key width != value width."""
    scheme = _scheme()
    layout = BlockLayout(block_size=4, window=window) if window is not None else BlockLayout()
    n_q = min(n_keys, 6)
    b, h, dh = 2, scheme.n_heads, scheme.head_dim
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, n_q, dh, generator=gen, dtype=F64, requires_grad=True)
    k = torch.randn(b, h, n_keys, dh, generator=gen, dtype=F64, requires_grad=True)
    v = torch.randn(b, h, n_keys, dh, generator=gen, dtype=F64, requires_grad=True)
    q_pos = torch.arange(q_start, q_start + n_q)
    k_pos = torch.arange(q_start + n_q - n_keys, q_start + n_q)
    fast = ops.attend(
        scheme.query(q, q_pos), scheme.key(k, k_pos), v,
        layout=layout, q_start=q_start, scale=scheme.scale, backend=backend,
    )
    allowed = layout.visible(q_pos[:, None], k_pos[None, :])
    slow = relative_attention_reference(q, k, v, q_pos, k_pos, allowed, scheme)
    kit.assert_close(fast, slow, "relative scheme vs explicit R_{i-j}")
    content, position = scheme.query_terms(q)  # the paper's form: relative-position keys
    table = scheme.distance_table(n_keys + 2, q)
    keyed = ops.attend(
        content, k, v, rel_q=position, rel_k=table, layout=layout, q_start=q_start, scale=scheme.scale, backend=backend
    )
    kit.assert_close(keyed, slow, "relative-position keys vs explicit R_{i-j}")
    inputs = [q, k, v, scheme.u, scheme.v, scheme.w_r]
    for name, a, e, w in zip(["q", "k", "v", "u", "v_bias", "w_r"], _grads(fast, inputs), _grads(slow, inputs), _grads(keyed, inputs)):
        kit.assert_close(a, e, f"grad of {name}")
        kit.assert_close(w, e, f"grad of {name} (relative-position keys)")


def test_distance_table_is_reused_while_decoding_and_renewed_when_w_r_changes():
    scheme = _scheme()
    like = torch.zeros((), dtype=F64)
    with torch.no_grad():
        first = scheme.distance_table(5, like, most=40)
        again = scheme.distance_table(7, like, most=40)  # grown (to 10 rows), then sliced
        assert scheme._table_memo[1].shape[1] == 10 and again.shape == (3, 7, 4)
        assert again.data_ptr() == scheme.distance_table(7, like, most=40).data_ptr()  # reused
        kit.assert_close(again[:, :5], first, "a longer table starts with the shorter one")
        scheme.w_r.mul_(2.0)  # an in-place update, as an optimizer step
        doubled = scheme.distance_table(7, like, most=40)
    kit.assert_close(doubled, 2 * again, "the table after W_r changed")
    fresh = scheme.distance_table(7, like)  # with gradients: computed, never kept
    assert fresh.requires_grad and scheme._table_memo[1].shape[1] == 7  # renewed at 7 rows, not grown
    kit.assert_close(fresh, doubled, "with and without gradients")


def test_relative_scores_depend_only_on_distance():
    scheme = _scheme()
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 3, 5, 4, generator=gen, dtype=F64)
    k = torch.randn(1, 3, 5, 4, generator=gen, dtype=F64)
    pos = torch.arange(5)
    near = scheme.query(q, pos) @ scheme.key(k, pos).transpose(-1, -2)
    far = scheme.query(q, pos + 1_000_000) @ scheme.key(k, pos + 1_000_000).transpose(-1, -2)
    kit.assert_close(far, near, "scores shifted by 10^6 positions")
    # distinct distances do give distinct position terms
    assert not torch.allclose(near[..., 1:, :1], near[..., :-1, :1])


def test_relative_scheme_float32_at_large_positions():
    scheme = _scheme()
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 3, 6, 4, generator=gen, dtype=F64) for _ in range(2))
    pos = torch.arange(123_456, 123_462)
    exact = scheme.query(q, pos) @ scheme.key(k, pos).transpose(-1, -2)
    s32 = scheme.to(torch.float32)
    approx = s32.query(q.float(), pos) @ s32.key(k.float(), pos).transpose(-1, -2)
    torch.testing.assert_close(approx.double(), exact, atol=2e-4, rtol=1e-4)


def test_relative_scheme_is_registered_and_validates():
    assert POSITION_SCHEMES["relative"] is RelativePositions
    scheme = make_positions("relative", 8)
    assert isinstance(scheme, RelativePositions) and scheme.rel_dim == 8
    out = scheme.query(torch.zeros(1, 2, 3, 8), torch.arange(3))
    assert out.shape == (1, 2, 3, 16)
    with pytest.raises(ValueError, match="even"):
        RelativePositions(4, 2, rel_dim=5)


# -------------------------------------------------------- the variant vs the paper
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize(
    "opts",
    [{"memory_len": 3}, {"memory_len": 6, "relative_dim": 6}, {"memory_len": 9, "positions": "rope"}, {"memory_len": 0}],
)
def test_xl_equals_segment_by_segment_reference(backend, opts):
    """Parallel layer-by-layer XL == the paper's segment loop with detached memory:
    outputs, input gradients and every parameter gradient (float64)."""
    model = kit.tiny_model("xl", opts, backend=backend).backbone
    x = torch.randn(2, 19, 16, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y, _ = model(x)
    ref = xl_reference(model, x)
    kit.assert_close(y, ref, f"xl {opts} vs reference")
    names, params = zip(*model.named_parameters())
    for name, a, e in zip(("x", *names), _grads(y, [x, *params]), _grads(ref, [x, *params])):
        kit.assert_close(a, e, f"grad of {name}")


def test_streaming_with_uneven_memory_matches_reference():
    """M not a multiple of L, token-by-token and odd chunks, with gradients."""
    model = kit.tiny_model("xl", {"memory_len": 7}).backbone
    x = torch.randn(1, 23, 16, dtype=F64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ref = xl_reference(model, x)
    (g_ref,) = _grads(ref, [x])
    for cuts in ([3, 4, 5, 11, 12, 20], list(range(1, 23))):
        state, outs = None, []
        for a, b in zip([0, *cuts], [*cuts, 23]):
            y, state = model(x[:, a:b], state)
            outs.append(y)
        y = torch.cat(outs, 1)
        kit.assert_close(y, ref, f"chunked at {cuts} vs reference")
        kit.assert_close(_grads(y, [x])[0], g_ref, f"input grad chunked at {cuts}")


def test_xl_runs_the_papers_form_and_the_widened_form_where_a_backend_lacks_it(monkeypatch):
    """With relative positions, xl hands the backend Dh-wide queries/keys plus
    relative-position keys; where the backend does not implement them (xformers), it
    uses the widened exact form instead: same outputs, states and gradients."""
    from memzoo.variants import xl as xl_mod

    model = kit.tiny_model("xl", {"memory_len": 5}).backbone
    x = torch.randn(2, 14, 16, dtype=F64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    widths = []
    reference = ops.get_backend("sdpa")

    def spy(inputs):
        widths.append((inputs.q.shape[-1], inputs.rel_q is not None))
        return type(reference).attend(reference, inputs)

    monkeypatch.setattr(reference, "attend", spy, raising=False)
    y, state = model(x)
    assert set(widths) == {(model.head_dim, True)}
    widths.clear()
    monkeypatch.setattr(xl_mod.ops, "takes_relative_keys", lambda name: False)
    y_wide, state_wide = model(x)
    assert set(widths) == {(model.head_dim + model.d_model, False)}
    kit.assert_close(y, y_wide, "relative-position keys vs widened queries/keys")
    kit.assert_states_equal(state, state_wide, "state")
    params = [x, *model.parameters()]
    for a, e in zip(_grads(y, params), _grads(y_wide, params)):
        kit.assert_close(a, e, "gradient")


def test_two_streams_taking_turns_each_keep_their_decode_cache(monkeypatch):
    """The no-grad cache keeps the last few states per layer: two streams decoded in turns
    (two conversations, or the same state fed twice) still project one row per token."""
    model = kit.tiny_model("xl", {"memory_len": 6})
    rows: list[int] = []
    original = type(model.backbone)._kv

    def counting(self, layer, normed, *rest):
        rows.append(normed.shape[1])
        return original(self, layer, normed, *rest)

    a, b = kit.random_tokens(model, 1, 20, seed=1), kit.random_tokens(model, 1, 20, seed=2)
    with torch.no_grad():
        _, sa = model(a[:, :10])
        _, sb = model(b[:, :10])
        monkeypatch.setattr(type(model.backbone), "_kv", counting)
        outs_a, outs_b = [], []
        for i in range(10, 20):
            out, sa = model(a[:, i : i + 1], sa)
            outs_a.append(out)
            out, sb = model(b[:, i : i + 1], sb)
            outs_b.append(out)
        monkeypatch.undo()
        assert rows == [1] * len(rows) and len(rows) == 2 * 10 * model.backbone.n_layers
        for tokens, outs in ((a, outs_a), (b, outs_b)):
            kit.assert_close(torch.cat(outs, 1), model(tokens).logits[:, 10:], "turn-taking streams vs one call")


def test_two_conversations_taking_turns_through_generate_keep_their_decode_cache(monkeypatch):
    """generate() decodes in place (ring.written_in_place): every token leaves the same state
    tensor at a new version. Those stale entries replace the stream's own entry; they must
    not push the other conversation's out (it would re-project its whole memory every turn)."""
    model = kit.tiny_model("xl", {"memory_len": 12})
    rows: list[int] = []
    original = type(model.backbone)._kv

    def counting(self, layer, normed, *rest):
        rows.append(normed.shape[1])
        return original(self, layer, normed, *rest)

    gen = torch.Generator().manual_seed(0)
    states = {}
    for c in "ab":
        _, states[c] = model.generate(torch.randint(0, model.vocab_size, (1, 40), generator=gen), 1, return_state=True)
    monkeypatch.setattr(type(model.backbone), "_kv", counting)
    for _ in range(3):
        for c in "ab":
            prompt = torch.randint(0, model.vocab_size, (1, 3), generator=gen)
            _, states[c] = model.generate(prompt, 8, state=states[c], return_state=True)
    monkeypatch.undo()
    assert max(rows) <= 3, f"rows projected per call: {sorted(set(rows))} (the memory re-projected)"


def test_xl_decode_cache_notices_a_change_of_formulation(monkeypatch):
    """The no-grad key cache holds keys of one formulation; a call on a backend that needs
    the other re-projects (it would otherwise attend widened queries to plain keys)."""
    from memzoo.variants import xl as xl_mod

    model = kit.tiny_model("xl", {"memory_len": 5}).backbone
    x = torch.randn(1, 9, 16, dtype=F64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        whole, _ = model(x)
        _, state = model(x[:, :8])
        monkeypatch.setattr(xl_mod.ops, "takes_relative_keys", lambda name: False)
        last, _ = model(x[:, 8:], state)
    kit.assert_close(last, whole[:, 8:], "the next token after switching formulation")


# -------------------------------------------------------------- the stop-gradient
def test_no_gradient_flows_into_earlier_segments():
    model = kit.tiny_model("xl", {"memory_len": 4}, n_layers=2).backbone
    x = torch.randn(1, 12, 16, dtype=F64, requires_grad=True)
    y, _ = model(x)
    (g,) = torch.autograd.grad(y[:, 4:8].sum(), x)
    assert g[:, :4].abs().sum() == 0, "segment 1's outputs must not send gradient into segment 0"
    assert g[:, 4:8].abs().sum() > 0
    # while the forward values do depend on segment 0 (the memory is used)
    x2 = x.detach().clone()
    x2[:, 0] += 1.0
    assert not torch.allclose(model(x2).y[:, 4:8], y[:, 4:8].detach())


def _segment1_kv_weight_grad(model, x, memory_keys_learn: bool) -> torch.Tensor:
    """Gradient of segment 1's output wrt the layer's K/V weights, one layer, written out:
    memory keys projected from the detached inputs with live weights (XL) or with
    frozen weights (what it would be if the memory were cached keys)."""
    layer = model.layers[0]
    h0, h1 = x[:, :4].detach(), x[:, 4:8]
    q, k1, v1 = layer.project_raw(h1)
    if memory_keys_learn:
        _, k0, v0 = layer.project_raw(h0)
    else:
        with torch.no_grad():
            _, k0, v0 = layer.project_raw(h0)
    q_pos, k_pos = torch.arange(4, 8), torch.arange(0, 8)
    allowed = k_pos[None, :] <= q_pos[:, None]
    heads = relative_attention_reference(q, torch.cat([k0, k1], 2), torch.cat([v0, v1], 2), q_pos, k_pos, allowed, layer.positions)
    out = layer.feed_forward(layer.attend_residual(h1, heads))
    attn = layer.self_attn
    return torch.cat(_grads(out, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))


def test_kv_weights_learn_through_memory_keys():
    model = kit.tiny_model("xl", {"memory_len": 4}, n_layers=1).backbone
    x = torch.randn(1, 8, 16, dtype=F64, generator=torch.Generator().manual_seed(6))
    y, _ = model(x)
    attn = model.layers[0].self_attn
    g = torch.cat(_grads(y[:, 4:8], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
    kit.assert_close(g, _segment1_kv_weight_grad(model, x, True), "W_qkv grad vs memory re-projected with live weights")
    frozen = _segment1_kv_weight_grad(model, x, False)
    k_and_v = slice(16, 48)
    assert (g[k_and_v] - frozen[k_and_v]).abs().max() > 1e-6, "memory keys must contribute to the K/V weight gradient"
    kit.assert_close(g[:16], frozen[:16], "W_q grad does not depend on how memory keys were made")


# ------------------------------------------------------------ structural facts
def test_xl_rope_with_memory_covering_everything_equals_full():
    t = 19
    full = kit.tiny_model("full")
    xl = kit.tiny_model("xl", {"memory_len": t, "positions": "rope"})
    xl.load_state_dict(full.state_dict())
    tokens = kit.random_tokens(full, 2, t)
    kit.assert_close(xl(tokens).logits, full(tokens).logits, "xl(rope, M >= T) vs full")
    # the stop-gradient is the only difference: gradients into earlier positions differ
    x = full.embed(tokens).detach().requires_grad_(True)
    g_full = _grads(full.backbone(x).y, [x])[0]
    g_xl = _grads(xl.backbone(x).y, [x])[0]
    assert not torch.allclose(g_xl, g_full)
    short = kit.tiny_model("xl", {"memory_len": 4, "positions": "rope"})
    short.load_state_dict(full.state_dict())
    assert not torch.allclose(short(tokens).logits, full(tokens).logits)


@pytest.mark.parametrize("mem,layers", [(4, 1), (4, 2), (8, 2)])
def test_forward_reach_grows_by_the_memory_per_layer(mem, layers):
    """Token 0 reaches exactly positions < n_layers·M + L (M a multiple of L): layer 1
    reaches the segments that still hold it in memory, each further layer M more."""
    size = 4
    model = kit.tiny_model("xl", {"memory_len": mem}, n_layers=layers)
    reach = layers * mem + size
    tokens = kit.random_tokens(model, 1, reach + 2 * size)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.vocab_size
    with torch.no_grad():
        diff = (model(tokens).logits - model(changed).logits).abs().amax(dim=(0, 2))
    assert torch.all(diff[reach:] == 0), f"changed beyond reach {reach}: {diff[reach:]}"
    assert diff[reach - 1] > 0


def test_streaming_state_is_bounded_and_static_once_full():
    size, mem = 4, 6
    model = kit.tiny_model("xl", {"memory_len": mem})
    state, lengths = None, []
    with torch.no_grad():
        for i in range(40):
            _, state = model(torch.full((1, 1), i % 20), state=state)
            lengths.append(state.h[0].shape[1])
    ring = mem + size  # a ring buffer of the memory and the own segment: it fills, then keeps its shape
    assert lengths == [*range(1, ring + 1), *[ring] * (40 - ring)], lengths


def test_config_errors_say_what_is_valid():
    with pytest.raises(ValueError, match="relative_dim must be even"):
        XLConfig(relative_dim=5)
    with pytest.raises(ValueError, match="relative"):
        memzoo.build_model("xl", positions="alibi")
    with pytest.raises(ValueError, match="memory_len"):
        memzoo.build_model("xl", memory_len=-1)
    assert XLConfig().memory_len == 512 and XLConfig().positions == "relative"


def test_a_biased_qkv_projection_is_honoured():
    """XL's own memory re-projection uses the layer's projection modules, biases included."""
    model = kit.tiny_model("xl", {"memory_len": 4}, qkv_bias=True, positions="rope").backbone
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    x = torch.randn(1, 11, 16, dtype=F64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    y, _ = model(x)
    ref = xl_reference(model, x)
    kit.assert_close(y, ref, "xl with biased qkv vs reference")
    kit.assert_close(_grads(y, [x])[0], _grads(ref, [x])[0], "input grad with biased qkv")


# ------------------------------------------------------- the inference cache
def _decode(model, tokens, state=None):
    outs = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state=state)
            outs.append(logits)
    return torch.cat(outs, 1), state


def test_decoding_projects_only_the_new_row(monkeypatch):
    """Under no_grad the memory's keys/values are reused between calls: after the first
    call every token projects one key/value row per layer, and the outputs are unchanged."""
    model = kit.tiny_model("xl", {"memory_len": 6})
    tokens = kit.random_tokens(model, 1, 30)
    rows: list[int] = []
    original = type(model.backbone)._kv

    def counting(self, layer, normed, *rest):
        rows.append(normed.shape[1])
        return original(self, layer, normed, *rest)

    monkeypatch.setattr(type(model.backbone), "_kv", counting)
    decoded, _ = _decode(model, tokens)
    assert rows[model.backbone.n_layers :] == [1] * (len(rows) - model.backbone.n_layers)
    with torch.no_grad():
        whole, _ = model(tokens)
    kit.assert_close(decoded, whole, "decoded with the cache vs one call")


@pytest.mark.parametrize("how", ["in_place", "load_state_dict", "to_dtype_and_back", "data_then_clear"])
def test_changed_weights_are_noticed_by_the_inference_cache(how):
    """XL re-projects the memory with the current weights: change them between calls and
    the continuation equals a fresh re-projection. In-place updates (optimizer steps),
    load_state_dict and .to() are noticed by version/storage; a write through .data is
    not (it bypasses version counting) and needs clear_inference_cache()."""
    model = kit.tiny_model("xl", {"memory_len": 6})
    tokens = kit.random_tokens(model, 1, 14)
    _, state = _decode(model, tokens[:, :13])  # fills the cache
    weight = model.backbone.layers[0].self_attn.k_proj.weight
    new_weight = weight.detach() * 1.5
    if how == "in_place":
        with torch.no_grad():
            weight.mul_(1.5)
    elif how == "load_state_dict":
        sd = model.state_dict()
        sd["backbone.layers.0.self_attn.k_proj.weight"] = new_weight
        model.load_state_dict(sd)
    elif how == "to_dtype_and_back":
        model.float().double()
        with torch.no_grad():
            model.backbone.layers[0].self_attn.k_proj.weight.mul_(1.5)
    else:
        weight.data.copy_(new_weight)  # bumps no version counter
        model.backbone.clear_inference_cache()
    with torch.no_grad():
        cached, _ = model(tokens[:, 13:], state=state)
        model.backbone.clear_inference_cache()
        fresh, _ = model(tokens[:, 13:], state=state)
    kit.assert_close(cached, fresh, f"continuation after weights changed ({how})")


def test_inference_mode_works_and_matches():
    model = kit.tiny_model("xl", {"memory_len": 5})
    tokens = kit.random_tokens(model, 2, 13)
    with torch.no_grad():
        whole, _ = model(tokens)
    with torch.inference_mode():
        streamed, _ = kit.run_chunked(model, tokens, [3, 4, 9])
    kit.assert_close(streamed, whole, "inference_mode streaming vs one no-grad call")


def test_the_cache_is_not_pickled_and_never_used_with_gradients():
    import copy
    import pickle

    model = kit.tiny_model("xl", {"memory_len": 6})
    tokens = kit.random_tokens(model, 1, 10)
    with torch.no_grad():
        clean = model(tokens).logits[:, 9:]
    _, state = _decode(model, tokens[:, :9])
    assert model.backbone._kv_memo
    clone = pickle.loads(pickle.dumps(model))
    assert clone.backbone._kv_memo == {}
    copy.deepcopy(model)
    # poison the cached keys/values of `state` (everything else left valid): a call with
    # gradients re-projects the memory (so W_k, W_v learn from it) and does not see it ...
    for memos in model.backbone._kv_memo.values():
        for memo in memos:
            memo.k.zero_()
            memo.v.zero_()
    with_grad, _ = model(tokens[:, 9:], state=state)
    kit.assert_close(with_grad.detach(), clean, "a call with gradients ignores the cache")
    # ... while a no-grad call uses it (the cache is live, so the check above means something)
    with torch.no_grad():
        poisoned, _ = model(tokens[:, 9:], state=state)
    assert not torch.allclose(poisoned, clean)


def test_clear_inference_cache_forgets_the_relative_tables_too():
    """A write through ``.data`` bypasses version counting: after clear_inference_cache()
    the no-grad output follows the new W_r (the distance table is recomputed)."""
    model = kit.tiny_model("xl", {"memory_len": 4}).backbone
    x = torch.randn(1, 9, 16, dtype=F64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(x)
        model.layers[0].positions.w_r.data.mul_(5.0)
        model.clear_inference_cache()
        after, _ = model(x)
    fresh, _ = model(x)  # gradients enabled: nothing kept
    kit.assert_close(after, fresh.detach(), "no-grad output after a .data write and clear_inference_cache()")


def test_the_cache_lets_go_of_a_dropped_state_at_once():
    """The no-grad K/V memo holds its state weakly; its keys/values (up to twice the
    state's bytes) go with the state, not when the layer next remembers another one
    (after generate() returned, they stayed alive until the next xl call)."""
    import gc

    model = kit.tiny_model("xl", {"memory_len": 5})
    model.generate(kit.random_tokens(model, 2, 13), 4)
    gc.collect()
    assert not any(model.backbone._kv_memo.values())
    _, state = model.generate(kit.random_tokens(model, 2, 13), 4, return_state=True)
    assert all(model.backbone._kv_memo.values())  # a live state keeps its entries
    del state
    gc.collect()
    assert not any(model.backbone._kv_memo.values())


def _many_lengths_and_memo_counts(monkeypatch):
    """A tiny xl model whose memo look-ups are counted, and a padded batch of
    MEMO_STATES + 3 distinct prompt lengths (one decode group each)."""
    from memzoo.variants import xl as xl_module

    model = kit.tiny_model("xl", {"memory_len": 6})
    backbone, calls = model.backbone, {"hit": 0, "miss": 0}
    real = backbone._memo_for

    def counted(*args, **kwargs):
        memo = real(*args, **kwargs)
        calls["miss" if memo is None else "hit"] += 1
        return memo

    monkeypatch.setattr(backbone, "_memo_for", counted)
    groups = xl_module.MEMO_STATES + 3
    tokens = kit.random_tokens(model, groups, 20)
    mask = torch.ones_like(tokens)
    for row in range(groups):
        mask[row, :row] = 0  # a distinct prompt length per row: one decode group each
    return model, tokens, mask, calls


def test_a_padded_batch_of_many_prompt_lengths_keeps_every_groups_cache(monkeypatch):
    """A padded batch decodes one state per distinct prompt length; with more groups than
    MEMO_STATES the memo pushed each group's keys/values out before its next step, so
    every decoded token re-projected the whole memory (2.8× slower at d256, M=1024).
    ``expect_streams`` sizes the memo to the groups: only each group's first step misses."""
    model, tokens, mask, calls = _many_lengths_and_memo_counts(monkeypatch)
    steps = 5
    model.generate(tokens, steps, attention_mask=mask)
    # the first decode step of each group finds nothing kept from the prefill's last call
    # for the other groups; every later step is a hit
    assert calls["hit"] >= tokens.shape[0] * len(model.backbone.layers) * (steps - 2), calls


def test_a_padded_batch_decoded_through_forward_keeps_every_groups_cache(monkeypatch):
    """expect_streams was told only by generate(): a padded batch of more than MEMO_STATES
    prompt lengths decoded through ``model(token, state=ragged_state)`` (a user's loop,
    transformers' generate through MemzooForCausalLM) still re-projected the whole memory
    at every token. The ragged forward tells the backbone how many groups take turns."""
    model, tokens, mask, calls = _many_lengths_and_memo_counts(monkeypatch)
    steps = 5
    with torch.no_grad():
        out = model(tokens, attention_mask=mask)
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), state=out.state)
    assert calls["hit"] >= tokens.shape[0] * len(model.backbone.layers) * (steps - 2), calls
