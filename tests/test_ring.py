"""Ring buffers (:mod:`memzoo.variants.ring`), the caches of bounded variants: any chunking
of the writes gives the same buffer as writing everything at once (and as building it
from the rows in order); reads in position order and the rows' positions agree with
that; gradients reach exactly the rows a read returns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from memzoo.variants import ring


@st.composite
def streams(draw):
    capacity = draw(st.one_of(st.none(), st.integers(1, 7)))
    origin = draw(st.integers(0, 3))
    offset = draw(st.integers(0, 2))
    end = draw(st.integers(origin, origin + 25))
    cuts = sorted(draw(st.sets(st.integers(origin + 1, max(origin + 1, end - 1)), max_size=6))) if end > origin + 1 else []
    return capacity, origin, offset, end, cuts


@given(case=streams())
def test_any_chunking_of_the_writes_gives_one_buffer(case):
    capacity, origin, offset, end, cuts = case
    rows = torch.arange(end, dtype=torch.float64)[None, None, :, None] * torch.ones(1, 2, 1, 3)  # row value = its position
    head = torch.full((1, 2, offset, 3), -1.0)  # the variant's own rows before the ring
    buf, start = head, origin
    for stop in [*cuts, end]:
        buf = ring.write(buf, rows[:, :, start:stop], start, capacity=capacity, origin=origin, offset=offset)
        start = stop
        n = ring.size(capacity, start, origin)
        assert buf.shape[2] == offset + n
        held = ring.positions(capacity, start, origin=origin)
        assert held.shape == (n,) and torch.equal(buf[0, 0, offset:, 0], held.double()), (buf[0, 0, :, 0], held)
    assert torch.equal(buf[:, :, :offset], head)
    whole = ring.from_ordered(rows[:, :, origin:end], end, capacity=capacity, origin=origin)
    assert torch.equal(buf[:, :, offset:], whole)
    assert torch.equal(ring.ordered(buf, end, capacity=capacity, origin=origin, offset=offset)[0, 0, :, 0],
                       torch.arange(end - ring.size(capacity, end, origin), end, dtype=torch.float64))
    if capacity is not None and end - origin > capacity:
        assert buf.shape[2] == offset + capacity  # full: one shape from now on


@given(case=streams(), data=st.data())
def test_reads_are_the_rows_of_their_positions_and_carry_gradients(case, data):
    capacity, origin, offset, end, _ = case
    n = ring.size(capacity, end, origin)
    lo = data.draw(st.integers(end - n, end))
    hi = data.draw(st.integers(lo, end))
    rows = torch.arange(end, dtype=torch.float64)[None, None, :, None].repeat(1, 1, 1, 2)
    buf = torch.cat([torch.zeros(1, 1, offset, 2), ring.from_ordered(rows[:, :, origin:], end, capacity=capacity, origin=origin)], 2)
    buf.requires_grad_(True)
    got = ring.read(buf, lo, hi, end, capacity=capacity, origin=origin, offset=offset)
    assert torch.equal(got[0, 0, :, 0], torch.arange(lo, hi, dtype=torch.float64))
    if hi > lo:
        (grad,) = torch.autograd.grad(got.sum(), buf)
        touched = grad[0, 0, :, 0] != 0
        assert int(touched.sum()) == hi - lo and not touched[:offset].any()


def test_writes_in_place_only_inside_the_context_and_without_gradients():
    buf = torch.zeros(1, 2, 4, 3)
    rows = torch.ones(1, 2, 1, 3)
    out = ring.write(buf, rows, 9, capacity=4)  # full ring: position 9 in slot 1
    assert out is not buf and not buf.any() and out[0, 0, :, 0].tolist() == [0, 1, 0, 0]
    with ring.written_in_place():
        with torch.no_grad():
            same = ring.write(buf, rows, 10, capacity=4)
            assert same is buf and buf[0, 0, :, 0].tolist() == [0, 0, 1, 0]
            wrapped = ring.write(buf, torch.full((1, 2, 2, 3), 2.0), 11, capacity=4)  # slots 3 and 0
            assert wrapped is buf and buf[0, 0, :, 0].tolist() == [2, 0, 1, 2]
        grad_rows = rows.clone().requires_grad_(True)
        kept = ring.write(buf, grad_rows, 13, capacity=4)  # autograd needs a new buffer
        assert kept is not buf and kept.requires_grad
        filling = ring.write(torch.zeros(1, 2, 2, 3), rows, 2, capacity=4)  # not full yet: it grows
        assert filling.shape[2] == 3
        with torch.no_grad(), ring.written_in_place(False):  # out of place again inside the block
            assert ring.write(buf, rows, 14, capacity=4) is not buf
    with pytest.raises(TypeError, match="takes a bool"):
        with ring.written_in_place(1):  # type: ignore[arg-type]
            pass
