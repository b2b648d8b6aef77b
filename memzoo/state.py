"""Streaming state: plain containers of tensors, one class per variant.

A state holds everything a variant needs to continue a sequence exactly where the
last call stopped: ``pos`` (absolute position of the next token), the ``fingerprint``
of the backbone that made it, and tensor fields. Every tensor is batch-first
(dim 0 = batch). A field is a ``Tensor`` or a ``list[Tensor]`` (one per layer).

``to_dict()`` flattens a state into ``{name: tensor}`` (lists as ``name.0``,
``name.1``, ...; metadata as ``__pos__``, ``__variant__``, ``__fingerprint__``) so it
can be saved with safetensors; :func:`save_state` / :func:`load_state` do that.

What is read back is checked, and anything else is refused with a
:class:`~memzoo.errors.StateError` that names the entry: ``__pos__`` is an int64
scalar >= 0, the metadata is UTF-8 text, every floating tensor is finite, and a
file's checksum (written by :func:`save_state` over every entry) matches, so a
hand-edited file is refused. With ``load_state(path, model=...)`` the state is also
checked against that model (config fingerprint, and every tensor's shape for the
state's position).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

from memzoo.errors import StateError

if TYPE_CHECKING:
    from memzoo.ragged import RaggedState

S = TypeVar("S", bound="State")
_META = ("pos", "fingerprint")


def _encode(text: str) -> Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _decode(t: Tensor, name: str = "metadata") -> str:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise StateError(f"state entry {name!r} must be UTF-8 text (a 1-D uint8 tensor), got {got}")
    try:
        return bytes(t.tolist()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateError(f"state entry {name!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _position(t: Tensor) -> int:
    """``__pos__``: an int64 scalar >= 0 (a float, a vector or a negative number is refused)."""
    if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 0:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise StateError(f"state entry '__pos__' must be an int64 scalar, got {got}")
    from memzoo.config import MAX_POSITION

    pos = int(t)
    if not 0 <= pos <= MAX_POSITION:
        raise StateError(f"state entry '__pos__' must lie in [0, {MAX_POSITION}] (memzoo.config.MAX_POSITION), got {pos}")
    return pos


def check_finite(name: str, t: Tensor) -> None:
    """Refuse a NaN or infinite value in a state tensor (naming the entry)."""
    if not isinstance(t, Tensor):
        raise StateError(f"state entry {name!r} must be a tensor, got {type(t).__name__}")
    if t.is_floating_point() and t.device.type != "meta" and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise StateError(f"state entry {name!r} has {bad} non-finite value(s) (NaN or inf)")


#: the attribute :meth:`memzoo.MemzooLM.generate` tags the states it hands back with (the
#: model instance that made them); states derived from one (detach, to, where) keep it
ORIGIN = "_memzoo_origin"


def carry_origin(source: Any, made: Any) -> Any:
    """``made`` (derived from ``source``) with ``source``'s generate() tag, if it has one."""
    origin = getattr(source, ORIGIN, None)
    if origin is not None:
        setattr(made, ORIGIN, origin)
    return made


#: the attribute of a state that holds its derived tensors (:meth:`State.derived`)
_DERIVED = "_memzoo_derived"


def derived_allowed(*tensors: Tensor) -> bool:
    """Whether a state may keep derived tensors of ``tensors``: in eager code without
    autograd (a kept tensor would hold its graph), and not under ``torch.inference_mode``
    (inference tensors have no version counter to notice a change by)."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the other checks
        return False
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not any(t.is_inference() for t in tensors)


def _source_key(sources: tuple[Tensor, ...]) -> tuple:
    # holds the sources themselves, so their ids are not reused while the entry lives
    return tuple((t, t.data_ptr(), t._version) for t in sources)


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
        return carry_origin(self, dataclasses.replace(self, **changes))

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
        (same variant and config), e.g. to reset some rows of a batch to a fresh state.
        Rows may stand at different positions afterwards: the result is then a
        :class:`memzoo.ragged.RaggedState`."""
        from memzoo.ragged import RaggedState, check_keep, where

        check_keep(keep, self.batch_size)
        if isinstance(other, RaggedState) or (isinstance(other, State) and other.pos != self.pos):
            return where(self, keep, other)  # type: ignore[return-value]
        if type(other) is not type(self) or other.fingerprint != self.fingerprint:
            raise StateError("State.where needs two states of the same variant and config")
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
        return carry_origin(self, dataclasses.replace(self, **changes))

    # ------------------------------------------------------- derived tensors
    def derived(self, name: str, sources: tuple[Tensor, ...]) -> Any:
        """A tensor a variant computed from ``sources`` and kept with this state
        (:meth:`keep_derived`), e.g. the RoPE-rotated copy of cached keys the state holds
        unrotated, so the next decode step does not recompute it; None when none was
        kept, or when a source is not the very tensor it was computed from, unchanged
        (identity, storage, in-place version: ``optimizer.step()``, ``load_state_dict``,
        ``.to()``, any in-place write is noticed; a write through ``.data`` is not).

        Never part of the state's meaning: not a field, not saved, not compared, dropped
        by :meth:`map` (``to``, ``detach``, ...). Only eager no-grad code keeps any
        (:func:`derived_allowed`), and a call that records gradients for a source (a
        weight) never reads one."""
        if torch.compiler.is_compiling():  # traced code recomputes (the checks are Python, outside the graph)
            return None
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            return None  # kept without a graph: reused here, the sources (weights) would get no gradient
        kept = self.__dict__.get(_DERIVED)
        hit = kept.get(name) if kept else None
        if hit is None or len(hit[0]) != len(sources):
            return None
        for (t, ptr, version), now in zip(hit[0], sources):
            if t is not now or ptr != now.data_ptr() or version != now._version:
                return None
        return hit[1]

    def keep_derived(self, name: str, sources: tuple[Tensor, ...], value: Any) -> None:
        """Keep ``value`` (a tensor or a tuple of tensors), a function of ``sources`` alone
        (tensors of this state, the parameters it was computed with), for :meth:`derived`;
        nothing is kept unless :func:`derived_allowed` (no graph is held, no version
        counter is missing)."""
        if derived_allowed(*(value if isinstance(value, tuple) else (value,)), *sources):
            self.__dict__.setdefault(_DERIVED, {})[name] = (_source_key(sources), value)

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
        variant = _decode(flat["__variant__"], "__variant__")
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
        pos = _position(flat["__pos__"])
        fingerprint = _decode(flat["__fingerprint__"], "__fingerprint__")
        try:
            parsed = json.loads(fingerprint)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise StateError(
                f"state entry '__fingerprint__' is not a memzoo fingerprint (a JSON object of the config): {fingerprint[:60]!r}"
            )
        for name, t in flat.items():
            if not name.startswith("__"):
                check_finite(name, t)
        return cls(pos=pos, fingerprint=fingerprint, **values)


