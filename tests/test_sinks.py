"""Attention sinks beyond the conformance suite: the fast path equals the per-query
reference (outputs, state, every gradient), the cache positions equal a token-by-token
port of the official ``pos_shift`` streaming loop, the receptive field (what it can and
cannot reach), the degenerate cases (a window over everything is ``full``; no sinks make
cache and text positions agree), the bounded state, and refused settings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memzoo
from memzoo import ops
from memzoo import testing as kit
from memzoo.variants.sinks import Sinks

D, H = 16, 2


def backbone(seed: int = 0, **options) -> Sinks:
    torch.manual_seed(seed)
    fields = dict(d_model=D, n_heads=H, n_layers=2, block_size=4, num_sinks=2, window=3)
    fields.update(options)
    model = memzoo.build_backbone("sinks", **fields).double().eval()
    assert isinstance(model, Sinks)
    return model


def grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    named = {n: p for n, p in model.named_parameters()} | {"x": x}
    out = torch.autograd.grad((y * w).sum(), list(named.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named.items(), out)}


# --------------------------------------------------------------- fast == reference
@settings(max_examples=30)
@given(
    sinks=st.integers(0, 3),
    window=st.integers(1, 5),
    positions=st.sampled_from(["cache", "absolute"]),
    layers=st.integers(1, 2),
    kv_heads=st.sampled_from([1, 2]),
    prefix_len=st.integers(0, 9),
    length=st.integers(1, 12),
    batch=st.integers(1, 2),
)
def test_fast_path_equals_reference(sinks, window, positions, layers, kv_heads, prefix_len, length, batch):
    """Outputs, final state and every gradient (parameters and input), from a fresh state
    and from a mid-stream state whose graph reaches back into the prefix."""
    model = backbone(num_sinks=sinks, window=window, positions=positions, n_layers=layers, n_kv_heads=kv_heads)
    x = torch.randn(batch, prefix_len + length, D, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (model.forward, model.forward_reference):
        state, outs = None, []
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


def test_visible_positions_by_hand():
    model = backbone(num_sinks=2, window=3)
    assert model.visible_positions(0) == [0]
    assert model.visible_positions(3) == [0, 1, 2, 3]  # window [1, 3] meets the sinks
    assert model.visible_positions(4) == [0, 1, 2, 3, 4]  # t = S + W - 1: still everything
    assert model.visible_positions(5) == [0, 1, 3, 4, 5]  # the first gap
    assert model.visible_positions(9) == [0, 1, 7, 8, 9]


# ------------------------------------- the official streaming loop, token by token
def official_pos_shift_stream(model: Sinks, x: torch.Tensor) -> torch.Tensor:
    """A port of StreamingLLM's loop (``StartRecentKVCache`` + ``pos_shift`` attention),
    written from the paper's description: per token, make room for it in a cache of
    ``S + W`` entries (keep the first S and the most recent), append its pre-RoPE K/V,
    rotate the keys at ``arange(len(cache))`` and the query at ``len(cache) - 1``."""
    s, w = model.num_sinks, model.window
    caches: list[tuple[list, list]] = [([], []) for _ in model.layers]
    outs = []
    for n in range(x.shape[1]):
        h = x[:, n : n + 1]
        for layer, (ks, vs) in zip(model.layers, caches):
            q, k, v = layer.project_raw(h)
            if len(ks) > s + w:
                raise AssertionError("the cache outgrew S + W")
            if len(ks) == s + w and len(ks) > s:
                del ks[s], vs[s]  # evict the oldest recent token
            ks.append(k)
            vs.append(v)
            at = torch.arange(len(ks))
            keys = ops.repeat_kv(layer.positions.key(torch.cat(ks, dim=2), at), q.shape[1])
            values = ops.repeat_kv(torch.cat(vs, dim=2), q.shape[1])
            qr = layer.positions.query(q, at[-1:])
            heads = torch.softmax((qr @ keys.transpose(-1, -2)) * layer.positions.scale, dim=-1) @ values
            h = layer.feed_forward(layer.attend_residual(h, heads))
        outs.append(h)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("sinks,window,kv_heads", [(2, 3, 2), (1, 4, 1), (4, 2, 2), (0, 3, 2)])
def test_cache_positions_equal_the_official_token_by_token_loop(sinks, window, kv_heads):
    """One call over many queries reproduces, per query, what streaming token by token
    with the paper's cache positions computes."""
    model = backbone(num_sinks=sinks, window=window, n_kv_heads=kv_heads)
    x = torch.randn(2, 17, D, dtype=torch.float64)
    with torch.no_grad():
        kit.assert_close(model(x).y, official_pos_shift_stream(model, x), "one call vs the official streaming loop")


