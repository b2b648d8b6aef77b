"""A small memo of values computed from one tensor, for eager hot paths (a decode step's
RoPE angles, its attention mask): the layers of a step compute the same thing from the
same small tensor, so it is computed once per step, not once per layer."""

from __future__ import annotations

from typing import Any

from torch import Tensor


class TensorMemo(dict):
    """``key -> (tensor, its in-place version, *values)`` for the last ``entries`` keys,
    oldest first. A value is reused only for that very tensor, unchanged: include
    ``id(tensor)`` in the key (it is not reused while the entry holds the tensor)."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self.entries = entries

    def lookup(self, key: tuple, tensor: Tensor) -> tuple[Any, ...] | None:
        """The values kept for ``key`` if they were computed from ``tensor`` as it is now."""
        hit = self.get(key)
        if hit is not None and hit[0] is tensor and hit[1] == tensor._version:
            return hit[2:]
        return None

    def keep(self, key: tuple, tensor: Tensor, *values: Any) -> None:
        """Keep ``values`` computed from ``tensor`` under ``key`` (the newest entry), dropping
        the oldest beyond ``entries``."""
        self.pop(key, None)
        self[key] = (tensor, tensor._version, *values)
        while len(self) > self.entries:
            self.pop(next(iter(self)), None)
