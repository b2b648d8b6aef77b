"""Cost that grows with the call length the way the work does (issue 13, "Growth").

A variant's scan over the blocks of a call must not slice a tensor that spans the whole
call once per block: the backward of each such slice (or select) makes a zero gradient
of the whole tensor and adds it up, O(blocks · T) time and memory traffic for what is
O(T) work (it made ``infini``, ``brt`` and ``rmt`` grow 11-15x from T=2k to 16k where
8x is linear). Cutting the tensor once (``unflatten`` + ``unbind``, or ``split``) keeps
one gradient. This is checked on the backward graph itself, so it holds on any machine:
the elements those nodes zero-fill must grow like T.
"""

from __future__ import annotations

import pytest
import torch

import memzoo
from memzoo import testing as kit


def sliced_elements(out: torch.Tensor) -> int:
    """The elements of the inputs of every slice/select node in ``out``'s backward graph
    (each one's backward allocates a zero gradient of that size)."""
    total, seen, todo = 0, set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ in ("SliceBackward0", "SelectBackward0"):
            total += torch.Size(int(s) for s in fn._saved_self_sym_sizes).numel()
        todo.extend(f for f, _ in fn.next_functions)
    return total


@pytest.mark.parametrize("name", memzoo.list_variants())
def test_backward_slices_grow_linearly_with_the_call(name):
    model = kit.tiny_model(name, dict(memzoo.get_variant(name).config.conformance_options[0]))
    short, long = 32, 128  # 8 and 32 blocks of the tiny block size
    counts = [sliced_elements(model(kit.random_tokens(model, 1, t)).logits) for t in (short, long)]
    # linear: 4x (measured <= 4.14); one whole-size slice per block gave 6.9-17.7x here
    assert counts[1] <= 1.1 * (long / short) * counts[0], f"{name}: slice/select backward elements {counts[0]} -> {counts[1]}"