def fingerprint_of(variant: str, hparams: dict[str, Any]) -> str:
    """Canonical JSON of the hyper-parameters that decide a state's meaning."""
    return json.dumps({"variant": variant, **hparams}, sort_keys=True, separators=(",", ":"))


def describe_mismatch(expected: str, got: str) -> str:
    """Which hyper-parameters differ between two fingerprints, readably."""
    try:
        a, b = json.loads(expected), json.loads(got)
    except json.JSONDecodeError:
        a = b = None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return f"expected {expected[:200]}, got {got[:200]}"
    diffs = [f"{k}: state has {b.get(k)!r}, model has {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diffs:  # equal fields, other text (a fingerprint is compared as memzoo writes it)
        return f"the same fields written as other text: the state has {got[:200]}, memzoo writes {expected[:200]}"
    return "; ".join(diffs)


#: the safetensors metadata key of :func:`save_state`'s checksum
CHECKSUM_KEY = "memzoo.state.sha256"


def checksum(flat: dict[str, Tensor]) -> str:
    """sha256 over every entry's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        t = flat[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(state: Any, path: str) -> None:
    """Write a state (a :class:`State` or a :class:`memzoo.ragged.RaggedState`) to a
    safetensors file, with a checksum over every entry."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().clone() for k, v in state.to_dict().items()}
    save_file(flat, str(path), metadata={CHECKSUM_KEY: checksum(flat)})


def load_state(path: str, device: str | torch.device = "cpu", *, model: Any = None) -> "State | RaggedState":
    """Read a state written by :func:`save_state` (a :class:`State`, or a
    :class:`memzoo.ragged.RaggedState` for a ragged one); its class comes from the variant
    registry. Refused with a :class:`StateError` naming the entry: a file that is not
    a safetensors file, whose checksum is missing or does not match (edited by hand),
    non-UTF-8 metadata, a ``__pos__`` that is not an int64 scalar >= 0, NaN or inf
    values. With ``model`` (a memzoo model or backbone), the state must also be one
    that model can continue: same config, and every tensor's shape right for the
    state's position."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from memzoo.registry import get_variant

    try:
        # the bytes, not safe_open: safe_open(...).get_tensor keeps ~64 bytes per tensor it
        # hands out (safetensors 0.8), a leak a loop that reloads states would grow without end
        with open(str(path), "rb") as fh:
            raw = fh.read()
        flat = load_bytes(raw)
        # the header (valid: load() accepted it): 8-byte little-endian length, then JSON
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        meta = header.get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateError(f"{path} is not a readable safetensors state file: {exc}") from None
    if not isinstance(meta, dict):
        raise StateError(f"{path} is not a readable safetensors state file: its metadata is not a mapping")
    if "__variant__" not in flat:
        raise StateError(f"{path} is not a memzoo state file (no __variant__ entry)")
    if CHECKSUM_KEY not in meta:
        raise StateError(f"{path} has no checksum (metadata {CHECKSUM_KEY!r}): not written by memzoo.save_state")
    if meta[CHECKSUM_KEY] != checksum(flat):
        raise StateError(f"{path}: checksum {CHECKSUM_KEY!r} does not match its entries (edited or damaged)")
    state_cls = get_variant(_decode(flat["__variant__"], "__variant__")).cls.State
    if "__ragged__" in flat:  # rows at different positions (memzoo.ragged)
        from memzoo.ragged import RaggedState

        state = RaggedState.from_dict(flat, state_cls)
    else:
        state = state_cls.from_dict(flat)
    state = state.to(device)
    if model is not None:
        check_state_for(model, state)
    return state


def check_state_for(model: Any, state: State) -> None:
    """Refuse ``state`` unless ``model`` (a memzoo model or backbone) can continue it:
    its variant and config, every tensor's shape for its position, and the values the
    variant checks (:meth:`memzoo.Backbone.check_state_values`: flags, offsets, caches)."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "check_state"):
        raise TypeError(f"model must be a memzoo model or backbone, got {type(model).__name__}")
    # the dtype the model computes in (a model refuses inputs of another dtype): a state in
    # another is refused here, not at the first call (or inside a variant's value check)
    backbone.check_state(state, batch_size=state.batch_size, device=state.device, dtype=backbone.param_dtype)
    for part in getattr(state, "groups", None) and [s for _, s in state.groups] or [state]:
        backbone.check_state_values(part)
