"""Ring buffers: the caches of bounded variants, one shape once they are full.

A ring of ``capacity`` C keeps rows by position, from its ``origin`` on (the first
position it receives; ``sinks`` keeps the positions before it apart). It fills in
position order while it has fewer than C rows, then keeps the row of position ``p`` in
slot ``(p - origin) % C``: writing a position overwrites the oldest row. So after the
positions ``[origin, end)`` it holds the last ``min(C, end - origin)`` of them
(:func:`size`), and once full its shape never changes again::

    C = 4, after positions 0..5:   slot: 0 1 2 3
                                   pos:  4 5 2 3     (2, 3 stale once no query sees them)

What a query may see is the variant's layout: the stale rows are never read. A decode
step writes its row, then reads the rows its query sees in position order (:func:`read`:
views of the ring, a copy only where they wrap around) and attends over them plainly; in
compiled code, or inside :func:`static_shapes`, it hands every row to the attention with
its position instead (:func:`positions`, for :func:`memzoo.ops.attend`'s ``key_pos``),
so nothing in the step changes shape from one token to the next. A longer call reads the
rows it needs in position order. The rows run along ``dim`` and start ``offset`` rows into
the buffer (rows before it are the variant's own, e.g. the sinks). An unbounded cache is a
ring that never fills (``capacity=None``): it grows in position order.

Every function is out of place (a call never changes the state it reads) and
differentiable, so gradients flow through a state like through any tensor; except
inside :func:`written_in_place` (no-grad decoding of a state nobody else holds), where a
write into a full buffer copies its rows in and returns that buffer.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import Tensor


def size(capacity: int | None, end: int, origin: int = 0) -> int:
    """How many rows a ring holds once the positions ``[origin, end)`` were written."""
    held = max(0, end - origin)
    return held if capacity is None else min(capacity, held)


def read(
    buf: Tensor, lo: int, hi: int, end: int, *, capacity: int | None, origin: int = 0, offset: int = 0, dim: int = 2
) -> Tensor:
    """The rows of positions ``[lo, hi)`` in position order, from a ring written up to
    ``end`` (they must still be held: ``end - size(...) <= lo <= hi <= end``): a view when
    they do not wrap around, else a copy."""
    n = hi - lo
    if n == 0:
        return buf.narrow(dim, offset, 0)
    if capacity is None or end - origin <= capacity:  # not full yet: in position order
        if offset == 0 and n == buf.shape[dim]:  # all of it
            return buf
        return buf.narrow(dim, offset + lo - origin, n)
    first = (lo - origin) % capacity
    if first + n <= capacity:
        return buf.narrow(dim, offset + first, n)
    head = capacity - first  # [the last slots | the first slots]: one copy, no index tensor
    return torch.cat([buf.narrow(dim, offset + first, head), buf.narrow(dim, offset, n - head)], dim=dim)


def write(
    buf: Tensor, rows: Tensor, start: int, *, capacity: int | None, origin: int = 0, offset: int = 0, dim: int = 2
) -> Tensor:
    """A new buffer: ``buf`` (a ring written up to ``start``) with ``rows`` (n along ``dim``),
    the positions ``[start, start + n)``, written in: appended while the ring fills, then in
    their slots (only the last ``capacity`` of them when there are more)."""
    n = rows.shape[dim]
    held = buf.shape[dim] - offset  # size(capacity, start, origin)
    if capacity is not None and n >= capacity:  # every slot gets a new row: the last C rows, rolled
        rolled = from_ordered(rows, start + n, capacity=capacity, origin=origin, dim=dim)
        return torch.cat([buf.narrow(dim, 0, offset), rolled], dim=dim) if offset else rolled
    grow = n if capacity is None else min(n, capacity - held)
    if grow > 0:
        buf = torch.cat([buf, rows.narrow(dim, 0, grow)], dim=dim)
        rows, start, n = rows.narrow(dim, grow, n - grow), start + grow, n - grow
    if n == 0:
        return buf
    assert capacity is not None
    # slots [first, first + n) modulo C: one run of slots, or two when it wraps around
    first = (start - origin) % capacity
    head = min(n, capacity - first)
    if n == head:
        return put(buf, rows, offset + first, dim=dim)
    return put(put(buf, rows.narrow(dim, 0, head), offset + first, dim=dim), rows.narrow(dim, head, n - head), offset, dim=dim)


def put(buf: Tensor, rows: Tensor, at: int, *, dim: int = 2) -> Tensor:
    """``buf`` with ``rows`` (n along ``dim``) in its rows ``[at, at + n)``: a new buffer (a
    copy with the rows copied in; no index tensor: nothing to move to the device), or,
    inside :func:`written_in_place`, ``buf`` itself with the rows copied in."""
    n = rows.shape[dim]
    if torch.compiler.is_compiling():
        # one concatenation: a graph with dynamic shapes then knows the new rows' widths are the buffer's
        return torch.cat([buf.narrow(dim, 0, at), rows, buf.narrow(dim, at + n, buf.shape[dim] - at - n)], dim=dim)
    out = buf if _IN_PLACE.get() and not torch.is_grad_enabled() else buf.clone()
    out.narrow(dim, at, n).copy_(rows)
    return out


_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("memzoo_ring_in_place", default=False)
_STATIC: contextvars.ContextVar[bool] = contextvars.ContextVar("memzoo_ring_static", default=False)


@contextlib.contextmanager
def static_shapes() -> Iterator[None]:
    """Within the block, decode steps on full rings attend over every row at its position
    (``key_pos``) rather than over the rows their query sees, in order: the same result,
    and the same shapes at every step, as a captured graph needs (``torch.cuda.graph`` by
    hand; ``torch.compile`` does this by itself). Eagerly the ordered rows cost less."""
    token = _STATIC.set(True)
    try:
        yield
    finally:
        _STATIC.reset(token)


def decodes_statically() -> bool:
    """Whether a decode step on a full ring should keep one shape (:func:`static_shapes`):
    in compiled code, or inside :func:`static_shapes`."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the context variable
        return True
    return _STATIC.get()


