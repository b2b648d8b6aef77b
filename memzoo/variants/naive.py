"""The slow, obviously-correct references of the built-in variants, in one place (as
flash-linear-attention keeps ``naive.py`` beside its kernels). Each is the paper's (or
the official code's) loop written plainly: segment by segment or block by block, dense
masks, explicit softmax, any dtype (the tests run them in float64). They share no code
with the fast paths in the variants' modules; the tests hold the two equal, outputs and
every gradient (``tests/test_rmt.py``, ``test_xl.py``, ``test_brt.py``).

Each function takes a built backbone (its weights) and a whole sequence from the empty
state: ``x`` (B, T, D) -> outputs (B, T, D) (and, where the state is more than a cache,
the final state).

``fam`` and ``sinks`` take a state too (``FAM.step_reference`` and
``Sinks.step_reference`` call them, so the conformance of a mid-stream state is checked
against them as well). The ``infini`` plug-in keeps its own in
``memzoo_infini/reference.py``: a plug-in depends only on memzoo's public API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from memzoo import ops
from memzoo.layers.relative import RelativePositions, relative_attention_reference
from memzoo.variants import ring

if TYPE_CHECKING:
    from memzoo.variants.brt import BlockRecurrentTransformer
    from memzoo.variants.fam import FAM, FAMState
    from memzoo.variants.rmt import RecurrentMemoryTransformer
    from memzoo.variants.sinks import Sinks, SinksState
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


def fam_reference(model: FAM, x: Tensor, state: FAMState) -> tuple[Tensor, FAMState]:
    """TransformerFAM's Algorithm 2, slow and plain: same contract and results as
    ``FAM.step`` (the fast path on the shared K/V engine).

    The input is cut at block boundaries; each piece lies in one block τ and goes up
    through the layers. In each layer the queries are ``[piece tokens ; F_{τ-1}]`` (the
    FAM queries only if the piece completes block τ) and the keys
    ``[memory blocks ; F_{τ-1} ; block τ so far]``, under an explicit mask, with a
    plain softmax. Positions are the same as in ``FAM.step``.
    """
    b, t, _ = x.shape
    size, n_fam, scale = model.block_size, model.fam_len, model.layers[0].positions.scale
    n_window = model.memory_blocks * size  # keys of the memory blocks
    # the caches in position order (the state keeps them in a ring buffer of C rows)
    keys, values = [model.cached(k, state.pos) for k in state.k], [model.cached(v, state.pos) for v in state.v]
    fams, fam_keys, fam_values = list(state.fam), list(state.fam_k), list(state.fam_v)
    residual = state.residual
    p, done, outs = state.pos, 0, []
    while done < t:
        block = p // size
        n = min(size - p % size, t - done)  # tokens of this piece
        completes = (p + n) % size == 0
        h = x[:, done : done + n]  # (B, n, D)
        tok_pos = torch.arange(p, p + n, device=x.device)[None, :] + state.offset[:, None]  # (B, n)
        fam_pos = model.fam_positions(block, state.offset)  # (B, F)
        for i, layer in enumerate(model.layers):
            fam = fams[i]
            n_q = n + (n_fam if completes else 0)  # token queries, then FAM queries
            q, k, v = layer.project(torch.cat([h, fam], dim=1), torch.cat([tok_pos, fam_pos], dim=1))
            q = q[:, :, :n_q]
            tok_k, tok_v = k[:, :, :n], v[:, :, :n]
            # F's keys/values are the ones made with F (the same projection, at fam_pos)
            fam_k, fam_v = fam_keys[i], fam_values[i]
            # the cache covers [p - len, p): older keys, the memory blocks, the block's earlier tokens
            n_own = p - block * size
            n_cached = keys[i].shape[2]
            n_mem = min(n_cached - n_own, n_window)
            mem_k, own_k = keys[i][:, :, n_cached - n_own - n_mem : n_cached - n_own], keys[i][:, :, n_cached - n_own :]
            mem_v, own_v = values[i][:, :, n_cached - n_own - n_mem : n_cached - n_own], values[i][:, :, n_cached - n_own :]
            if model.stop_gradient_memory:
                mem_k, mem_v = mem_k.detach(), mem_v.detach()
            blk_k = torch.cat([own_k, tok_k], dim=2)  # block τ's keys so far: (B, H, n_own + n, Dh)
            blk_v = torch.cat([own_v, tok_v], dim=2)
            all_k = torch.cat([mem_k, fam_k, blk_k], dim=2)
            all_v = torch.cat([mem_v, fam_v, blk_v], dim=2)

            # mask (n_q, n_mem + F + n_own + n); True = may attend
            q_off = torch.arange(n, device=x.device) + n_own  # token queries' offsets in the block
            k_off = torch.arange(n_own + n, device=x.device)
            tok_rows = torch.cat(
                [
                    torch.ones(n, n_mem + n_fam, dtype=torch.bool, device=x.device),  # memory, FAM: all
                    k_off[None, :] <= q_off[:, None],  # own block: causal
                ],
                dim=1,
            )
            fam_rows = torch.cat(
                [
                    torch.zeros(n_q - n, n_mem, dtype=torch.bool, device=x.device),  # memory: none
                    torch.ones(n_q - n, n_fam + n_own + n, dtype=torch.bool, device=x.device),  # FAM, block: all
                ],
                dim=1,
            )
            mask = torch.cat([tok_rows, fam_rows], dim=0)
            scores = (q @ all_k.transpose(-1, -2)) * scale  # (B, H, n_q, n_keys)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            heads = probs @ all_v  # (B, H, n_q, Dh)

            h_next = layer.feed_forward(layer.attend_residual(h, heads[:, :, :n]))
            if completes and n_fam:
                fams[i] = model.compress(layer, fam, residual, heads[:, :, n:])
                _, fam_keys[i], fam_values[i] = layer.project(fams[i], model.fam_positions(block + 1, state.offset))
            keys[i] = torch.cat([keys[i], tok_k], dim=2)
            values[i] = torch.cat([values[i], tok_v], dim=2)
            drop = keys[i].shape[2] - ring.size(model.capacity(), p + n)  # the ring keeps the last C positions
            keys[i], values[i] = keys[i][:, :, drop:], values[i][:, :, drop:]
            h = h_next
        if completes:
            residual = torch.ones_like(residual)
        outs.append(h)
        p, done = p + n, done + n
    y = torch.cat(outs, dim=1)
    cap = model.capacity()
    return y, type(state)(
        pos=p, fingerprint=model.fingerprint, k=[ring.from_ordered(k, p, capacity=cap) for k in keys],
        v=[ring.from_ordered(v, p, capacity=cap) for v in values], fam=fams, fam_k=fam_keys, fam_v=fam_values,
        offset=state.offset, residual=residual,
    )


def sinks_reference(model: Sinks, x: Tensor, state: SinksState) -> tuple[Tensor, SinksState]:
    """``sinks`` per query, slow and plain: the paper's cache for every query (its sinks,
    then its window, rotated at their positions in that cache, or at their text positions),
    dense softmax. Same contract and results as ``Sinks.step``."""
    t = x.shape[1]
    start, end = state.pos, state.pos + t
    new_k, new_v = [], []
    n_sinks, cap = model.num_sinks, model.capacity()
    s_rows = min(n_sinks, start)  # the state: the sinks [0, s_rows), then a ring of the run [run, start)
    run = start - ring.size(cap, start, n_sinks)
    s_keep = min(n_sinks, end)
    r_keep = end - ring.size(cap, end, n_sinks)
    for i, layer in enumerate(model.layers):
        q_raw, k_raw, v = layer.project_raw(x)  # pre-RoPE
        # the state keeps the window's keys with RoPE at their text positions: undo it here,
        # so every key below is pre-RoPE and rotated only where a query numbers it
        cached = state.k[i]
        in_order = ring.ordered(cached, start, capacity=cap, origin=n_sinks, offset=s_rows)
        window = layer.positions.unrotate(in_order, torch.arange(run, start, device=x.device))
        keys = torch.cat([cached[:, :, :s_rows], window, k_raw], dim=2)  # (B, Hkv, Tk, Dh)
        cached_v = state.v[i]
        values = torch.cat(
            [cached_v[:, :, :s_rows], ring.ordered(cached_v, start, capacity=cap, origin=n_sinks, offset=s_rows), v], dim=2
        )
        row_of = {p: r for r, p in enumerate([*range(s_rows), *range(run, end)])}  # text position -> key row
        heads = []
        for n in range(t):
            p = start + n
            seen = model.visible_positions(p)
            rows = torch.tensor([row_of[j] for j in seen], device=x.device)
            at = torch.arange(len(seen)) if model.positions == "cache" else torch.tensor(seen)
            at = at.to(x.device)
            qn = layer.positions.query(q_raw[:, :, n : n + 1], at[-1:])  # the query sits last in its cache
            kn = ops.repeat_kv(layer.positions.key(keys[:, :, rows], at), q_raw.shape[1])
            vn = ops.repeat_kv(values[:, :, rows], q_raw.shape[1])
            probs = torch.softmax((qn @ kn.transpose(-1, -2)) * layer.positions.scale, dim=-1)  # (B, H, 1, n_seen)
            heads.append(probs @ vn)
        x = layer.feed_forward(layer.attend_residual(x, torch.cat(heads, dim=2)))
        keep = torch.tensor([row_of[j] for j in [*range(s_keep), *range(r_keep, end)]], dtype=torch.long, device=x.device)
        kept = keys[:, :, keep]
        kept_window = layer.positions.key(kept[:, :, s_keep:], torch.arange(r_keep, end, device=x.device))
        kept_v = values[:, :, keep]

        def as_ring(rows: Tensor) -> Tensor:  # the window in the state's ring order
            return ring.from_ordered(rows, end, capacity=cap, origin=n_sinks)

        new_k.append(torch.cat([kept[:, :, :s_keep], as_ring(kept_window)], dim=2))
        new_v.append(torch.cat([kept_v[:, :, :s_keep], as_ring(kept_v[:, :, s_keep:])], dim=2))
    return x, type(state)(pos=end, fingerprint=model.fingerprint, k=new_k, v=new_v)
