"""``brt``: Block-Recurrent Transformer (Hutchins, Schlag, Wu, Dyer, Neyshabur 2022, arXiv 2203.07852).

Every layer is BSWA with one memory block (m = 1): a query in block τ sees all of block
τ-1 and, causally, its own block. ONE layer (``recurrent_layer``) is also a recurrent
cell over ``S = num_states`` state vectors ``c`` (B, S, D), updated once per completed
block. Its keys/values are shared between the two directions; each direction has its
own queries::

    vertical (tokens of block τ, output to the next layer):
        x' = x + O(self-attn[tokens -> window keys, RoPE]) + O_x(cross-attn[tokens -> states c_{τ-1}])
        x'' = x' + MLP(Norm(x'))                                  (the layer's own MLP)
    horizontal (states, at the end of block τ):
        h  = Norm_s(c_{τ-1} + ids)                                 learned state IDs: the states' positions
        a  = O_s[ self-attn(states -> states) ; cross-attn(states -> block τ's tokens) ]
        c' = gate(c_{τ-1}, a)                                      the residual is a gate
        c_τ = gate2(c', MLP_s(Norm2_s(c')))                        ("dual" only; "skip" has no MLP: c_τ = c')

    gates: fixed  g = σ(b_g),                 c' = c⊙g + a⊙(1-g)
           lstm   z = tanh(W_z a + b_z), i = σ(W_i a + b_i - 1), f = σ(W_f a + b_f + 1),  c' = c⊙f + z⊙i

Who sees whom at the recurrent layer, L = 4, S = 2::

    keys:             | states c_1 | block 1 | block 2 |
    token in block 2  |  s s       | x x x x | x x . . |   (RoPE between tokens only)
    state update @ 2  |  s s       |         | x x x x |   (no positions between states and tokens)

Positions: RoPE among tokens; states carry no RoPE, their learned IDs are added before
the norm on every update (the paper's "state IDs"); state-token attention uses the
unrotated keys and queries (no position bias between states and tokens).

The state is carried with its graph (BPTT through every block inside a call and across
calls unless the caller detaches it): the lucidrains port never trained its state layers
(issue #3); ``tests/test_brt.py`` shows these get gradient and reach beyond the window.

Streaming: the state changes only when a block completes (the absolute grid of
``block_size`` positions); the K/V of the previous and the partial block are held
(unrotated) in a ring buffer of ``2L`` rows, so any chunking gives the same outputs, state
and gradients, and once full the state keeps one shape; a decode step reads the ring in
slot order (keys at explicit positions). In eager
no-grad calls a state also carries, beside its fields (:meth:`memzoo.State.derived`),
its window keys rotated and its states' keys/values, so a decode step rotates only its
own key and recomputes the states only when a block completes.

Two implementations: :meth:`BlockRecurrentTransformer.step` (the fast path: layer by
layer over the whole call, one batched window attention per layer, a sequential scan
over the completed blocks for the state, one batched token-to-state attention) and
:func:`memzoo.variants.naive.brt_reference` (block by block, dense masks, explicit heads).
Tests hold them equal.

Shapes: B batch, T tokens in this call, D d_model, H query heads, Hkv key/value heads,
Dh head width, L block_size, S num_states, nb query blocks touched by the call.
Mask polarity: True = may attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from memzoo import ops
from memzoo.config import MAX_WIDTH, BackboneConfig, VariantConfig
from memzoo.layers import MLP
from memzoo.ops import BlockLayout
from memzoo.registry import register_variant
from memzoo.state import State
from memzoo.variants import ring
from memzoo.variants.base import Backbone, module_mode, module_tensors
from memzoo.variants.naive import brt_reference  # noqa: F401  (the slow reference, kept with the others)

class BRTConfig(VariantConfig):
    num_states: int = Field(64, ge=1, le=MAX_WIDTH, description="S: state vectors of the recurrent layer (paper: 512, = the block size)")
    recurrent_layer: int = Field(
        -1, description="index of the recurrent layer, negative from the end (paper: layer 10 of 12, i.e. 9 or -3)"
    )
    gate: Literal["fixed:skip", "fixed:dual", "lstm:skip", "lstm:dual"] = Field(
        "fixed:skip", description="state update: fixed or LSTM gate; skip = no MLP in the recurrent direction (the paper's best), dual = MLP + a second gate"
    )

    conformance_options = (
        {"num_states": 3},
        {"num_states": 2, "recurrent_layer": 0, "gate": "lstm:dual"},
        {"num_states": 5, "gate": "fixed:dual"},
        {"num_states": 2, "gate": "lstm:skip", "recurrent_layer": -2},  # 1 state: its query gets no gradient (softmax over one key)
    )

    def check_shared(self, shared: BackboneConfig) -> None:
        n = shared.n_layers
        if not -n <= self.recurrent_layer < n:
            raise ValueError(f"recurrent_layer {self.recurrent_layer} is out of range for n_layers={n}: valid are {-n} .. {n - 1}")


#: every ``gate`` value (from the config's declaration)
GATES: tuple[str, ...] = get_args(BRTConfig.model_fields["gate"].annotation)


class Gate(nn.Module):
    """The residual of the recurrent direction: ``c' = gate(c, a)`` for (B, S, D) tensors."""

    def __init__(self, kind: str, d_model: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "fixed":
            # σ(1) ≈ 0.73 of the old state kept at the start, like the LSTM gate's +1 forget offset
            self.bias = nn.Parameter(torch.ones(d_model))
        else:
            self.z_proj = nn.Linear(d_model, d_model)
            self.i_proj = nn.Linear(d_model, d_model)
            self.f_proj = nn.Linear(d_model, d_model)

    def forward(self, c: Tensor, a: Tensor) -> Tensor:
        if self.kind == "fixed":
            g = torch.sigmoid(self.bias)
            return c * g + a * (1 - g)
        z = torch.tanh(self.z_proj(a))
        i = torch.sigmoid(self.i_proj(a) - 1)  # the paper's offsets: write little, keep much at the start
        f = torch.sigmoid(self.f_proj(a) + 1)
        return c * f + z * i

    def weight(self) -> Tensor | None:
        """The fixed gate's ``g = σ(b_g)`` (D,), to compute once for many :meth:`apply` calls
        (a scan over blocks); None for the LSTM gate (its gates depend on ``a``)."""
        return torch.sigmoid(self.bias) if self.kind == "fixed" else None

    def apply(self, c: Tensor, a: Tensor, g: Tensor | None) -> Tensor:
        """:meth:`forward` with the fixed gate's ``g`` given (:meth:`weight`): ``c⊙g + a⊙(1-g)``
        as one ``lerp`` (``a + g⊙(c - a)``, equal up to rounding); the LSTM gate as in
        :meth:`forward` with its last two products fused."""
        if g is not None:
            return torch.lerp(a, c, g)
        z = torch.tanh(self.z_proj(a))
        i = torch.sigmoid(self.i_proj(a) - 1)
        f = torch.sigmoid(self.f_proj(a) + 1)
        return torch.addcmul(c * f, z, i)


class RecurrentCell(nn.Module):
    """The recurrent layer's extra weights (the token path's self-attention, norms and MLP
    are the layer's own :class:`memzoo.layers.DecoderLayer`)."""

    def __init__(self, backbone: "BlockRecurrentTransformer") -> None:
        super().__init__()
        d, h, hkv, dh = backbone.d_model, backbone.n_heads, backbone.n_kv_heads, backbone.head_dim
        qkv, out = backbone.qkv_bias, backbone.out_bias
        self.head_dim = dh
        # vertical: token queries into the states, and their output projection
        self.cross_q_proj = nn.Linear(d, h * dh, bias=qkv)
        self.cross_o_proj = nn.Linear(h * dh, d, bias=out)
        # horizontal: the states' norm, keys/values (shared with the tokens' cross-attention), two query sets
        self.state_layernorm = nn.RMSNorm(d, eps=backbone.norm_eps)
        self.state_q_proj = nn.Linear(d, h * dh, bias=qkv)
        self.state_k_proj = nn.Linear(d, hkv * dh, bias=qkv)
        self.state_v_proj = nn.Linear(d, hkv * dh, bias=qkv)
        self.state_cross_q_proj = nn.Linear(d, h * dh, bias=qkv)
        self.state_o_proj = nn.Linear(2 * h * dh, d, bias=out)  # on [self ; cross]
        kind, config = backbone.gate.split(":")
        self.attn_gate = Gate(kind, d)
        self.dual = config == "dual"
        if self.dual:
            self.state_post_layernorm = nn.RMSNorm(d, eps=backbone.norm_eps)
            self.state_mlp = MLP(d, backbone.d_ff, backbone.mlp, backbone.mlp_bias)
            self.mlp_gate = Gate(kind, d)
        s = backbone.num_states
        self.state_ids = nn.Parameter(torch.randn(s, d) * 0.02)  # (S, D)
        self.initial_state = nn.Parameter(torch.randn(s, d) * 0.02)  # (S, D)

    def split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def scan(
        self, cells: Tensor, kept: tuple[Tensor, Tensor, Tensor] | None, tk: Tensor, tv: Tensor, n_done: int, n_kv: int,
        backend: str,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], tuple[Tensor, Tensor, Tensor]]:
        """The horizontal direction over ``n_done`` consecutive completed blocks, and the
        states' keys and values (B, Hkv, S, Dh) before each of the first ``n_kv`` (``n_done``
        or ``n_done + 1``) blocks: ``cells`` (B, S, D) the states before the first block;
        ``kept``: their normed inputs, keys and values if already known; ``tk``, ``tv``
        (B, Hkv, n_done·L, Dh) the completed blocks' unrotated token keys/values (not read
        when ``n_done`` is 0). Returns the
        last states (B, S, D), the keys and values per block, and the last block's
        ``(hs, sk, sv)``.

        Per block: the states' normed inputs with their IDs ``hs = Norm_s(c + ids)``, their
        keys/values (no positions), two query sets reading ``[states]`` and ``[the block's
        tokens]``, the output projection on ``[self ; cross]`` and the gate (then the MLP and
        its gate with ``dual``), as :func:`memzoo.variants.naive.brt_reference` computes them
        block by block. Written for few ops per block (at small sizes a block is a few dozen
        tiny ops, each costing more than its arithmetic): the states are carried as
        (B·S, D) rows (every projection a plain 2-D matmul; still called as modules), the
        state IDs broadcast to the rows once, the blocks' token keys cut once, the fixed
        gate's ``σ(b_g)`` computed once (:meth:`Gate.apply`)."""
        if n_done == 0 and kept is not None:  # a call inside one block whose states are known (decode)
            _, sk, sv = kept
            return cells, [sk], [sv], kept
        b, s, d = cells.shape
        dh = self.head_dim
        scale = dh**-0.5
        ids = self.state_ids.to(cells.dtype).expand(b, s, d).reshape(b * s, d)
        attn_g, mlp_g = self.attn_gate.weight(), (self.mlp_gate.weight() if self.dual else None)
        block_k = tk.unflatten(2, (n_done, -1)).unbind(2) if n_done else ()  # (B, Hkv, L, Dh) each
        block_v = tv.unflatten(2, (n_done, -1)).unbind(2) if n_done else ()

        def heads(x: Tensor) -> Tensor:  # (B·S, n·Dh) -> (B, n, S, Dh)
            return x.view(b, s, -1, dh).transpose(1, 2)

        rows = cells.reshape(b * s, d)
        state_k, state_v = [], []
        for j in range(n_kv):
            if j == 0 and kept is not None:
                hs, sk, sv = kept
                hs = hs.reshape(b * s, d)
            else:
                hs = self.state_layernorm(rows + ids)
                sk, sv = heads(self.state_k_proj(hs)), heads(self.state_v_proj(hs))
            state_k.append(sk)
            state_v.append(sv)
            if j < n_done:
                own = ops.dense(heads(self.state_q_proj(hs)), sk, sv, scale=scale, backend=backend)
                cross = ops.dense(heads(self.state_cross_q_proj(hs)), block_k[j], block_v[j], scale=scale, backend=backend)
                a = self.state_o_proj(torch.cat([own, cross], dim=1).transpose(1, 2).reshape(b * s, -1))
                rows = self.attn_gate.apply(rows, a, attn_g)
                if self.dual:
                    rows = self.mlp_gate.apply(rows, self.state_mlp(self.state_post_layernorm(rows)), mlp_g)
        # no block completed: the states are the very tensor given (a decode step's caches are keyed on it)
        return (rows.view(b, s, d) if n_done else cells), state_k, state_v, (hs.view(b, s, d), sk, sv)


