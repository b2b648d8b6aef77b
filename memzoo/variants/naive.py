"""The slow, obviously-correct references of the built-in variants, in one place (as
flash-linear-attention keeps ``naive.py`` beside its kernels). Each is the paper's (or
the official code's) loop written plainly: segment by segment or block by block, dense
masks, explicit softmax, any dtype (the tests run them in float64). They share no code
with the fast paths in the variants' modules; the tests hold the two equal, outputs and
every gradient (``tests/test_rmt.py``, ``test_xl.py``, ``test_brt.py``).

Each function takes a built backbone (its weights) and a whole sequence from the empty
state: ``x`` (B, T, D) -> outputs (B, T, D) (and, where the state is more than a cache,
the final state).

Not here yet: ``fam``'s reference is still the method ``FAM.step_reference`` in
:mod:`memzoo.variants.fam` (moving it waits for the fam/K-V engine refactor of issue #12);
the ``infini`` plug-in keeps its own in ``memzoo_infini/reference.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from memzoo.layers.relative import RelativePositions, relative_attention_reference

if TYPE_CHECKING:
    from memzoo.variants.brt import BlockRecurrentTransformer
    from memzoo.variants.rmt import RecurrentMemoryTransformer
    from memzoo.variants.xl import TransformerXL


def rmt_reference(model: RecurrentMemoryTransformer, x: Tensor) -> Tensor:
    """RMT as the official code runs it, slowly: ``x`` (B, T, D) from the learned memory
    -> (B, T, D). Every segment is an independent forward pass of the stack over
    ``[read, tokens, write]`` at positions ``0 ..``, with a dense causal mask; the last
    layer's write outputs are the next read memory (detached every ``bptt_segments``)."""
    size, n_mem = model.block_size, model.num_memory_tokens
    batch = x.shape[0]
    mem = model.read_init.expand(batch, -1, -1) if model.read_init is not None else x[:, :0]
    outputs = []
    for s in range(0, x.shape[1], size):
        segment = s // size
        if model.bptt_segments and segment > 0 and segment % model.bptt_segments == 0:
            mem = mem.detach()
        tokens = x[:, s : s + size]
        complete = tokens.shape[1] == size
        write = model.write_init.expand(batch, -1, -1) if (complete and n_mem) else x[:, :0]
        z = torch.cat([mem, tokens, write], dim=1)
        pos = torch.arange(z.shape[1], device=x.device)
        causal = pos[None, :] <= pos[:, None]
        for layer in model.layers:
            q, k, v = layer.project(z, pos)
            scores = (q @ k.transpose(-1, -2)) * layer.positions.scale
            heads = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
            z = layer.feed_forward(layer.attend_residual(z, heads))
        outputs.append(z[:, n_mem : n_mem + tokens.shape[1]])
        if complete and n_mem:
            mem = z[:, n_mem + size :]
    return torch.cat(outputs, dim=1)


def xl_reference(model: TransformerXL, x: Tensor) -> Tensor:
    """The paper's recurrence, written out slowly: ``x`` (B, T, D) from an empty state ->
    (B, T, D). Segment by segment, every layer concatenates the *detached* inputs of the
    previous M positions with the segment's inputs, projects keys/values from that,
    and attends with an explicit dense mask: relative positions through
    :func:`relative_attention_reference` (an explicit ``R_{i-j}``), or RoPE."""
    size, mem = model.block_size, model.memory_len
    inputs: list[list[Tensor]] = [[] for _ in model.layers]  # per layer, inputs of every segment so far
    outputs = []
    for s in range(0, x.shape[1], size):
        hs = x[:, s : s + size]
        for layer, seen in zip(model.layers, inputs):
            past = torch.cat(seen, dim=1) if seen else hs[:, :0]
            memory = past[:, max(0, past.shape[1] - mem) :].detach()
            seen.append(hs)
            context = torch.cat([memory, hs], dim=1)
            q_pos = torch.arange(s, s + hs.shape[1], device=x.device)
            k_pos = torch.arange(s - memory.shape[1], s + hs.shape[1], device=x.device)
            allowed = k_pos[None, :] <= q_pos[:, None]
            q, _, _ = layer.project_raw(hs)
            _, k, v = layer.project_raw(context)
            if isinstance(layer.positions, RelativePositions):
                heads = relative_attention_reference(q, k, v, q_pos, k_pos, allowed, layer.positions)
            else:
                qp, kp = layer.positions.query(q, q_pos), layer.positions.key(k, k_pos)
                scores = (qp @ kp.transpose(-1, -2)) * layer.positions.scale
                heads = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
            hs = layer.feed_forward(layer.attend_residual(hs, heads))
        outputs.append(hs)
    return torch.cat(outputs, dim=1)


