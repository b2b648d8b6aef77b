"""The reference backend: dense masks and plain matmuls, any dtype (float64 included).

It is the oracle every other backend is tested against, so it is written to be
obviously right rather than fast: it builds the full ``(Tq, extra + Tk)`` score
matrix, masks it with :meth:`BlockLayout.visible`, and takes a softmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memzoo.ops.base import FLOATS, AttentionCall, Backend, Support, Tolerance, register_backend
from memzoo.ops.layout import BlockLayout


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    priority = 1000  # never preferred by "auto"; always available
    #: any device, any floating dtype, every layout feature; it *is* the oracle (tolerance 0)
    support = Support(
        dtypes={"*": FLOATS},
        training=frozenset({"*"}),
        tolerances={d: Tolerance(0.0, 0.0) for d in FLOATS},
    )

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        layout: BlockLayout,
        q_start: int,
        scale: float,
        k_mem: Tensor | None = None,
        v_mem: Tensor | None = None,
        extra_k: Tensor | None = None,
        extra_v: Tensor | None = None,
    ) -> Tensor:
        tq, tk = q.shape[2], k.shape[2]
        end = q_start + tq
        q_pos = torch.arange(q_start, end, device=q.device)
        k_pos = layout.key_positions(end, tk, q.device)  # sinks first, then the run
        allowed = layout.visible(q_pos[:, None], k_pos[None, :])  # (Tq, Tk)

        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
        memory = layout.is_memory(q_pos[:, None], k_pos[None, :])  # (Tq, Tk)
        if k_mem is not None:
            scores = torch.where(memory, (q @ k_mem.transpose(-1, -2)) * scale, scores)
        scores = scores.masked_fill(~allowed, float("-inf"))

        n_extra = 0
        if extra_k is not None:
            nb, f = extra_k.shape[2], extra_k.shape[3]
            n_extra = nb * f
            q_block = layout.block_start(q_pos) // (layout.block_size or 1)
            q_block = q_block - q_block[0]  # (Tq,) block index within this call
            row_block = torch.arange(n_extra, device=q.device) // max(f, 1)  # (nb*F,)
            e_scores = (q @ extra_k.flatten(2, 3).transpose(-1, -2)) * scale  # (B,H,Tq,nb*F)
            e_scores = e_scores.masked_fill(row_block[None, :] != q_block[:, None], float("-inf"))
            scores = torch.cat([e_scores, scores], dim=-1)

        probs = torch.softmax(scores, dim=-1)
        p_extra, p_tok = probs[..., :n_extra], probs[..., n_extra:]
        if v_mem is not None:
            out = (p_tok * ~memory) @ v + (p_tok * memory) @ v_mem
        else:
            out = p_tok @ v
        if extra_v is not None:
            out = out + p_extra @ extra_v.flatten(2, 3)
        return out

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        return probs @ v
