"""A small memo of values computed from one tensor, for eager hot paths (a decode step's
RoPE angles, its attention mask): the layers of a step compute the same thing from the
same tensor, so it is computed once per step, not once per layer."""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor


class TensorMemo(dict):
    """``key -> (tensor, its in-place version, *values)`` for the last ``entries`` keys,
    oldest first. A value is reused only for that very tensor, unchanged: include
    ``id(tensor)`` in the key (it is not reused while the entry holds the tensor, and a
    weak entry goes when its tensor does, before the id can be reused)."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self.entries = entries

    def lookup(self, key: tuple, tensor: Tensor) -> tuple[Any, ...] | None:
        """The values kept for ``key`` if they were computed from ``tensor`` as it is now."""
        hit = self.get(key)
        if hit is None:
            return None
        held = hit[0]() if isinstance(hit[0], weakref.ref) else hit[0]
        if held is tensor and hit[1] == tensor._version:
            return hit[2:]
        return None

    def keep(self, key: tuple, tensor: Tensor, *values: Any, weak: bool = False) -> None:
        """Keep ``values`` computed from ``tensor`` under ``key`` (the newest entry), dropping
        the oldest beyond ``entries``. ``weak``: the entry does not keep ``tensor`` alive and
        is dropped with it (for large values that should live no longer than one call)."""
        self.pop(key, None)
        held: Any = tensor
        if weak:
            def forget(ref: "weakref.ref[Tensor]", memo: "weakref.ref[TensorMemo]" = weakref.ref(self)) -> None:
                owner = memo()
                hit = None if owner is None else owner.get(key)
                if hit is not None and hit[0] is ref:  # not an entry made since for a new tensor
                    owner.pop(key, None)

            held = weakref.ref(tensor, forget)
        self[key] = (held, tensor._version, *values)
        # the oldest, listed in one step: a weak entry's callback may drop an entry meanwhile
        for oldest in list(self)[: max(0, len(self) - self.entries)]:
            self.pop(oldest, None)