def brt_reference(model: BlockRecurrentTransformer, x: Tensor) -> tuple[Tensor, Tensor]:
    """The Block-Recurrent Transformer written out slowly: ``x`` (B, T, D) from the initial
    states -> outputs (B, T, D) and the final states (B, S, D). Block by block and layer
    by layer, every attention an explicit softmax over explicitly built keys and masks
    (GQA by repeating K/V heads)."""
    size, batch = model.block_size, x.shape[0]
    group = model.n_heads // model.n_kv_heads
    cell = model.cell
    cells = cell.initial_state.expand(batch, -1, -1)
    seen_k: list[list[Tensor]] = [[] for _ in model.layers]  # per layer: unrotated keys of each block so far
    seen_v: list[list[Tensor]] = [[] for _ in model.layers]

    def softmax_attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, scale: float) -> Tensor:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    outputs = []
    for s in range(0, x.shape[1], size):
        hid = x[:, s : s + size]
        n = hid.shape[1]
        for i, layer in enumerate(model.layers):
            normed = layer.input_layernorm(hid)
            q_raw, k_raw, v = layer.project_normed(normed)
            prev_k = seen_k[i][-1] if seen_k[i] else k_raw[:, :, :0]  # the previous block (m = 1)
            prev_v = seen_v[i][-1] if seen_v[i] else v[:, :, :0]
            k_all, v_all = torch.cat([prev_k, k_raw], 2), torch.cat([prev_v, v], 2)
            q_pos = torch.arange(s, s + n, device=x.device)
            k_pos = torch.arange(s - prev_k.shape[2], s + n, device=x.device)
            allowed = k_pos[None, :] <= q_pos[:, None]  # window = previous block + own block causally
            q, k = layer.positions.query(q_raw, q_pos), layer.positions.key(k_all, k_pos)
            out = layer.attend_residual(hid, softmax_attend(q, k, v_all, allowed, layer.positions.scale))
            if i == model.recurrent_index:
                hs = cell.state_layernorm(cells + cell.state_ids)
                sk, sv = cell.split_heads(cell.state_k_proj(hs)), cell.split_heads(cell.state_v_proj(hs))
                qc = cell.split_heads(cell.cross_q_proj(normed))
                cross = softmax_attend(qc, sk, sv, None, model.head_dim**-0.5)  # every state, no positions
                out = out + cell.cross_o_proj(cross.transpose(1, 2).flatten(-2))
                if n == size:  # the block is complete: the states read it
                    own = softmax_attend(cell.split_heads(cell.state_q_proj(hs)), sk, sv, None, model.head_dim**-0.5)
                    reads = softmax_attend(cell.split_heads(cell.state_cross_q_proj(hs)), k_raw, v, None, model.head_dim**-0.5)
                    a = cell.state_o_proj(torch.cat([own, reads], dim=1).transpose(1, 2).flatten(-2))
                    new = cell.attn_gate(cells, a)
                    if cell.dual:
                        new = cell.mlp_gate(new, cell.state_mlp(cell.state_post_layernorm(new)))
                    cells = new
            seen_k[i].append(k_raw)
            seen_v[i].append(v)
            hid = layer.feed_forward(out)
        outputs.append(hid)
    return torch.cat(outputs, dim=1), cells
