"""The backend seam: a backend computes attention for a :class:`BlockLayout`.

Every backend implements two calls with one signature each:

* :meth:`Backend.attend` — queries attend to keys under a layout, optionally with
  separate memory tensors and per-block extra rows;
* :meth:`Backend.dense` — every query attends to every key (FAM's block compression,
  memory-token updates), no mask.

Each backend *declares* what it supports in a :class:`Support` (devices, dtypes per
device, devices with a backward, the one layout feature not every backend has,
tolerances per dtype, by default :data:`TOLERANCES`); the generic
:meth:`Backend.not_supported_reasons` turns the declaration into readable reasons, and
a backend adds run-time reasons of its own (a missing or broken install) in
:meth:`Backend.availability_reasons`. Tests are generated from the declarations.

Backends register themselves with :func:`register_backend`; adding one is a new file.
:func:`resolve_backend` turns a name (or ``"auto"``) into a backend instance; when the
asked-for backend cannot run a call it raises :class:`BackendUnavailable` listing every
backend's reasons. Nothing switches silently: ``auto`` resolves per call, and
:func:`record_backends` collects the names that actually ran.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch
from torch import Tensor

from memzoo.errors import MemzooError
from memzoo.ops.layout import BlockLayout

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """One layout attention call, as every backend receives it (xformers' ``Inputs`` is the
    model): the tensors, the layout and where the queries stand. Built once by
    :func:`memzoo.ops.attend` (K/V already repeated to the query heads).

    ``q`` (B,H,Tq,D), ``k`` (B,H,Tk,D), ``v`` (B,H,Tk,Dv); the key rows' positions are
    :meth:`BlockLayout.key_positions` (sinks first when ``layout.sinks``).

    * ``k_mem``/``v_mem`` (like ``k``/``v``): used in place of ``k``/``v`` for the keys
      that are a query's memory (before its block), see :mod:`memzoo.ops.layout`.
    * ``extra_k``/``extra_v``: (B,H,nb,F,D)/(B,H,nb,F,Dv), one set of rows per query block
      touched by the call, in order (``nb = layout.n_query_blocks(...)``).
    * ``rel_q`` (B,H,Tq,Dr) and ``rel_k`` (H or 1, n, Dr): *relative-position keys*
      (Shaw et al. 2018; Transformer-XL's terms (b)+(d)). The score of query ``i`` and key
      row ``j`` (not an extra row) gains ``rel_q[i] · rel_k[pos_i - pos_j]``, before the
      scale like ``q·k``::

          s_ij = scale · (q_i·k_j + rel_q_i·rel_k[pos_i - pos_j])

      ``n`` must cover every distance a query of the call can see
      (:meth:`needed_distances`).
    * ``key_pos`` (Tk,) int64: *keys at explicit positions*. The key rows stand at these
      positions, in any order, instead of :meth:`BlockLayout.key_positions` (a ring buffer
      read in slot order: a decode step over a fixed-size cache); the layout still says
      who sees what (:meth:`BlockLayout.visible`), so a row at a position no query of the
      call may see (at or after :attr:`end`, or out of every window) is never seen,
      whatever it holds. Every query's own position must be one of the rows (a query
      sees at least itself).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    layout: BlockLayout
    q_start: int
    scale: float
    k_mem: Tensor | None = None
    v_mem: Tensor | None = None
    extra_k: Tensor | None = None
    extra_v: Tensor | None = None
    rel_q: Tensor | None = None
    rel_k: Tensor | None = None
    key_pos: Tensor | None = None

    @property
    def end(self) -> int:
        """One past the last query's position."""
        return self.q_start + self.q.shape[2]

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that are given, by field name."""
        names = ("q", "k", "v", "k_mem", "v_mem", "extra_k", "extra_v", "rel_q", "rel_k")
        return {n: t for n in names if (t := getattr(self, n)) is not None}

    def replace(self, **changes: object) -> "AttentionInputs":
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def ring_step(self) -> bool:
        """One query over keys at explicit positions (a decode step over a ring buffer): the
        non-finite handling zeroes the rows it may not see, and the rows it sees go in as
        they are (plain attention)."""
        return self.key_pos is not None and self.q.shape[2] == 1

    def nothing_hidden(self) -> bool:
        """One query, keys in order, no memory tensors, that may see every key row: nothing
        is masked, so what a non-finite key reaches, plain attention reaches too (with memory
        tensors each position is read from one copy and the other copy's row is masked)."""
        return (
            self.key_pos is None and self.k_mem is None
            and self.layout.one_query_sees_every_key(self.q_start, self.q.shape[2], self.k.shape[2])
        )

    def key_positions(self) -> Tensor:
        """(Tk,) int64: the position of every key row (``key_pos``, or the layout's order)."""
        if self.key_pos is not None:
            return self.key_pos
        return self.layout.key_positions(self.end, self.k.shape[2], self.q.device)

    def needed_distances(self) -> int:
        """How many distances ``rel_k`` must hold: one past the largest ``pos_i - pos_j``
        over the queries of the call and the keys passed, bounded by what the layout lets
        a query see (its window and own block)."""
        layout, end = self.layout, self.end
        # the last query to the first key row, plus one (the first row is a sink, or the run's
        # start; rows at explicit positions may stand anywhere from position 0 on)
        reach = end if layout.n_sink_rows(end) or self.key_pos is not None else self.k.shape[2]
        if layout.bounded and not layout.sinks:
            assert layout.block_size is not None and layout.window is not None
            reach = min(reach, layout.block_size + layout.window)
        return reach

    def describe(self) -> "AttentionCall":
        return AttentionCall.describe(self)


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to say whether it can run a call."""

    device_type: str
    dtype: torch.dtype
    layout: BlockLayout
    requires_grad: bool
    has_memory_tensors: bool
    has_extra: bool
    #: D and Dv (None: not known, e.g. a hand-made call in a test)
    head_dim: int | None = None
    value_dim: int | None = None
    has_relative_keys: bool = False
    has_key_positions: bool = False

    @classmethod
    def describe(cls, inputs: AttentionInputs) -> "AttentionCall":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs.tensors().values())
        q = inputs.q
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            layout=inputs.layout,
            requires_grad=needs_grad,
            has_memory_tensors=inputs.k_mem is not None,
            has_extra=inputs.extra_k is not None,
            # int(): under torch.compile with dynamic shapes a head width is a constant of the graph
            head_dim=int(q.shape[-1]),
            value_dim=int(inputs.v.shape[-1]),
            has_relative_keys=inputs.rel_q is not None,
            has_key_positions=inputs.key_pos is not None,
        )

    def summary(self) -> str:
        """One line for error messages: ``cpu, float32, training, BlockLayout(...), extra rows``."""
        parts = [self.device_type, dtype_name(self.dtype), "training" if self.requires_grad else "inference", repr(self.layout)]
        if self.has_memory_tensors:
            parts.append("memory tensors")
        if self.has_extra:
            parts.append("extra rows")
        if self.has_relative_keys:
            parts.append("relative-position keys")
        if self.has_key_positions:
            parts.append("keys at explicit positions")
        if self.head_dim is not None and self.value_dim is not None and self.head_dim != self.value_dim:
            parts.append(f"Dv={self.value_dim} != D={self.head_dim}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Tolerance:
    """``|actual - reference| <= atol + rtol * |reference|`` elementwise (torch.allclose)."""

    atol: float
    rtol: float


#: The one tolerance table: "the same result computed another way", per dtype. A backend's
#: comparison with the reference (``Support.tolerances``) defaults to it, and the
#: conformance kit's :data:`memzoo.testing.TOLERANCES` is derived from it.
TOLERANCES: Mapping[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-10, 1e-8),
    torch.float32: Tolerance(5e-5, 1e-4),
    torch.bfloat16: Tolerance(8e-2, 5e-2),
    torch.float16: Tolerance(1e-2, 1e-2),
}


@dataclass(frozen=True)
class Support:
    """What a backend declares it can run. Device types are ``torch.device.type`` names."""

    #: device type -> dtypes that run there
    dtypes: Mapping[str, frozenset[torch.dtype]]
    #: device types with a backward pass (training); the others are inference only
    training: frozenset[str]
    #: memory tensors / extra rows together with a window=None layout. (Every backend runs
    #: every other layout feature: unbounded layouts, memory tensors, extra rows, sinks and
    #: Dv != D; a backend that cannot says why in :meth:`Backend.availability_reasons`.)
    unbounded_with_memory: bool = True
    #: device type -> why it is not supported (replaces the generic "runs on ..." reason)
    no_device_because: Mapping[str, str] = field(default_factory=dict)
    #: device type -> smallest head width D the kernels there take
    min_head_dim: Mapping[str, int] = field(default_factory=dict)
    #: comparison with the reference backend (same dtype, model level), per dtype
    tolerances: Mapping[torch.dtype, Tolerance] = field(default_factory=lambda: dict(TOLERANCES))
    #: why training is refused on a device it runs on (a remedy, not just a "no")
    no_training_because: Mapping[str, str] = field(default_factory=dict)
    #: relative-position keys (``rel_q``/``rel_k``) implemented: opt in, so a backend whose
    #: ``attend`` never reads them is never handed them (the bias would be dropped silently)
    relative_keys: bool = False
    #: why not, with a remedy (used when ``relative_keys`` is False)
    no_relative_keys_because: str | None = None
    #: keys at explicit positions (``key_pos``) implemented: opt in, like ``relative_keys``
    key_positions: bool = False
    #: why not, with a remedy (used when ``key_positions`` is False)
    no_key_positions_because: str | None = None

    @property
    def devices(self) -> list[str]:
        return sorted(self.dtypes)

    def dtypes_on(self, device_type: str) -> frozenset[torch.dtype] | None:
        """The dtypes declared for ``device_type`` (``"*"`` = any device); None: not supported."""
        return self.dtypes.get(device_type, self.dtypes.get("*"))

    def trains_on(self, device_type: str) -> bool:
        return device_type in self.training or "*" in self.training


class Backend:
    """Base class. Subclasses set ``name``, ``priority``, ``support`` and implement
    ``attend``/``dense``; add install/run-time checks in :meth:`availability_reasons`."""

    name: ClassVar[str] = ""
    #: lower is preferred by ``auto`` (see :meth:`rank`)
    priority: ClassVar[int] = 100
    support: ClassVar[Support] = Support(dtypes={"*": FLOATS}, training=frozenset({"*"}))

    def rank(self, call: AttentionCall) -> int:
        """Preference of ``auto`` for ``call`` among backends that can run it (lower wins)."""
        return self.priority

    def availability_reasons(self, call: AttentionCall) -> list[str]:
        """Run-time reasons beyond the declaration (missing install, no GPU, ...)."""
        return []

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        """Readable reasons why this backend cannot run ``call`` (empty: it can)."""
        s = self.support
        reasons: list[str] = []
        dev = call.device_type
        dtypes = s.dtypes_on(dev)
        if dtypes is None:
            reasons.append(s.no_device_because.get(dev, f"device {dev!r} is not supported (runs on: {', '.join(s.devices)})"))
        elif call.dtype not in dtypes:
            valid = ", ".join(sorted(dtype_name(d) for d in dtypes))
            reasons.append(f"dtype {dtype_name(call.dtype)} is not supported on {dev} (supported: {valid})")
        if call.requires_grad and dtypes is not None and not s.trains_on(dev):
            reasons.append(s.no_training_because.get(dev, f"no backward on {dev} (inference only)"))
        lay = call.layout
        if not lay.bounded and (call.has_extra or call.has_memory_tensors) and not s.unbounded_with_memory:
            reasons.append("an unbounded layout (window=None) with memory tensors or extra rows is not block-gatherable")
        if call.has_relative_keys and not s.relative_keys:
            reasons.append(s.no_relative_keys_because or (
                f"relative-position keys are not declared by backend {self.name!r} (Support.relative_keys=False)"
            ))
        if call.has_key_positions and not s.key_positions:
            reasons.append(s.no_key_positions_because or (
                f"keys at explicit positions are not declared by backend {self.name!r} (Support.key_positions=False)"
            ))
        least = s.min_head_dim.get(dev)
        if least is not None and call.head_dim is not None and call.head_dim < least:
            reasons.append(f"head width D={call.head_dim} is below the {least} the {dev} kernels take")
        return reasons + self.availability_reasons(call)

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        """The declared tolerance against the reference for ``dtype``."""
        try:
            return self.support.tolerances[dtype]
        except KeyError:
            valid = ", ".join(dtype_name(d) for d in self.support.tolerances)
            raise MemzooError(f"backend {self.name!r} declares no tolerance for {dtype_name(dtype)} (declared: {valid})") from None

    def attend(self, inputs: AttentionInputs) -> Tensor:
        """The call's output (B,H,Tq,Dv); see :class:`AttentionInputs` for what each input is."""
        raise NotImplementedError

    def handles_non_finite(self, inputs: AttentionInputs) -> bool:
        """True where :meth:`attend` itself keeps a non-finite key or value out of the
        queries that may not see it (and lets it reach those that do, as plain attention);
        the dispatcher then skips its own handling of non-finite values for the call.
        Under :func:`memzoo.ops.propagate_non_finite` the dispatcher skips it without
        asking, so a backend that isolates inside :meth:`attend` reads
        :data:`NON_FINITE` itself and does not isolate then (as sdpa does for its ``math_sdpa`` calls)."""
        return False

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        """Unmasked attention over the last two dims; any leading batch dims."""
        raise NotImplementedError

    def versions(self) -> dict[str, str]:
        """Library versions this backend runs on (for benchmark and leaderboard records)."""
        return {"torch": torch.__version__}


_BACKENDS: dict[str, type[Backend]] = {}
_INSTANCES: dict[str, Backend] = {}
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("memzoo_backend", default=None)
_RECORDERS: contextvars.ContextVar[tuple["BackendRecord", ...]] = contextvars.ContextVar("memzoo_backend_records", default=())


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend selectable by its ``name``. Duplicates raise."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a non-empty `name`")
    if cls.name in _BACKENDS or cls.name == "auto":
        raise ValueError(f"backend {cls.name!r} is already registered")
    _BACKENDS[cls.name] = cls
    _RESOLVED.clear()
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


