"""The slow, obviously-correct Infini-attention: the paper's per-segment loop with dense
masks and explicit heads, written independently of the fast path in
:mod:`memzoo_infini.variant` (which the tests hold equal to it, outputs and gradients).

Shapes: B batch, T tokens, L block_size, H query heads, Hkv key/value heads, Dh head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memzoo_infini.variant import InfiniAttention, denominator


def infini_reference(model: InfiniAttention, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``x`` (B, T, D) from the empty state -> outputs (B, T, D) and, per layer, the final
    memory (B, Hkv, Dh, Dh) and normaliser (B, Hkv, Dh). Segment by segment and layer by
    layer: softmax attention under an explicit causal mask inside the segment, retrieval
    from the memory of the earlier segments, then (if the segment is complete) the write."""
    size, batch = model.block_size, x.shape[0]
    group = model.n_heads // model.n_kv_heads  # query heads per key/value head
    dh = model.head_dim
    mems = [x.new_zeros(batch, model.n_kv_heads, dh, dh) for _ in model.layers]
    norms = [x.new_zeros(batch, model.n_kv_heads, dh) for _ in model.layers]
    outputs = []
    for s in range(0, x.shape[1], size):
        h = x[:, s : s + size]
        n = h.shape[1]
        pos = torch.arange(s, s + n, device=x.device)
        allowed = pos[None, :] <= pos[:, None]  # (n, n) True = may attend
        for i, layer in enumerate(model.layers):
            q_raw, k_raw, v = layer.project_raw(h)
            q, k = layer.positions.query(q_raw, pos), layer.positions.key(k_raw, pos)
            k_h, v_h = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, n, Dh)
            scores = (q @ k_h.transpose(-1, -2)) * layer.positions.scale
            local = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v_h

            mq, mk = (q, k) if model.memory_positions == "rotated" else (q_raw, k_raw)
            sq, sk = F.elu(mq) + 1, F.elu(mk) + 1
            mem_h = mems[i].repeat_interleave(group, dim=1)  # (B, H, Dh, Dh)
            norm_h = norms[i].repeat_interleave(group, dim=1)  # (B, H, Dh)
            den = denominator(torch.einsum("bhnd,bhd->bhn", sq, norm_h))
            a_mem = torch.einsum("bhnd,bhde->bhne", sq, mem_h) / den[..., None]

            beta = torch.sigmoid(model.gate[i]).to(x.dtype)[None, :, None, None]
            heads = beta * a_mem + (1 - beta) * local
            if n == size:  # a complete segment writes the memory
                if model.update == "delta":
                    den_k = denominator(torch.einsum("bhnd,bhd->bhn", sk, norms[i]))
                    new = v - torch.einsum("bhnd,bhde->bhne", sk, mems[i]) / den_k[..., None]
                else:
                    new = v
                mems[i] = mems[i] + torch.einsum("bhnd,bhne->bhde", sk, new)
                norms[i] = norms[i] + sk.sum(dim=2)
            h = layer.feed_forward(layer.attend_residual(h, heads))
        outputs.append(h)
    return torch.cat(outputs, dim=1), mems, norms