def test_cache_and_text_positions_agree_until_the_window_leaves_the_sinks():
    cache, absolute = backbone(positions="cache"), backbone(positions="absolute")
    absolute.load_state_dict(cache.state_dict())
    x = torch.randn(1, 12, D, dtype=torch.float64)
    with torch.no_grad():
        yc, ya = cache(x).y, absolute(x).y
    s_plus_w = cache.num_sinks + cache.window
    kit.assert_close(yc[:, :s_plus_w], ya[:, :s_plus_w], "positions 0 .. S+W-1")
    assert (yc[:, s_plus_w:] - ya[:, s_plus_w:]).abs().amin(dim=-1).gt(1e-6).all(), "every later position differs"
    # without sinks the window is the whole cache, so the two numberings agree everywhere
    cache0, absolute0 = backbone(num_sinks=0, positions="cache"), backbone(num_sinks=0, positions="absolute")
    absolute0.load_state_dict(cache0.state_dict())
    with torch.no_grad():
        kit.assert_close(cache0(x).y, absolute0(x).y, "no sinks: cache == absolute")


# ------------------------------------------------------------ degenerate and reach
@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_a_window_over_everything_is_full_attention(positions):
    model = backbone(num_sinks=2, window=20, positions=positions)
    full = memzoo.build_backbone("full", d_model=D, n_heads=H, n_layers=2, block_size=4).double().eval()
    full.load_state_dict(model.state_dict())
    x = torch.randn(2, 20, D, dtype=torch.float64)
    with torch.no_grad():
        kit.assert_close(model(x).y, full(x).y, "sinks with W >= T vs full")


@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_receptive_field(positions):
    """A sink reaches every later position; a token j >= S reaches exactly the positions
    up to j + n_layers·(W-1) (each layer looks W-1 tokens back); with no sinks token 0 is
    forgotten like any other."""
    layers, s, w, t = 2, 1, 3, 24
    model = backbone(num_sinks=s, window=w, n_layers=layers, positions=positions)
    x = torch.randn(1, t, D, dtype=torch.float64)

    def changes(j: int, model=model) -> torch.Tensor:
        bumped = x.clone()
        bumped[:, j] += 1.0
        with torch.no_grad():
            return (model(bumped).y - model(x).y).abs().amax(dim=-1)[0] > 1e-9  # (T,)

    assert changes(0)[t - 1], "a sink must reach the last position"
    j = 5
    reach = j + layers * (w - 1)
    moved = changes(j)
    assert moved[j : reach + 1].all() and not moved[:j].any() and not moved[reach + 1 :].any(), moved.nonzero().flatten()
    no_sinks = backbone(num_sinks=0, window=w, n_layers=layers, positions=positions)
    moved0 = changes(0, no_sinks)
    assert moved0[: layers * (w - 1) + 1].all() and not moved0[layers * (w - 1) + 1 :].any()


def test_state_is_bounded_by_sinks_plus_window():
    model = backbone(num_sinks=2, window=3)
    sizes = []
    state = None
    with torch.no_grad():
        for _ in range(12):
            _, state = model(torch.randn(1, 1, D, dtype=torch.float64), state)
            sizes.append(state.k[0].shape[2])
    assert sizes == [1, 2, 3, 4, 5] + [5] * 7  # S + W = 5 rows: the sinks and a ring of the window, then one shape


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="window"):
        memzoo.build_backbone("sinks", d_model=D, n_heads=H, window=0)
    with pytest.raises(ValueError, match="positions"):
        memzoo.build_backbone("sinks", d_model=D, n_heads=H, positions="text")


def test_window_keys_are_cached_rotated_and_older_states_are_refused():
    """The state keeps the sinks' keys before RoPE and the window's with RoPE at their text
    positions, in a ring of W slots (state_format 3); a state made under an older layout
    (no state_format in the fingerprint, or another one) is refused, naming the field."""
    torch.manual_seed(0)
    model = memzoo.build_backbone("sinks", d_model=16, n_heads=2, num_sinks=2, window=3).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    _, state = model(x)
    layer = model.layers[0]
    _, k_raw, _ = layer.project_raw(x)
    assert state.k[0].shape[2] == 2 + 3  # the sinks, then the last W = 3 positions: 6, 7, 8 in slots (p - 2) % 3
    assert torch.allclose(state.k[0][:, :, :2], k_raw[:, :, :2], atol=1e-12)
    window = layer.positions.key(k_raw[:, :, 6:], torch.arange(6, 9))
    assert torch.allclose(state.k[0][:, :, 2:], window[:, :, [2, 0, 1]], atol=1e-12)  # slots 0, 1, 2 hold 8, 6, 7
    import dataclasses, json

    for fmt in (None, 2):
        old = json.loads(state.fingerprint)
        old.pop("state_format") if fmt is None else old.update(state_format=fmt)
        stale = dataclasses.replace(state, fingerprint=json.dumps(old, sort_keys=True, separators=(",", ":")))
        with pytest.raises(memzoo.StateError, match="state_format"):
            model(x[:, :1], stale)
