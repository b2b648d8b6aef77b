"""Streaming state: plain containers of tensors, one class per variant.

A state holds everything a variant needs to continue a sequence exactly where the
last call stopped: ``pos`` (absolute position of the next token), the ``fingerprint``
of the backbone that made it, and tensor fields. Every tensor is batch-first
(dim 0 = batch). A field is a ``Tensor`` or a ``list[Tensor]`` (one per layer).

``to_dict()`` flattens a state into ``{name: tensor}`` (lists as ``name.0``,
``name.1``, ...; metadata as ``__pos__``, ``__variant__``, ``__fingerprint__``) so it
can be saved with safetensors; :func:`save_state` / :func:`load_state` do that.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

from memzoo.errors import StateError

S = TypeVar("S", bound="State")
_META = ("pos", "fingerprint")


def _encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(t: Tensor) -> str:
    return bytes(t.tolist()).decode("utf-8")


@dataclass
class State:
    """Base class; subclasses are dataclasses that add tensor fields and set ``variant``."""

    variant: ClassVar[str] = ""
    pos: int
    fingerprint: str

    # ----------------------------------------------------------------- tensors
    def tensor_fields(self) -> dict[str, Tensor | list[Tensor]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _META}

    def tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        for value in self.tensor_fields().values():
            out.extend(value if isinstance(value, (list, tuple)) else [value])
        return out

    def map(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """A new state of the same type with ``fn`` applied to every tensor."""
        changes: dict[str, Any] = {}
        for name, value in self.tensor_fields().items():
            changes[name] = [fn(t) for t in value] if isinstance(value, (list, tuple)) else fn(value)
        return dataclasses.replace(self, **changes)

    def detach(self: S) -> S:
        """Cut the autograd graph (truncated backpropagation between calls)."""
        return self.map(Tensor.detach)

    def to(self: S, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> S:
        """Move to a device and/or cast floating tensors to ``dtype`` (integer tensors keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self.map(move)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (what streaming keeps in memory)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the floating tensors (None if there are none)."""
        for t in self.tensors():
            if t.is_floating_point():
                return t.dtype
        return None

    def where(self: S, keep: Tensor, other: S) -> S:
        """Rows where ``keep`` (B,) is True from ``self``, the others from ``other``
        (same type and shapes), e.g. to reset some rows of a batch to a fresh state."""
        if type(other) is not type(self) or other.pos != self.pos or other.fingerprint != self.fingerprint:
            raise StateError("State.where needs two states of the same variant, config and position")
        if keep.dtype != torch.bool or keep.shape != (self.batch_size,):
            raise StateError(f"keep must be a bool tensor of shape ({self.batch_size},), got {keep.dtype} {tuple(keep.shape)}")
        def pick(t: Tensor, o: Tensor) -> Tensor:
            if t.shape != o.shape or t.dtype != o.dtype or t.device != o.device:
                raise StateError(
                    f"State.where: tensors differ ({tuple(t.shape)} {t.dtype} {t.device} vs "
                    f"{tuple(o.shape)} {o.dtype} {o.device}); both states need the same batch, shapes, dtype and device"
                )
            return torch.where(keep.view(-1, *([1] * (t.dim() - 1))).to(t.device), t, o)

        changes: dict[str, Any] = {}
        theirs = other.tensor_fields()
        for name, value in self.tensor_fields().items():
            if isinstance(value, (list, tuple)):
                changes[name] = [pick(t, o) for t, o in zip(value, theirs[name])]
            else:
                changes[name] = pick(value, theirs[name])
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- flat dict
    def to_dict(self) -> dict[str, Tensor]:
        flat: dict[str, Tensor] = {
            "__pos__": torch.tensor(self.pos, dtype=torch.int64),
            "__variant__": _encode(self.variant),
            "__fingerprint__": _encode(self.fingerprint),
        }
        for name, value in self.tensor_fields().items():
            if isinstance(value, (list, tuple)):
                for i, t in enumerate(value):
                    flat[f"{name}.{i}"] = t
            else:
                flat[name] = value
        return flat

    @classmethod
    def from_dict(cls: type[S], flat: dict[str, Tensor]) -> S:
        missing = {"__pos__", "__variant__", "__fingerprint__"} - set(flat)
        if missing:
            raise StateError(f"not a memzoo state dict: missing {sorted(missing)}")
        variant = _decode(flat["__variant__"])
        if variant != cls.variant:
            raise StateError(f"state dict is for variant {variant!r}, not {cls.variant!r} ({cls.__name__})")
        values: dict[str, Any] = {}
        used = {"__pos__", "__variant__", "__fingerprint__"}
        for f in dataclasses.fields(cls):
            if f.name in _META:
                continue
            if f.name in flat:
                values[f.name] = flat[f.name]
                used.add(f.name)
                continue
            items = []
            while f"{f.name}.{len(items)}" in flat:
                items.append(flat[f"{f.name}.{len(items)}"])
                used.add(f"{f.name}.{len(items) - 1}")
            if not items:
                raise StateError(f"state dict for {cls.__name__} has no entry for field {f.name!r}")
            values[f.name] = items
        extra = set(flat) - used
        if extra:
            raise StateError(f"state dict for {cls.__name__} has unknown entries {sorted(extra)}")
        return cls(pos=int(flat["__pos__"]), fingerprint=_decode(flat["__fingerprint__"]), **values)


def fingerprint_of(variant: str, hparams: dict[str, Any]) -> str:
    """Canonical JSON of the hyper-parameters that decide a state's meaning."""
    return json.dumps({"variant": variant, **hparams}, sort_keys=True, separators=(",", ":"))


def describe_mismatch(expected: str, got: str) -> str:
    """Which hyper-parameters differ between two fingerprints, readably."""
    try:
        a, b = json.loads(expected), json.loads(got)
    except json.JSONDecodeError:
        return f"expected {expected}, got {got}"
    diffs = [f"{k}: state has {b.get(k)!r}, model has {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs)


def save_state(state: State, path: str) -> None:
    """Write a state to a safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.to_dict().items()}, str(path))


def load_state(path: str, device: str | torch.device = "cpu") -> State:
    """Read a state written by :func:`save_state`; its class comes from the variant registry."""
    from safetensors.torch import load_file

    from memzoo.registry import get_variant

    flat = load_file(str(path), device=str(device))
    if "__variant__" not in flat:
        raise StateError(f"{path} is not a memzoo state file (no __variant__ entry)")
    return get_variant(_decode(flat["__variant__"])).cls.State.from_dict(flat)
