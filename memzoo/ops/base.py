"""The backend seam: a backend computes attention for a :class:`BlockLayout`.

Every backend implements two calls with one signature each:

* :meth:`Backend.attend` — queries attend to keys under a layout, optionally with
  separate memory tensors and per-block extra rows;
* :meth:`Backend.dense` — every query attends to every key (FAM's block compression,
  memory-token updates), no mask.

Backends register themselves with :func:`register_backend`; adding one is a new file.
:func:`resolve_backend` turns a name (or ``"auto"``) into a backend instance and, when
the asked-for backend cannot run a call, raises an error listing every reason.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import Tensor

from memzoo.ops.layout import BlockLayout


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to say whether it can run a call."""

    device_type: str
    dtype: torch.dtype
    layout: BlockLayout
    requires_grad: bool
    has_memory_tensors: bool
    has_extra: bool

    @classmethod
    def describe(
        cls,
        q: Tensor,
        k: Tensor,
        layout: BlockLayout,
        k_mem: Tensor | None,
        extra_k: Tensor | None,
    ) -> "AttentionCall":
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, k_mem, extra_k)
        )
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            layout=layout,
            requires_grad=needs_grad,
            has_memory_tensors=k_mem is not None,
            has_extra=extra_k is not None,
        )


class Backend:
    """Base class. Subclasses set ``name`` and implement ``attend``/``dense``."""

    name: ClassVar[str] = ""
    #: lower is preferred by ``auto``
    priority: ClassVar[int] = 100

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Readable reasons why this backend cannot run ``call`` (empty: it can)."""
        return []

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        layout: BlockLayout,
        q_start: int,
        scale: float,
        k_mem: Tensor | None = None,
        v_mem: Tensor | None = None,
        extra_k: Tensor | None = None,
        extra_v: Tensor | None = None,
    ) -> Tensor:
        """``q`` (B,H,Tq,D), ``k`` (B,H,Tk,D), ``v`` (B,H,Tk,Dv) -> (B,H,Tq,Dv).

        ``extra_k``/``extra_v``: (B,H,nb,F,D)/(B,H,nb,F,Dv), one set of rows per query
        block touched by this call, in order (``nb = layout.n_query_blocks(...)``).
        """
        raise NotImplementedError

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        """Unmasked attention over the last two dims; any leading batch dims."""
        raise NotImplementedError


_BACKENDS: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("memzoo_backend", default=None)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend selectable by its ``name``. Duplicates raise."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name`")
    if cls.name in _BACKENDS or cls.name == "auto":
        raise ValueError(f"backend {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    return cls


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid: {', '.join(['auto', *list_backends()])}"
        )
    if name not in _INSTANCES:
        _INSTANCES[name] = _BACKENDS[name]()
    return _INSTANCES[name]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid: {', '.join(['auto', *list_backends()])}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, every attention call uses backend ``name`` (overrides the model's)."""
    token = _OVERRIDE.set(check_backend_name(name))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


class BackendUnavailable(RuntimeError):
    """No backend (or not the asked-for one) can run this call; the message says why."""


def resolve_backend(name: str, call: AttentionCall) -> Backend:
    """The backend that runs ``call``: ``name`` itself (or the context override), or for
    ``"auto"`` the preferred backend that supports it. Never switches silently: a named
    backend that cannot run the call raises with its reasons."""
    name = _OVERRIDE.get() or name
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(call)
        if reasons:
            raise BackendUnavailable(f"backend {name!r} cannot run this call: " + "; ".join(reasons))
        return backend
    rejected: list[str] = []
    for cand in sorted(_BACKENDS.values(), key=lambda c: (c.priority, c.name)):
        backend = get_backend(cand.name)
        reasons = backend.not_supported_reasons(call)
        if not reasons:
            return backend
        rejected.append(f"{cand.name}: {'; '.join(reasons)}")
    raise BackendUnavailable("no attention backend can run this call: " + " | ".join(rejected))
