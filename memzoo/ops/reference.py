"""The reference backend: dense masks and plain matmuls, any dtype (float64 included).

It is the oracle every other backend is tested against, so it is written to be
obviously right rather than fast: it builds the full ``(Tq, extra + Tk)`` score
matrix, masks it with :meth:`BlockLayout.visible`, and takes a softmax.

A key a query may not see contributes an exact zero, for any input: with finite
values ``p @ v`` does that (a masked probability is 0 and ``0 * v == 0``); when a
key or value is NaN or infinite (``0 * nan`` is NaN), the output is the sum over
the *visible* keys only, written out (``where(visible, p * v, 0).sum()``), so a NaN
at position 5 never reaches positions 0-4 (causality holds for any input).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memzoo.ops.base import FLOATS, AttentionCall, AttentionInputs, Backend, Support, Tolerance, register_backend


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    priority = 1000  # never preferred by "auto"; always available
    #: any device, any floating dtype, every layout feature; it *is* the oracle (tolerance 0)
    support = Support(
        dtypes={"*": FLOATS},
        training=frozenset({"*"}),
        tolerances={d: Tolerance(0.0, 0.0) for d in FLOATS},
        relative_keys=True,
        key_positions=True,
    )

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        return []

    def attend(self, inputs: AttentionInputs) -> Tensor:
        q, k, v, layout, q_start, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start, inputs.scale
        k_mem, v_mem, extra_k, extra_v = inputs.k_mem, inputs.v_mem, inputs.extra_k, inputs.extra_v
        tq, tk = q.shape[2], k.shape[2]
        end = q_start + tq
        q_pos = torch.arange(q_start, end, device=q.device)
        k_pos = inputs.key_positions()  # sinks first, then the run (or the rows' own positions)
        allowed = layout.visible(q_pos[:, None], k_pos[None, :])  # (Tq, Tk)

        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
        memory = layout.is_memory(q_pos[:, None], k_pos[None, :])  # (Tq, Tk)
        if k_mem is not None:
            scores = torch.where(memory, (q @ k_mem.transpose(-1, -2)) * scale, scores)
        if inputs.rel_q is not None:
            assert inputs.rel_k is not None
            # rel_q_i · rel_k[d] for every distance d, then each pair's own d = pos_i - pos_j
            by_distance = inputs.rel_q @ inputs.rel_k.transpose(-1, -2)  # (B, H, Tq, n)
            distance = (q_pos[:, None] - k_pos[None, :]).clamp(0, by_distance.shape[-1] - 1)  # (Tq, Tk); unseen pairs masked
            scores = scores + by_distance.gather(-1, distance.expand(*by_distance.shape[:2], tq, tk)) * scale
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
        values = [t for t in (v, v_mem, extra_v) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in values):
            return self._attend_visible_only(p_tok, p_extra, v, v_mem, extra_v, allowed, memory, q_block if n_extra else None)
        if v_mem is not None:
            out = (p_tok * ~memory) @ v + (p_tok * memory) @ v_mem
        else:
            out = p_tok @ v
        if extra_v is not None:
            out = out + p_extra @ extra_v.flatten(2, 3)
        return out

    @staticmethod
    def _attend_visible_only(
        p_tok: Tensor,
        p_extra: Tensor,
        v: Tensor,
        v_mem: Tensor | None,
        extra_v: Tensor | None,
        allowed: Tensor,
        memory: Tensor,
        q_block: Tensor | None,
    ) -> Tensor:
        """``sum_j p[i, j] * value[i, j]`` over the keys ``j`` query ``i`` may see, and
        nothing from the others (whatever their values): (B, H, Tq, Tk, Dv) at once."""
        per_key = v[:, :, None, :, :]  # (B, H, 1, Tk, Dv): the value of key j for query i
        if v_mem is not None:
            per_key = torch.where(memory[:, :, None], v_mem[:, :, None, :, :], per_key)
        seen = torch.where(allowed[:, :, None], p_tok[..., None] * per_key, 0.0)
        out = seen.sum(dim=-2)
        if extra_v is not None and q_block is not None:
            f = extra_v.shape[3]
            rows = extra_v.flatten(2, 3)[:, :, None, :, :]  # (B, H, 1, nb*F, Dv)
            row_block = torch.arange(rows.shape[3], device=rows.device) // max(f, 1)
            mine = (row_block[None, :] == q_block[:, None])[:, :, None]  # (Tq, nb*F, 1)
            out = out + torch.where(mine, p_extra[..., None] * rows, 0.0).sum(dim=-2)
        return out

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
        return probs @ v
