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
* every *sink*: the first ``sinks`` positions of the sequence, ``j < sinks`` and ``j <= p``
  (attention sinks, StreamingLLM), whatever the window,
* every *extra row* given for its block (FAM's feedback memory), and nothing else.

Key rows and their positions: with ``sinks = 0`` the ``Tk`` keys are the positions
``[end - Tk, end)``. With ``sinks = S > 0`` the first ``s = min(S, end)`` key rows are the
positions ``0 … s-1`` (the sinks) and the other ``Tk - s`` rows are the run
``[end - (Tk - s), end)``, which starts at or after ``s`` (:meth:`BlockLayout.key_positions`).
So a streaming cache passes its sinks and the recent run with a gap between them, and a
call from position 0 passes every key (the two pieces then meet: ``[0, end)``).

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

The same with ``sinks=1`` (key 0 always visible)::

          k: 0 1 2 3 | 4 5 6 7 | 8 9 ...
    q 8:     x         x x x x   x . .
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    #: the first ``sinks`` positions are visible to every later query (attention sinks)
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {self.block_size}")
        if self.window is not None and self.window < 0:
            raise ValueError(f"window must be >= 0 or None, got {self.window}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {self.sinks!r}")

    def n_sink_rows(self, end: int) -> int:
        """How many leading key rows are sinks in a call whose queries end at ``end``."""
        return min(self.sinks, end)

    def run_start(self, end: int, n_keys: int) -> int:
        """Position of the first key row after the sinks (the run ``[run_start, end)``)."""
        s = self.n_sink_rows(end)
        if n_keys < s or n_keys > end:
            raise ValueError(
                f"a call ending at position {end} with sinks={self.sinks} needs between {s} and {end} keys "
                f"(the {s} sinks, then a run of recent keys ending at {end}), got {n_keys}"
            )
        return end - (n_keys - s)

    def key_positions(self, end: int, n_keys: int, device: torch.device | str | None = None) -> Tensor:
        """(Tk,) int64: the position of every key row of a call ending at ``end``."""
        if not self.sinks:
            return torch.arange(end - n_keys, end, device=device)
        s, run = self.n_sink_rows(end), self.run_start(end, n_keys)
        return torch.cat([torch.arange(s, device=device), torch.arange(run, end, device=device)])

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
            near = k_pos >= self.block_start(q_pos) - self.window
            if self.sinks:
                near = near | (k_pos < self.sinks)
            allowed = allowed & near
        return allowed

    def visible_to(self, q: int, k_pos: Tensor) -> Tensor:
        """:meth:`visible` for one query at position ``q`` (a decode step): (Tk,) bool, the
        window's bounds worked out in Python (fewer tensor ops than the general form)."""
        allowed = k_pos <= q
        if self.window is not None:
            block_start = 0 if self.block_size is None else (q // self.block_size) * self.block_size
            near = k_pos >= block_start - self.window
            if self.sinks:
                near = near | (k_pos < self.sinks)
            allowed = allowed & near
        return allowed

    def is_memory(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """True where the key lies before the query's block (the query's memory)."""
        return k_pos < self.block_start(q_pos)

    def clipped_to_keys(self, q_start: int, n_queries: int, k_start: int) -> "BlockLayout":
        """The same visibility for the queries ``[q_start, q_start + n_queries)`` over keys at
        positions ``>= k_start`` (the run's first position; sinks are rows of their own),
        with the window no wider than those keys reach: ``min(W, S - k_start)`` for ``S``
        the last touched block's start. Every key the window drops lies before
        ``k_start``, where no key exists, so a backend that sizes its work by the window
        (gathering ``W`` rows per block) costs what the keys that exist cost, whatever
        the configured window (``xl``'s ``memory_len=65536`` on a short input)."""
        if not self.bounded:
            return self
        assert self.block_size is not None and self.window is not None
        last_start = (q_start + n_queries - 1) // self.block_size * self.block_size
        reach = max(0, last_start - k_start)
        return self if reach >= self.window else replace(self, window=reach)

    def one_query_sees_every_key(self, q_start: int, n_queries: int, n_keys: int) -> bool:
        """Whether the call is one query (a decode step) that may see every key row passed
        (from the shapes and positions alone: no data, no sync), as when a streaming cache
        holds exactly the query's window. Extra rows are its own block's."""
        if n_queries != 1:
            return False
        end = q_start + 1
        if self.window is None or self.block_size is None:
            lo = 0
        else:
            lo = (q_start // self.block_size) * self.block_size - self.window
        return self.run_start(end, n_keys) >= lo

    def n_query_blocks(self, q_start: int, n_queries: int) -> int:
        """How many blocks the queries ``[q_start, q_start + n_queries)`` touch."""
        if self.block_size is None:
            return 1
        last = q_start + n_queries - 1
        return last // self.block_size - q_start // self.block_size + 1