@contextlib.contextmanager
def written_in_place(enabled: bool = True) -> Iterator[None]:
    """Within the block, writes into full buffers (:func:`write`, :func:`put`) copy the new
    rows into the buffer they are given and return it, instead of a new buffer: a decode
    step then copies one row per cache, not the whole cache. Only where nobody else holds
    those buffers: ``generate`` and ``stream`` use it for the states they made themselves
    (after the prompt), never for a state a caller passed in. Eager no-grad code only
    (elsewhere writes stay out of place: autograd and compiled graphs need them).
    ``enabled=False``: writes out of place within the block, even inside an enclosing
    ``written_in_place()`` (a prompt pass over a caller's state uses it)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"written_in_place(enabled=...) takes a bool, got {enabled!r}")
    token = _IN_PLACE.set(enabled)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def positions(capacity: int | None, end: int, device: torch.device | str | None = None, *, origin: int = 0) -> Tensor:
    """(rows,) int64: the position of each row of a ring written up to ``end``, in the
    buffer's order (for :func:`memzoo.ops.attend`'s ``key_pos``)."""
    n = size(capacity, end, origin)
    if capacity is None or end - origin <= capacity:
        return torch.arange(origin, origin + n, device=device)
    # the positions [end - C, end) in order, rolled into their slots (as from_ordered rolls rows)
    return torch.arange(end - capacity, end, device=device).roll((end - origin) % capacity)


def from_ordered(rows: Tensor, end: int, *, capacity: int | None, origin: int = 0, dim: int = 2) -> Tensor:
    """The ring holding what ``rows`` hold: the positions ``[end - n, end)`` in order, at
    least every position the ring keeps (for code that computes a state in position order,
    such as the slow references)."""
    n = size(capacity, end, origin)
    assert rows.shape[dim] >= n, (rows.shape, n)
    tail = rows.narrow(dim, rows.shape[dim] - n, n)
    if capacity is None or end - origin <= capacity:
        return tail
    return torch.roll(tail, (end - origin) % capacity, dims=dim)


def ordered(buf: Tensor, end: int, *, capacity: int | None, origin: int = 0, offset: int = 0, dim: int = 2) -> Tensor:
    """Every row a ring written up to ``end`` holds, in position order (``from_ordered``'s inverse)."""
    return read(buf, end - size(capacity, end, origin), end, end, capacity=capacity, origin=origin, offset=offset, dim=dim)
