"""What each query may see: the layout a variant hands to an attention backend.

Shape notation used across ``memzoo.ops``::

    B batch, H heads, Tq queries in this call, Tk keys in this call,
    D query/key width per head, Dv value width per head,
    L block_size, W window (keys before a block's first token), F extra rows per block.

Positions are absolute token indices (not RoPE angles). The queries of a call are
the *last* ``Tq`` positions covered by the keys: keys cover ``[end - Tk, end)`` and
queries ``[end - Tq, end)`` with ``end = q_start + Tq``. Mask polarity everywhere in
memzoo: ``True`` = may attend.

A query at position ``p`` lies in block ``b = p // L`` and may attend to

* every key at position ``j`` with ``b*L - W <= j <= p`` (``window=None``: every ``j <= p``),
* every *extra row* given for its block (FAM's feedback memory), and nothing else.

Keys before the query's block start (``j < b*L``) are its *memory*. A variant may pass
separate memory tensors ``k_mem``/``v_mem`` (same shape as ``k``/``v``) that are used in
place of ``k``/``v`` for memory keys only: BSWA's stop-gradient ablation passes
``k.detach()``, Transformer-XL passes keys re-projected from detached hidden states.
The forward values must be equal; only the gradient path differs.

ASCII picture, ``L=4, W=4`` (``m=1`` block of memory), queries ``q`` over keys ``k``::

          k: 0 1 2 3 | 4 5 6 7 | 8 9 ...
    q 4:     x x x x   x . . .
    q 5:     x x x x   x x . .
    q 8:               x x x x   x . .
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockLayout:
    """Block-anchored sliding window (see the module docstring).

    ``block_size=None`` means one unbounded block (plain causal attention with an
    optional window counted from position 0, which is then irrelevant).
    """

    block_size: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {self.block_size}")
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be >= 0 or None, got {self.window}")

    @property
    def bounded(self) -> bool:
        """True when each query sees a bounded number of keys (block-gatherable)."""
        return self.block_size is not None and self.window is not None

    def block_start(self, pos: Tensor) -> Tensor:
        if self.block_size is None:
            return torch.zeros_like(pos)
        return torch.div(pos, self.block_size, rounding_mode="floor") * self.block_size

    def visible(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Boolean mask, True where the query at ``q_pos`` may see the key at ``k_pos``
        (broadcasting, e.g. ``q_pos[:, None]`` against ``k_pos[None, :]``)."""
        allowed = k_pos <= q_pos
        if self.window is not None:
            allowed = allowed & (k_pos >= self.block_start(q_pos) - self.window)
        return allowed

    def is_memory(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """True where the key lies before the query's block (the query's memory)."""
        return k_pos < self.block_start(q_pos)

    def n_query_blocks(self, q_start: int, n_queries: int) -> int:
        """How many blocks the queries ``[q_start, q_start + n_queries)`` touch."""
        if self.block_size is None:
            return 1
        last = q_start + n_queries - 1
        return last // self.block_size - q_start // self.block_size + 1