class BackendOverride:
    """The :func:`use_backend` override as compiled code sees it: one process-wide object
    whose attribute Dynamo guards on, so a graph traced under one override (or none) is
    retraced, not reused, under another. Eager code reads the context variable (per
    thread and task); compiled code cannot trace one, and a constant read of it would be
    reused silently."""

    def __init__(self) -> None:
        self.name: str | None = None
        #: the overrides in force, oldest first (one entry per open use_backend block, any thread)
        self.active: list[tuple[object, str]] = []

    def enter(self, name: str) -> object:
        key = object()
        self.active.append((key, name))
        self.name = name
        return key

    def exit(self, key: object) -> None:
        # blocks of several threads may close out of order: drop this block's own entry, so
        # the process-wide name is always one still open (never a closed block's, for good)
        self.active = [e for e in self.active if e[0] is not key]
        self.name = self.active[-1][1] if self.active else None


#: the process-wide :class:`BackendOverride` (compiled code's view of :func:`use_backend`)
BACKEND_OVERRIDE = BackendOverride()


def _override(name: str) -> str:
    """``name``, or the :func:`use_backend` override in force."""
    if torch.compiler.is_compiling():
        return BACKEND_OVERRIDE.name or name  # traced: Dynamo guards on the attribute
    return _OVERRIDE.get() or name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, every attention call uses backend ``name`` (overrides the model's).

    Eager calls see it per thread (a context variable). ``torch.compile``d code sees it
    through a process-wide copy (:data:`BACKEND_OVERRIDE`), so a compiled model retraces
    for another override instead of running the backend it was first traced with; enter
    it from one thread at a time when compiled code runs in several."""
    token = _OVERRIDE.set(check_backend_name(name))
    key = BACKEND_OVERRIDE.enter(name)
    try:
        yield
    finally:
        BACKEND_OVERRIDE.exit(key)
        _OVERRIDE.reset(token)


class NonFinitePolicy:
    """Whether attention calls keep a non-finite key or value away from the queries that
    may not see it (``isolate``, the default; see :mod:`memzoo.ops`), set through
    :func:`memzoo.ops.propagate_non_finite`. One process-wide object rather than a
    context variable: compiled graphs read it while tracing, and Dynamo guards on the
    attribute, so a graph traced under one setting is not reused under the other (it
    cannot trace a context variable, and a constant read would be reused silently)."""

    def __init__(self) -> None:
        self.isolate = True


#: the process-wide :class:`NonFinitePolicy`
NON_FINITE = NonFinitePolicy()


class _ZeroNonFinite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        return torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _MarkNonFinite(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return t.masked_fill(mask, float("nan"))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def zero_non_finite(t: Tensor) -> Tensor:
    """``t`` with its NaN/inf entries set to 0; its gradient passed through unchanged.

    With :func:`mark_non_finite`, the two halves of the non-finite isolation
    (``memzoo.ops._attend_non_finite`` and sdpa's ``math_sdpa``): the backend runs on
    zeroed copies of the keys and values, and the outputs a non-finite one reaches are then
    set to NaN. Both pass the gradient through, so the isolation is transparent to the
    backward: the gradients are exactly those of the attention on the zeroed copies, for
    any gradient of the output. (That is what ``tests/test_ops.py`` checks.)

    This equals the gradients of ``torch.where(isfinite(t), t, 0)`` and ``masked_fill``
    (0 at the replaced entries and the marked outputs) whenever the gradient reaching the
    marked outputs is 0, which is what any finite loss gives them: the op that keeps a NaN
    out of a finite loss (``where``, ``masked_fill``, ``nan_to_num``, ``nansum``, an index
    that leaves it out) has derivative 0 there. Then the gradient of a replaced key ``j``,
    ``Σ_i P[i,j]·(dP[i,j] - D_i)·scale·q_i``, and of a replaced value ``(j, c)``,
    ``Σ_i P[i,j]·dO[i,c]``, are 0: a query that cannot see row ``j`` has ``P[i,j] = 0``,
    and one that can has its output marked (the whole row for a key, column ``c`` for a
    value), so ``dO[i] = 0`` (and ``dP[i,j] = D_i = 0``) or ``dO[i,c] = 0``. The masked
    versions were measured to cost a compiled training step about as much as the rest of
    the isolation: a masked copy of every key and value gradient, and a boolean mask saved
    for the backward, which inductor's CPU kernels store and load element by element
    (docs/benchmarks.md)."""
    return _ZeroNonFinite.apply(t)


def mark_non_finite(t: Tensor, mask: Tensor) -> Tensor:
    """``t.masked_fill(mask, nan)`` whose gradient is passed through unchanged, where
    ``masked_fill``'s would be 0 under ``mask``: the other half of the isolation's
    pass-through backward (see :func:`zero_non_finite`, which says when the two agree)."""
    return _MarkNonFinite.apply(t, mask)


class BackendUnavailable(RuntimeError):
    """No backend (or not the asked-for one) can run this call; the message says why."""


def explain(call: AttentionCall) -> dict[str, list[str]]:
    """Every registered backend's reasons for refusing ``call`` (``[]``: it can run it),
    in ``auto``'s order of preference."""
    out: dict[str, list[str]] = {}
    for backend in _ordered(call):
        out[backend.name] = backend.not_supported_reasons(call)
    return out


def _ordered(call: AttentionCall) -> list[Backend]:
    backends = [get_backend(n) for n in _BACKENDS]
    return sorted(backends, key=lambda b: (b.rank(call), b.name))


def _report(verdicts: dict[str, list[str]], skip: str | None = None) -> str:
    lines = []
    for name, reasons in verdicts.items():
        if name == skip:
            continue
        lines.append(f"  {name}: " + ("can run it" if not reasons else "; ".join(reasons)))
    return "\n".join(lines)


@torch.compiler.assume_constant_result
def _resolved_name_when_traced(
    name: str, device_type: str, dtype: torch.dtype, block_size: int | None, window: int | None, sinks: int,
    requires_grad: bool, has_memory_tensors: bool, has_extra: bool, head_dim: int | None, value_dim: int | None,
    has_relative_keys: bool, has_key_positions: bool,
) -> str:
    """Resolution run eagerly when ``torch.compile`` traces a call (Dynamo cannot trace
    context variables or the backends' availability checks); its result is a constant of
    the graph."""
    call = AttentionCall(
        device_type, dtype, BlockLayout(block_size, window, sinks), requires_grad, has_memory_tensors, has_extra, head_dim,
        value_dim, has_relative_keys, has_key_positions,
    )
    return _resolve(name, call).name


def resolve_backend(name: str, call: AttentionCall) -> Backend:
    """The backend that runs ``call``: ``name`` itself (or the context override), or for
    ``"auto"`` the preferred backend that supports it. Never switches silently: a named
    backend that cannot run the call raises with its reasons and every other backend's.
    Under ``torch.compile`` the choice is made once, when the graph is traced."""
    if torch.compiler.is_compiling():
        c = call
        return get_backend(_resolved_name_when_traced(
            _override(name), c.device_type, c.dtype, c.layout.block_size, c.layout.window, c.layout.sinks, c.requires_grad,
            c.has_memory_tensors, c.has_extra, c.head_dim, c.value_dim, c.has_relative_keys, c.has_key_positions,
        ))
    return _resolve(_override(name), call)


_RESOLVED: dict[tuple[str, AttentionCall], Backend] = {}
_RESOLVED_MAX = 4096


def resolve_backend_once(name: str, call: AttentionCall) -> Backend:
    """:func:`resolve_backend`, remembered per ``(name or the context override, call)``:
    what :func:`memzoo.ops.attend` uses, so a decode loop resolves each call shape once,
    not per layer and token. Refusals are not remembered (they raise every time).
    :func:`register_backend` forgets everything; so does :func:`forget_resolutions`
    (after changing a backend's declaration or availability in place)."""
    if torch.compiler.is_compiling():
        return resolve_backend(name, call)
    key = (_override(name), call)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _resolve(key[0], call)
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = backend
    return backend


def forget_resolutions() -> None:
    """Forget what :func:`resolve_backend_once` remembered."""
    _RESOLVED.clear()


def _resolve(name: str, call: AttentionCall) -> Backend:
    """The backend for ``call``: ``name`` (the override already applied) or, for "auto", the first that runs it."""
    if name != "auto":
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(call)
        if reasons:
            verdicts = explain(call)
            raise BackendUnavailable(
                f"backend {name!r} cannot run this call ({call.summary()}):\n  {name}: "
                + "; ".join(reasons)
                + "\nthe other backends for this call:\n"
                + _report(verdicts, skip=name)
            )
        return backend
    verdicts = {}
    for backend in _ordered(call):
        reasons = backend.not_supported_reasons(call)
        if not reasons:
            return backend
        verdicts[backend.name] = reasons
    raise BackendUnavailable(f"no attention backend can run this call ({call.summary()}):\n" + _report(verdicts))


def takes_relative_keys(name: str) -> bool:
    """Whether backend ``name`` (or the context override; ``"auto"`` always finds one)
    implements relative-position keys, by its declaration. A variant with another exact
    formulation (xl's widened queries and keys) uses it where this is False."""
    return _declares(_override(name), "relative_keys")


def takes_key_positions(name: str) -> bool:
    """Whether backend ``name`` (or the context override; ``"auto"`` always finds one)
    implements keys at explicit positions (``key_pos``), by its declaration. A variant
    reading its ring-buffer cache in slot order does so only where this is True, and reads
    it in position order (the layout's keys) elsewhere."""
    return _declares(_override(name), "key_positions")


@torch.compiler.assume_constant_result
def _declares(name: str, feature: str) -> bool:
    return name == "auto" or bool(getattr(get_backend(name).support, feature))


def resolve_backend_name(
    name: str = "auto",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    training: bool = False,
    layout: BlockLayout = BlockLayout(block_size=64, window=64),
    memory_tensors: bool = False,
    extra_rows: bool = False,
    head_dim: int | None = None,
    relative_keys: bool = False,
    key_positions: bool = False,
) -> str:
    """The backend ``name`` (or ``"auto"``) resolves to for a typical call on ``device``
    in ``dtype``, without running anything. Raises like :func:`resolve_backend` when
    nothing can run it. A model makes several kinds of calls; to know exactly which ran,
    use :func:`record_backends` around a forward pass."""
    call = AttentionCall(
        device_type=torch.device(device).type,
        dtype=dtype,
        layout=layout,
        requires_grad=training,
        has_memory_tensors=memory_tensors,
        has_extra=extra_rows,
        head_dim=head_dim,
        value_dim=head_dim,
        has_relative_keys=relative_keys,
        has_key_positions=key_positions,
    )
    return resolve_backend(name, call).name


@dataclass
class BackendRecord:
    """The backends that ran attention calls inside :func:`record_backends` (name -> calls)."""

    counts: Counter[str] = field(default_factory=Counter)

    @property
    def names(self) -> list[str]:
        return sorted(self.counts)

    def __str__(self) -> str:
        return ", ".join(f"{n} ({c} calls)" for n, c in sorted(self.counts.items())) or "(no attention calls)"


@contextlib.contextmanager
def record_backends() -> Iterator[BackendRecord]:
    """Collect the backends that actually ran::

        with ops.record_backends() as rec:
            model(tokens)
        rec.names      # e.g. ['sdpa']
    """
    record = BackendRecord()
    token = _RECORDERS.set(_RECORDERS.get() + (record,))
    try:
        yield record
    finally:
        _RECORDERS.reset(token)


def note_resolved(name: str) -> None:
    """Called by the dispatcher for every call: counts ``name`` in the open records
    (not inside ``torch.compile``d code, which cannot read the records' context variable)."""
    if torch.compiler.is_compiling():
        return
    for record in _RECORDERS.get():
        record.counts[name] += 1