@dataclass
class BRTState(State):
    """Per layer, ``k[l]`` (unrotated) and ``v[l]`` (B, Hkv, t, Dh): keys and values of the
    previous and the current block, a ring buffer of ``2·L`` rows (:mod:`memzoo.variants.ring`:
    in position order while it fills, then position ``p`` in slot ``p % 2L``);
    ``cells`` (B, S, D): the recurrent layer's states after the last completed block."""

    k: list[Tensor]
    v: list[Tensor]
    cells: Tensor


@register_variant("brt", config=BRTConfig)
class BlockRecurrentTransformer(Backbone):
    State = BRTState
    #: 2: the K/V caches are ring buffers of 2·L rows (1: the positions a query could see, in order)
    state_format = 2

    def build(self) -> None:
        self.layers = self.make_layers()
        self.recurrent_index = self.recurrent_layer % self.n_layers  # negative counts from the end
        self.cell = RecurrentCell(self)

    def layout(self) -> BlockLayout:
        return BlockLayout(block_size=self.block_size, window=self.block_size)  # bswa, m = 1

    def init_from_embeddings(self, embed: Tensor, generator: torch.Generator) -> list[str]:
        """On a pretrained decoder the recurrent layer's weights are new. They start from
        the host layer's own: the state path's projections, norms (and MLP) copy the host
        layer's; the state IDs and the first states are real tokens' embeddings; gates
        start at their fixed init (LSTM gates: zero weights, so only the paper's -1/+1
        offsets act); and the tokens' cross-attention output projection starts at zero,
        so the loaded model computes exactly what ``bswa`` with one memory block computes
        until training opens the path."""
        cell, host = self.cell, self.layers[self.recurrent_index]
        attn = host.self_attn
        copies = [
            (cell.cross_q_proj, attn.q_proj), (cell.state_q_proj, attn.q_proj), (cell.state_cross_q_proj, attn.q_proj),
            (cell.state_k_proj, attn.k_proj), (cell.state_v_proj, attn.v_proj), (cell.state_layernorm, host.input_layernorm),
        ]
        if cell.dual:
            copies += [(cell.state_post_layernorm, host.post_attention_layernorm), (cell.state_mlp, host.mlp)]
        rows = self.sample_token_embeddings(embed, 2 * self.num_states, generator)
        with torch.no_grad():
            for new, old in copies:
                new.load_state_dict(old.state_dict())
            # [self ; cross] halves of the output projection: the average of the two attentions
            cell.state_o_proj.weight.copy_(torch.cat([attn.o_proj.weight, attn.o_proj.weight], dim=1) / 2)
            if cell.state_o_proj.bias is not None:
                cell.state_o_proj.bias.copy_(attn.o_proj.bias)
            for p in cell.cross_o_proj.parameters():
                p.zero_()
            for gate in (cell.attn_gate, *((cell.mlp_gate,) if cell.dual else ())):
                if gate.kind == "fixed":
                    gate.bias.fill_(1.0)
                else:
                    for proj in (gate.z_proj, gate.i_proj, gate.f_proj):
                        proj.weight.zero_()
                        proj.bias.zero_()
            cell.state_ids.copy_(rows[: self.num_states])
            cell.initial_state.copy_(rows[self.num_states :])
        return [f"cell.{name}" for name, _ in cell.named_parameters()]

    # ------------------------------------------------------------------ the contract
    def capacity(self) -> int:
        """Rows of the K/V ring: the previous block and the own block (what a query sees)."""
        return 2 * self.block_size

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        kv = [(batch_size, self.n_kv_heads, ring.size(self.capacity(), pos), self.head_dim)] * self.n_layers
        return {"k": kv, "v": kv, "cells": (batch_size, self.num_states, self.d_model)}

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        return n_tokens == 1 and start >= self.capacity()

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> BRTState:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        # clone: a state must not share storage with a parameter (an optimizer step would change it)
        cells = self.cell.initial_state.to(device=device, dtype=dtype).clone().expand(batch_size, -1, -1)
        return BRTState(pos=0, fingerprint=self.fingerprint, k=[empty] * self.n_layers, v=[empty] * self.n_layers, cells=cells)

    def step(self, x: Tensor, state: BRTState) -> tuple[Tensor, BRTState]:
        size, t = self.block_size, x.shape[1]
        start, end = state.pos, state.pos + t
        cap = self.capacity()
        first = start // size
        n_done = end // size - first  # blocks completed in this call
        n_blocks = (end - 1) // size - first + 1  # query blocks touched: nb
        in_ring = self.decodes_in_ring_order(start, t)  # a decode step on the full ring
        # the caches read in position order, all of them (the previous block on, and what the
        # ring still holds before it): [k_start, start)
        k_start = start if in_ring else start - ring.size(cap, start)
        pos = torch.arange(k_start, end, device=x.device)
        q_pos = pos[start - k_start :] if k_start < start else pos  # made once for every layer (RoPE then computes its angles once)
        # one shape at every step (compiled code, ring.static_shapes): every row at its position
        static = in_ring and ring.decodes_statically() and ops.takes_key_positions(self.backend)
        key_pos = ring.positions(cap, end, x.device) if static else None
        seen = max((first - 1) * size, end - cap)  # the oldest row a decode step's token sees
        # the new caches are the rows read plus the new ones while the ring holds [0, end) in order
        wraps = end > cap or k_start > 0
        layout = self.layout()
        cells = state.cells
        new_k, new_v, rotated = [], [], []
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            q_raw, k_raw, v = layer.project_normed(h)
            cached = state.derived(f"rotated_k.{i}", (state.k[i],))  # the cache's keys rotated, by the last step
            if in_ring:
                ring_k = ring.write(state.k[i], k_raw, start, capacity=cap)  # (B, Hkv, 2L, Dh), slot order
                values = ring.write(state.v[i], v, start, capacity=cap)
                if cached is None:  # the whole ring rotated (a state without its rotated keys kept)
                    q, keys = layer.positions.query(q_raw, q_pos), layer.positions.key(ring_k, ring.positions(cap, end, x.device))
                else:  # rotate only this call's key
                    q, k = layer.positions.query_key(q_raw, k_raw, q_pos)
                    keys = ring.write(cached, k, start, capacity=cap)
                block_k, block_v = ring_k, values  # the block, in order, only where the state scan reads it
                if n_done and i == self.recurrent_index:
                    block_k = ring.read(ring_k, first * size, end, end, capacity=cap)
                    block_v = ring.read(values, first * size, end, end, capacity=cap)
                ring_keys, ring_v = keys, values
                if not static:  # the rows the token sees, in order (views of the ring)
                    keys, values = (ring.read(r, seen, end, end, capacity=cap) for r in (keys, values))
            else:
                keys_raw = torch.cat([ring.read(state.k[i], k_start, start, start, capacity=cap), k_raw], dim=2)  # [k_start, end)
                values = torch.cat([ring.read(state.v[i], k_start, start, start, capacity=cap), v], dim=2)
                if cached is None:
                    q = layer.positions.query(q_raw, q_pos)
                    keys = layer.positions.key(keys_raw, pos)
                else:  # rotate only this call's keys (a decode step would rotate the whole window again)
                    q, k = layer.positions.query_key(q_raw, k_raw, q_pos)
                    keys = torch.cat([ring.read(cached, k_start, start, start, capacity=cap), k], dim=2)
                block_k, block_v = keys_raw[:, :, first * size - k_start :], values[:, :, first * size - k_start :]
            heads = ops.attend(
                q, keys, values, layout=layout, q_start=start, scale=layer.positions.scale, backend=self.backend, key_pos=key_pos
            )
            out = layer.attend_residual(x, heads)
            if i == self.recurrent_index:
                cross, cells, last_kv = self._recurrent(h, state, block_k, block_v, n_done, n_blocks, start - first * size)
                b, n, _, dh = cross.shape  # the projection on (B·T, H·Dh) rows, as DecoderLayer.attend_residual
                out = out + self.cell.cross_o_proj(cross.transpose(1, 2).reshape(b * t, n * dh)).view(out.shape)
            x = layer.feed_forward(out)
            if in_ring:
                new_k.append(ring_k)
                new_v.append(ring_v)
                rotated.append(ring_keys)
            elif wraps:
                new_k.append(ring.write(state.k[i], k_raw, start, capacity=cap))
                new_v.append(ring.write(state.v[i], v, start, capacity=cap))
                rotated.append(ring.from_ordered(keys, end, capacity=cap))
            else:  # the rows read and the new ones are the new caches
                new_k.append(keys_raw)
                new_v.append(values)
                rotated.append(keys)
        new = BRTState(pos=end, fingerprint=self.fingerprint, k=new_k, v=new_v, cells=cells)
        for i, (k, r) in enumerate(zip(new_k, rotated)):  # for the next step (eager no-grad calls only)
            new.keep_derived(f"rotated_k.{i}", (k,), r)
        if n_done < n_blocks:  # the states' inputs, keys and values for the block the call ends in
            new.keep_derived(self._state_kv_name(), *last_kv)
        return x, new

    def _state_kv_sources(self, cells: Tensor) -> tuple[Tensor, ...]:
        """What the states' normed inputs, keys and values depend on: ``cells`` and the
        weights (every parameter of the modules, wrapped ones such as LoRA's included)."""
        cell = self.cell
        mods = cell._modules  # (not nn.Module.__getattr__: this runs once per decode step)
        weights = [p for name in ("state_layernorm", "state_k_proj", "state_v_proj") for p in module_tensors(mods[name])]
        return (cells, cell.state_ids, *weights)

    def _state_kv_name(self) -> str:
        """The name the states' keys/values are kept under: ``state_kv``, plus the mode of
        the modules that make them when they have one (:func:`module_mode`: a LoRA adapter
        on them switched off or on changes no tensor, so it is part of the name)."""
        mods = self.cell._modules
        mode = tuple(module_mode(mods[name]) for name in ("state_layernorm", "state_k_proj", "state_v_proj"))
        return f"state_kv{mode!r}" if any(mode) else "state_kv"

    def _recurrent(
        self, h: Tensor, state: BRTState, keys_raw: Tensor, values: Tensor, n_done: int, n_blocks: int, pad: int
    ) -> tuple[Tensor, Tensor, tuple[tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor]]]:
        """The recurrent layer's state side for one call: the scan over the completed
        blocks (``keys_raw``/``values``: the unrotated keys and values of the touched blocks
        from the first one's start, in order) and
        the tokens' cross-attention to the states of their block, batched over blocks.
        ``h`` (B, T, D) normed token inputs, ``pad`` the first token's offset in its block.
        Returns the cross-attention heads (B, H, T, Dh), the last states (B, S, D) and the
        last block's state inputs, keys and values with what they depend on (the next
        step's, if no block completed after it). The first block's are those the last step kept with ``state`` (they
        change only when a block completes), when it kept them."""
        cell, size, (b, t, d) = self.cell, self.block_size, h.shape
        sources = self._state_kv_sources(state.cells)
        kept = state.derived(self._state_kv_name(), sources)
        if n_done:  # the completed blocks' keys (keys_raw starts at the first touched block)
            keys_raw, values = keys_raw[:, :, : n_done * size], values[:, :, : n_done * size]
        cells, state_k, state_v, last_kv = cell.scan(state.cells, kept, keys_raw, values, n_done, n_blocks, self.backend)
        last = (sources if n_done == 0 else self._state_kv_sources(cells), last_kv)
        # (B, H, T, Dh), no positions; the projection on (B·T, D) rows, as DecoderLayer.project_normed
        qc = cell.cross_q_proj(h.reshape(b * t, d)).view(b, t, -1, self.head_dim).transpose(1, 2)
        if n_blocks == 1:  # every token reads the same states (a decode step): no padding to a whole block
            return ops.dense(qc, state_k[0], state_v[0], scale=self.head_dim**-0.5, backend=self.backend), cells, last
        qc = F.pad(qc, (0, 0, pad, n_blocks * size - pad - t)).unflatten(2, (n_blocks, size))  # (B, H, nb, L, Dh)
        # blocks into the batch: queries (B·nb, H, L, Dh) against their block's states (B·nb, Hkv, S, Dh)
        cross = ops.dense(
            qc.transpose(1, 2).flatten(0, 1), torch.stack(state_k, 1).flatten(0, 1), torch.stack(state_v, 1).flatten(0, 1),
            scale=self.head_dim**-0.5, backend=self.backend,
        )
        cross = cross.unflatten(0, (h.shape[0], n_blocks)).transpose(1, 2).flatten(2, 3)[:, :, pad : pad + t]
        return cross, cells, last
