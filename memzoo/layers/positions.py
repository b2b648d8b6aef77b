"""Position schemes, pluggable per variant.

A scheme turns per-head queries and keys into the vectors a backend dot-products,
given each token's absolute position. Queries and keys are transformed apart, so
cached keys keep the transform of their own position and streaming stays exact.

Shapes: ``x`` (B, H, T, Dh); ``pos`` (T,) shared by the batch or (B, T) per row
(e.g. FAM's random position offsets), int64.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from memzoo._memo import TensorMemo


class RopeScaling(BaseModel):
    """RoPE frequency scaling of a pretrained checkpoint (Hugging Face's ``rope_parameters``
    / ``rope_scaling``). ``type``: ``linear`` (positions interpolated by ``factor``),
    ``llama3`` (Llama 3.1's per-frequency smoothing), ``yarn`` (NTK-by-parts interpolation
    plus an attention factor on cos/sin). Fields a type does not use must stay at their
    defaults; the fields a type needs are required for it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    type: Literal["linear", "llama3", "yarn"]
    factor: float = Field(gt=0)
    original_max_position_embeddings: int | None = Field(None, ge=1, description="llama3, yarn: the pretraining context")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3")
    beta_fast: float = Field(32.0, gt=0, description="yarn")
    beta_slow: float = Field(1.0, gt=0, description="yarn")
    attention_factor: float | None = Field(None, gt=0, description="yarn: scale of cos/sin; None = 0.1·ln(factor) + 1")
    truncate: bool = Field(True, description="yarn: round the correction range to whole dimensions")

    @model_validator(mode="after")
    def _fields_of_the_type(self) -> "RopeScaling":
        if self.type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ValueError(f"rope scaling {self.type!r} needs original_max_position_embeddings")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        defaults = {name: info.default for name, info in type(self).model_fields.items() if name not in ("type", "factor")}
        used = {"linear": set(), "llama3": {"original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
                "yarn": {"original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"}}[self.type]
        stray = [n for n, d in defaults.items() if n not in used and getattr(self, n) != d]
        if stray:
            raise ValueError(f"rope scaling {self.type!r} does not use {stray}; it uses {sorted(used) or 'only factor'}")
        return self


class PositionScheme(nn.Module):
    """Interface: ``query(q, pos)``, ``key(k, pos)`` and the softmax ``scale``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def unrotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """The inverse of :meth:`key` (and :meth:`query`): ``unrotate(key(k, p), p) == k``."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse of its query/key map")

    def moved(self, x: Tensor, by: Tensor) -> Tensor:
        """A query (or key) made at ``p`` as if made at ``p + by``: ``moved(query(q, p), d)
        == query(q, p + d)``, in one step (``by`` (T,) broadcasts like a position)."""
        raise NotImplementedError(f"{type(self).__name__} cannot move its queries and keys")

    def query_key(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """``(query(q, pos), key(k, pos))``; a scheme may share work between the two."""
        return self.query(q, pos), self.key(k, pos)

    def positions_at(self, pos: Tensor, like: Tensor) -> list[Any]:
        """For positions ``pos`` (B, n, T), what :meth:`query_at`, :meth:`key_at` and
        :meth:`query_key_at` take for each ``pos[:, j]`` (tensors like ``like``), made in one
        go: a scan applying positions at many small steps (FAM's updates) prepares them once.
        Here the positions themselves; :class:`RoPE` computes all the rotations at once."""
        return list(pos.unbind(1))

    def query_at(self, q: Tensor, at: Any) -> Tensor:
        """:meth:`query` at one entry of :meth:`positions_at`."""
        return self.query(q, at)

    def key_at(self, k: Tensor, at: Any) -> Tensor:
        """:meth:`key` at one entry of :meth:`positions_at`."""
        return self.key(k, at)

    def query_key_at(self, q: Tensor, k: Tensor, at: Any) -> tuple[Tensor, Tensor]:
        """:meth:`query_key` at one entry of :meth:`positions_at`."""
        return self.query_key(q, k, at)


class NoPositions(PositionScheme):
    """Identity (NoPE): attention sees no explicit position."""

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        return q

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        return k

    def unrotate(self, x: Tensor, pos: Tensor) -> Tensor:
        return x

    def moved(self, x: Tensor, by: Tensor) -> Tensor:
        return x


class RoPE(PositionScheme):
    """Rotary position embedding (Su et al. 2021), half-split pairing (Hugging Face's
    ``rotate_half``), with optional frequency scaling (:class:`RopeScaling`).

    Frequencies and angles are float64, computed from integer positions and cast to the
    input's dtype at the end, so large absolute positions (streaming, random offsets)
    lose no precision before the cast. The frequencies are a plain attribute, not a
    buffer: ``model.to(torch.bfloat16)`` does not round them (only the result is cast).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        super().__init__(head_dim)
        self.base, self.scaling = base, scaling
        self.inv_freq, self.attention_factor = rope_frequencies(head_dim, base, scaling)  # (Dh/2,) float64
        #: the frequencies per device, filled where the module is (here, and by ``.to()``
        #: through :meth:`_apply`), so a compiled graph finds its device's copy already made
        self._on_device: dict[torch.device, Tensor] = {self.inv_freq.device: self.inv_freq}

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """``.to(device)`` / ``.cuda()``: also make the frequencies' copy on the new device
        (float64 whatever the module's dtype: only the device is taken from ``fn``)."""
        out = super()._apply(fn, recurse)
        try:
            device = fn(torch.zeros(0, dtype=torch.float64, device=self.inv_freq.device)).device
        except (RuntimeError, TypeError, ValueError):  # an ``fn`` that is not a move: filled on first use
            return out
        if device not in self._on_device:
            self._on_device[device] = self.inv_freq.to(device)
        return out

    def _freqs(self, device: torch.device) -> Tensor:
        cached = self._on_device.get(device)
        if cached is None:
            if torch.compiler.is_compiling():
                # not written inside a traced graph: Dynamo would guard on the cache's
                # contents, and the first traced call, which filled it, would be followed by
                # a recompile (a module moved with ``.to()`` has its copy already)
                return self.inv_freq.to(device)
            cached = self._on_device[device] = self.inv_freq.to(device)
        return cached

    def _cos_sin(self, pos: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`_angles` (the rotation's factors), in ``like``'s dtype: (T, Dh) or (B, 1, T, Dh).

        The results of the last few calls are kept (:data:`_ANGLES`) for every RoPE of the
        same frequencies: the layers of a call rotate at the same position tensor, so its
        angles are computed once per call (a decode step, a training step), not once per
        layer; a long call's only while its positions tensor lives. Reused only for that
        very tensor (identity and in-place version), in eager code."""
        key = None
        if not torch.compiler.is_compiling() and not pos.is_inference():  # compiling: first
            # id(pos) is not reused while the entry holds pos itself
            key = (self.head_dim, self.base, self.scaling, like.dtype, like.device, id(pos))
            hit = _ANGLES.lookup(key, pos)
            if hit is not None:
                return hit[0], hit[1]
        if torch.compiler.is_compiling() and pos.shape[-1] > 1:
            # an opaque op, so the graph computes the (T, Dh) factors once: inductor would
            # inline the float64 cos/sin into every rotated element (its CPU heuristic
            # realises reused exp/log/tanh, not cos/sin), a scalar cos per q/k element. Not
            # for one position (a decode step): there the op's call costs more than those few
            # inlined cos (measured: a compiled bswa decode step 417 -> 276 µs)
            return torch.ops.memzoo.rope_factors(pos, self._freqs(like.device), self.attention_factor, like.dtype)
        cos, sin = self._angles(pos, like)
        if key is not None:  # a long call's angles (a prefill, a training step) only while its positions live
            _ANGLES.keep(key, pos, cos, sin, weak=pos.numel() > _ANGLES_MAX)
        return cos, sin

    def _angles(self, pos: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``[cos, cos]`` and ``[-sin, sin]`` of the angles, full head width: (T, Dh) or
        (B, 1, T, Dh), in ``like``'s dtype (the factors :meth:`_turn` multiplies by)."""
        return rope_factors(pos, self._freqs(like.device), self.attention_factor, like.dtype)

    @staticmethod
    def _turn(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``[x1·cos - x2·sin, x2·cos + x1·sin]`` (halves ``x1``, ``x2``) from the full-width
        factors of :meth:`_angles`: ``x·[cos, cos] + roll(x)·[-sin, sin]``, ``roll`` swapping
        the halves. The same products and sums as rotating the halves apart (bitwise equal),
        in 4 ops instead of 8, forward and backward."""
        return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin

    def _rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        return self._turn(x, *self._cos_sin(pos, x))

    def query_key(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Both rotated with one computation of the angles (a decode step's hot path)."""
        if q.dtype != k.dtype or q.device != k.device:
            return self._rotate(q, pos), self._rotate(k, pos)
        cos, sin = self._cos_sin(pos, q)
        if q.shape[0] == 1 and q.shape[2:] == k.shape[2:]:
            # one sequence (a decode step): both in one rotation of their heads side by side
            # (elementwise, so the same values); for B = 1 the two slices stay contiguous
            both = self._turn(torch.cat([q, k], dim=1), cos, sin)
            return both[:, : q.shape[1]], both[:, q.shape[1] :]
        return self._turn(q, cos, sin), self._turn(k, cos, sin)

    def query(self, q: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(q, pos)

    def key(self, k: Tensor, pos: Tensor) -> Tensor:
        return self._rotate(k, pos)

    def positions_at(self, pos: Tensor, like: Tensor) -> list[Any]:
        """The factors of :meth:`_angles` for every ``pos[:, j]`` (B, n, T) from one
        computation: slices of it, the same elementwise factors as computing each apart
        (bitwise in ``tests/test_decode_paths.py``)."""
        cos, sin = self._cos_sin(pos.flatten(1), like)  # (B, 1, n·T, Dh) each
        shape = pos.shape[1:]
        return list(zip(cos.unflatten(2, shape).unbind(2), sin.unflatten(2, shape).unbind(2)))

    def query_at(self, q: Tensor, at: Any) -> Tensor:
        return self._turn(q, *at)

    def key_at(self, k: Tensor, at: Any) -> Tensor:
        return self._turn(k, *at)

    def query_key_at(self, q: Tensor, k: Tensor, at: Any) -> tuple[Tensor, Tensor]:
        if q.dtype != k.dtype or q.device != k.device:
            raise ValueError(f"query_key_at: q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must match (the factors are made for one)")
        return self._turn(q, *at), self._turn(k, *at)

    def unrotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """The inverse of :meth:`key` (and :meth:`query`): ``unrotate(key(k, p), p) == k``
        up to rounding (the rotation back, divided by the attention factor twice)."""
        back = self._rotate(x, -pos)
        return back if self.attention_factor == 1.0 else back / (self.attention_factor**2)

    def moved(self, x: Tensor, by: Tensor) -> Tensor:
        """Rotations compose, ``R(d) R(p) = R(p + d)``; the attention factor, applied once
        by :meth:`query` already, is divided out of the second rotation."""
        turned = self._rotate(x, by)
        return turned if self.attention_factor == 1.0 else turned / self.attention_factor

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_on_device"] = {self.inv_freq.device: self.inv_freq}
        return state


def rope_factors(pos: Tensor, inv_freq: Tensor, attention_factor: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoPE's rotation factors ``[cos, cos]`` and ``[-sin, sin]`` (times the attention
    factor) at integer positions ``pos`` (T,) or (B, T) for frequencies ``inv_freq``
    (Dh/2,) float64: (T, Dh) or (B, 1, T, Dh) each, in ``dtype``. The angles are float64
    (large positions lose nothing before the cast). Compiled graphs call it as the op
    ``torch.ops.memzoo.rope_factors`` (:data:`_rope_factors_op`), which they cannot inline."""
    ang = pos.to(torch.float64)[..., None] * inv_freq  # (T, Dh/2) or (B, T, Dh/2)
    if ang.dim() == 3:
        ang = ang[:, None]  # (B, 1, T, Dh/2)
    cos, sin = ang.cos(), ang.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


_rope_factors_op = torch.library.custom_op("memzoo::rope_factors", rope_factors, mutates_args=())


@_rope_factors_op.register_fake
def _(pos: Tensor, inv_freq: Tensor, attention_factor: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (*pos.shape, 2 * inv_freq.shape[0]) if pos.dim() == 1 else (pos.shape[0], 1, pos.shape[1], 2 * inv_freq.shape[0])
    return pos.new_empty(shape, dtype=dtype), pos.new_empty(shape, dtype=dtype)


def rope_frequencies(head_dim: int, base: float, scaling: RopeScaling | None = None) -> tuple[Tensor, float]:
    """RoPE's inverse frequencies (Dh/2,) in float64 and the factor on cos/sin, for each
    scaling type as Hugging Face's ``modeling_rope_utils`` defines it (there in float32)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv, 1.0
    factor = scaling.factor
    if scaling.type == "linear":
        return inv / factor, 1.0
    if scaling.type == "llama3":
        old = scaling.original_max_position_embeddings
        assert old is not None
        low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between
    old = scaling.original_max_position_embeddings
    assert old is not None
    attention = scaling.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv / factor * (1 - keep) + inv * keep, float(attention)


#: RoPE's angle memo: (head width, base, scaling, dtype, device, id of the positions) ->
#: (the positions tensor, its version, cos, sin), for the last ``_ANGLES_ENTRIES`` calls,
#: oldest first. The frequencies are a function of the first three (set in ``__init__``).
#: Positions tensors of more than ``_ANGLES_MAX`` entries are held weakly: their angles
#: (a training step's or a prefill's, shared by the layers of the call) go with them.
_ANGLES_ENTRIES = 8
_ANGLES = TensorMemo(_ANGLES_ENTRIES)
_ANGLES_MAX = 1024


POSITION_SCHEMES: dict[str, type[PositionScheme]] = {"rope": RoPE, "none": NoPositions}


def make_positions(name: str, head_dim: int, rope_base: float = 10000.0, rope_scaling: RopeScaling | None = None) -> PositionScheme:
    """Build a position scheme by name (see ``POSITION_SCHEMES``)."""
    if name not in POSITION_SCHEMES:
        raise ValueError(f"unknown position scheme {name!r}; valid: {', '.join(sorted(POSITION_SCHEMES))}")
    cls = POSITION_SCHEMES[name]
    if cls is RoPE:
        return RoPE(head_dim, rope_base, rope_scaling)
    if rope_scaling is not None:
        raise ValueError(f"rope_scaling applies to RoPE only, not to position scheme {name!r}")
    return cls(head_dim)
