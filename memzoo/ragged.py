"""Variable-length batches: padding, per-row positions and packed documents, for every
variant by the shared contract.

A variant's :meth:`~memzoo.Backbone.step` sees rows that all stand at one position and
all take the same number of tokens. A ragged call is turned into such calls, and only
those: every row's real tokens are cut out of the padded batch, rows that stand at the
same position are run together for as many tokens as all of them have next, and the
rest follows in further calls (*waves*), each from the state the last one returned. So
no backend ever sees a pad, a row's result is what it gets alone by the state
equivalence property (chunked == whole, rows independent), and a variant gets all of
this by implementing the contract, with nothing to add.

* ``attention_mask`` (B, T), the Hugging Face convention: 1 (or True) = real token,
  0 = padding. A row's real tokens must be contiguous (left, right or both sides
  padded); a row may have none (its state is unchanged). Outputs at padding are 0.
* Per-row positions: after a ragged call the rows of a batch stand at different
  positions. Such a state is a :class:`RaggedState`: groups of rows, each group a
  plain state of the variant (rows at one position). It is accepted wherever a state
  is, and becomes a plain :class:`~memzoo.State` again whenever all rows meet at one
  position.
* ``document_ids`` (B, T) int >= 0: where the id changes within a row, a new document
  starts from the fresh state (position 0, the variant's initial memory), exactly as if
  the documents were run one by one. The last id of each row is kept in the state, so
  a document that goes on in the next call continues and a new id there starts afresh.

Cost: one backbone call per wave. From a common position (training, prefill) the
first wave runs every row for the shortest row's length and each further distinct
length adds one call over the rows still running; rows at different positions
(decoding after prompts of different lengths) run as separate calls. Reading the mask
synchronises with the device once per call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from memzoo.errors import InputError, StateError
from memzoo.state import State, _decode, _encode, carry_origin

if TYPE_CHECKING:
    from memzoo.variants.base import Backbone

#: ``RaggedState.documents`` value of a row with no document seen yet
NO_DOCUMENT = -1


# ----------------------------------------------------------------- row helpers
def select_rows(state: State, rows: Sequence[int] | Tensor) -> State:
    """The rows ``rows`` of ``state`` (a state of the same variant and position)."""
    if not isinstance(rows, Tensor):  # the identity is checked on the host list: no device sync
        if list(rows) == list(range(state.batch_size)):
            return state
        rows = torch.tensor(list(rows), dtype=torch.long)
    index = rows.to(state.device)
    return state.map(lambda t: t.index_select(0, index))


def cat_rows(states: Sequence[State]) -> State:
    """States of one variant, config and position, stacked along the batch."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    for s in states[1:]:
        if type(s) is not type(first) or s.pos != first.pos or s.fingerprint != first.fingerprint:
            raise StateError("can only stack states of one variant, config and position")
    changes: dict[str, Any] = {}
    fields = [s.tensor_fields() for s in states]
    for name, value in fields[0].items():
        if isinstance(value, (list, tuple)):
            changes[name] = [torch.cat([f[name][i] for f in fields], dim=0) for i in range(len(value))]
        else:
            changes[name] = torch.cat([f[name] for f in fields], dim=0)
    return dataclasses.replace(first, **changes)


# ------------------------------------------------------------------ the state
@dataclass
class RaggedState:
    """A batch whose rows stand at different positions (or carry document ids).

    ``groups``: ``(rows, state)`` pairs; ``rows`` (a tuple of batch indices, ascending)
    partition ``range(batch_size)`` and ``state`` is a plain state of the variant holding
    those rows, all at ``state.pos``. ``documents`` (B,) int64: each row's last document
    id (:data:`NO_DOCUMENT` before any), or None when no ``document_ids`` were given.
    Build one with :func:`from_rows` (which also normalises: one group per position).
    """

    groups: tuple[tuple[tuple[int, ...], State], ...]
    documents: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.groups:
            raise StateError("a RaggedState needs at least one group of rows")
        seen = sorted(r for rows, _ in self.groups for r in rows)
        if seen != list(range(len(seen))):
            raise StateError(f"RaggedState groups must partition the rows 0..B-1 exactly, got rows {seen}")
        kinds = {(type(s), s.fingerprint) for _, s in self.groups}
        if len(kinds) != 1:
            raise StateError("every group of a RaggedState must be a state of one variant and config")
        for rows, s in self.groups:
            if s.batch_size != len(rows):
                raise StateError(f"group of rows {rows} holds a state of batch size {s.batch_size}")
        if self.documents is not None:
            d = self.documents
            if not isinstance(d, Tensor) or d.dtype != torch.int64 or tuple(d.shape) != (len(seen),):
                raise StateError(f"RaggedState.documents must be an int64 tensor of shape ({len(seen)},)")
            if d.numel() and int(d.min()) < NO_DOCUMENT:
                raise StateError(f"RaggedState.documents must be >= {NO_DOCUMENT} (none yet), got {d.tolist()}")

    # ------------------------------------------------------------ like a State
    @property
    def variant(self) -> str:
        return self.groups[0][1].variant

    @property
    def fingerprint(self) -> str:
        return self.groups[0][1].fingerprint

    @property
    def state_type(self) -> type[State]:
        return type(self.groups[0][1])

    @property
    def batch_size(self) -> int:
        return sum(len(rows) for rows, _ in self.groups)

    @property
    def positions(self) -> Tensor:
        """(B,) int64: the position of each row's next token."""
        out = torch.zeros(self.batch_size, dtype=torch.long)
        for rows, s in self.groups:
            out[list(rows)] = s.pos
        return out

    @property
    def device(self) -> torch.device:
        return self.groups[0][1].device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.groups[0][1].dtype

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self.groups)

    def tensors(self) -> list[Tensor]:
        return [t for _, s in self.groups for t in s.tensors()]

    def row(self, i: int) -> State:
        """Row ``i`` alone: a plain state of batch size 1."""
        return select_rows_of(self.groups, i)

    def rows(self) -> list[State]:
        return [self.row(i) for i in range(self.batch_size)]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "RaggedState":
        return carry_origin(self, RaggedState(tuple((rows, s.map(fn)) for rows, s in self.groups), self.documents))

    def map_groups(self, fn: Callable[[State], State]) -> "RaggedState | State":
        """``fn`` applied to every group's state (e.g. ``carry_state``), renormalised."""
        return normalise([(rows, fn(s)) for rows, s in self.groups], self.documents)

    def detach(self) -> "RaggedState":
        return self.map(Tensor.detach)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "RaggedState":
        moved = RaggedState(tuple((rows, s.to(device, dtype)) for rows, s in self.groups), None)
        docs = self.documents
        if docs is not None and not isinstance(device, torch.dtype) and device is not None:
            docs = docs.to(device)
        return carry_origin(self, dataclasses.replace(moved, documents=docs))

    def where(self, keep: Tensor, other: "State | RaggedState") -> "State | RaggedState":
        return where(self, keep, other)

    # -------------------------------------------------------------- flat dict
    def to_dict(self) -> dict[str, Tensor]:
        flat: dict[str, Tensor] = {
            "__variant__": _encode(self.variant),
            "__ragged__": torch.tensor(len(self.groups), dtype=torch.int64),
        }
        if self.documents is not None:
            flat["__documents__"] = self.documents
        for g, (rows, s) in enumerate(self.groups):
            flat[f"__rows__.{g}"] = torch.tensor(rows, dtype=torch.int64)
            for name, t in s.to_dict().items():
                if name != "__variant__":
                    flat[f"{g}/{name}"] = t
        return flat

    @classmethod
    def from_dict(cls, flat: dict[str, Tensor], state_cls: type[State]) -> "RaggedState":
        n = flat.get("__ragged__")
        if not isinstance(n, Tensor) or n.dtype != torch.int64 or n.dim() != 0 or int(n) < 1:
            raise StateError("state entry '__ragged__' must be an int64 scalar >= 1 (the number of row groups)")
        variant = flat["__variant__"]
        used = {"__variant__", "__ragged__", "__documents__"}
        groups = []
        for g in range(int(n)):
            key = f"__rows__.{g}"
            rows = flat.get(key)
            if not isinstance(rows, Tensor) or rows.dtype != torch.int64 or rows.dim() != 1 or not rows.numel():
                raise StateError(f"ragged state entry {key!r} must be a 1-D int64 tensor of row indices, at least one")
            used.add(key)
            # a group's own __variant__ is not written (the file's is): left over, it is refused below
            part = {name[len(f"{g}/"):]: t for name, t in flat.items() if name.startswith(f"{g}/") and name != f"{g}/__variant__"}
            used.update(f"{g}/{name}" for name in part)
            part["__variant__"] = variant
            groups.append((tuple(int(r) for r in rows.tolist()), state_cls.from_dict(part)))
        extra = set(flat) - used
        if extra:
            raise StateError(f"ragged state dict has unknown entries {sorted(extra)}")
        return cls(tuple(groups), flat.get("__documents__"))


AnyState = State | RaggedState


def normalise(groups: Iterable[tuple[Sequence[int], State]], documents: Tensor | None = None) -> AnyState:
    """Groups of rows -> one group per position, rows ascending; a plain state (rows in
    order) when every row stands at one position and no document ids are kept."""
    by_pos: dict[int, list[tuple[Sequence[int], State]]] = {}
    for rows, s in groups:
        if len(rows):
            by_pos.setdefault(s.pos, []).append((tuple(rows), s))
    merged = []
    for pos in sorted(by_pos):
        parts = by_pos[pos]
        rows = [r for rs, _ in parts for r in rs]
        state = cat_rows([s for _, s in parts])
        order = sorted(range(len(rows)), key=rows.__getitem__)
        merged.append((tuple(rows[i] for i in order), select_rows(state, order)))
    merged.sort(key=lambda g: g[0][0])
    if len(merged) == 1 and documents is None:
        return merged[0][1]
    return RaggedState(tuple(merged), documents)


def as_groups(state: AnyState) -> list[tuple[tuple[int, ...], State]]:
    if isinstance(state, RaggedState):
        return list(state.groups)
    return [(tuple(range(state.batch_size)), state)]


def documents_of(state: AnyState | None, batch_size: int) -> Tensor:
    if isinstance(state, RaggedState) and state.documents is not None:
        return state.documents.cpu()
    return torch.full((batch_size,), NO_DOCUMENT, dtype=torch.long)


def gather(groups: Sequence[tuple[tuple[int, ...], State]], rows: Sequence[int]) -> State:
    """The state of ``rows`` (in that order; all at one position) from ``groups``."""
    parts = [_locate(groups, i) for i in rows]
    if len({id(s) for _, s, _ in parts}) == 1 and tuple(rows) == parts[0][0]:
        return parts[0][1]
    return cat_rows([select_rows(s, [j]) for _, s, j in parts])


def check_keep(keep: Any, batch_size: int) -> None:
    """``keep`` of :meth:`State.where`: a bool tensor (B,), else a ``StateError`` saying so."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (batch_size,):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
        raise StateError(f"keep must be a bool tensor of shape ({batch_size},), got {got}")


def where(state: AnyState, keep: Tensor, other: AnyState) -> AnyState:
    """Rows where ``keep`` (B,) is True from ``state``, the others from ``other``, at
    whatever positions either stands (e.g. ``state.where(keep, model.init_state(B))``)."""
    b = state.batch_size
    check_keep(keep, b)
    if other.batch_size != b:
        raise StateError(f"State.where: the other state has batch size {other.batch_size}, this one {b}")
    kinds = {(st.state_type if isinstance(st, RaggedState) else type(st), st.fingerprint) for st in (state, other)}
    if len(kinds) != 1:
        raise StateError("State.where needs two states of the same variant and config")
    if state.device != other.device or state.dtype != other.dtype:
        raise StateError(
            f"State.where: states differ in device/dtype ({state.device} {state.dtype} vs {other.device} {other.dtype})"
        )
    mine, theirs = as_groups(state), as_groups(other)
    flags = keep.tolist()
    rows = [(i, select_rows_of(mine if flags[i] else theirs, i)) for i in range(b)]
    docs = None
    if any(isinstance(st, RaggedState) and st.documents is not None for st in (state, other)):
        d_mine, d_theirs = documents_of(state, b), documents_of(other, b)
        docs = torch.where(keep.cpu(), d_mine, d_theirs)
    return carry_origin(state, normalise([((i,), s) for i, s in rows], docs))


def _locate(groups: Sequence[tuple[tuple[int, ...], State]], i: int) -> tuple[tuple[int, ...], State, int]:
    """The group holding batch row ``i``: its rows, its state and ``i``'s index in it."""
    for rows, s in groups:
        if i in rows:
            return rows, s, rows.index(i)
    raise IndexError(f"row {i} out of range for batch size {sum(len(rows) for rows, _ in groups)}")


def select_rows_of(groups: Sequence[tuple[tuple[int, ...], State]], i: int) -> State:
    _, s, j = _locate(groups, i)
    return select_rows(s, [j])


# ------------------------------------------------------------------ the inputs
def check_mask(mask: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    """A validated ``attention_mask`` as bool (B, T): 0/1 or bool, contiguous real tokens per row."""
    if not isinstance(mask, Tensor):
        raise InputError(f"attention_mask must be a tensor of shape (B, T) = {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise InputError(f"attention_mask must have the input's shape (B, T) = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise InputError(f"attention_mask is on {mask.device}, the input on {device}")
    if mask.dtype == torch.bool:
        real = mask
    elif mask.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError(f"attention_mask must hold 0 (padding) and 1 (real token) only, got values {mask.unique().tolist()}")
        real = mask.bool()
    else:
        raise InputError(f"attention_mask must be bool or an integer tensor of 0/1 (Hugging Face convention), got {mask.dtype}")
    counts = real.sum(dim=1)
    first = real.int().argmax(dim=1)
    cols = torch.arange(shape[1], device=device)
    span = (cols[None, :] >= first[:, None]) & (cols[None, :] < (first + counts)[:, None])
    bad = (span != real).any(dim=1)
    if bool(bad.any()):
        r = int(bad.int().argmax())
        raise InputError(
            f"attention_mask row {r} has padding between real tokens ({real[r].int().tolist()}); a row's real tokens must "
            "be contiguous (padding on the left and/or right). To pack several documents into a row, give "
            "document_ids instead."
        )
    return real


def check_documents(doc: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    if not isinstance(doc, Tensor):
        raise InputError(f"document_ids must be an integer tensor of shape (B, T) = {shape}, got {type(doc).__name__}")
    if tuple(doc.shape) != shape:
        raise InputError(f"document_ids must have the input's shape (B, T) = {shape}, got {tuple(doc.shape)}")
    if doc.device != device:
        raise InputError(f"document_ids are on {doc.device}, the input on {device}")
    if doc.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise InputError(f"document_ids must be an integer tensor (int64), got {doc.dtype}")
    if doc.numel() and int(doc.min()) < 0:
        raise InputError(f"document_ids must be >= 0, got min {int(doc.min())}")
    return doc.long()


@dataclass
class _Piece:
    """A row's next run of real tokens: columns ``[col, end)`` of the input, in one document."""

    col: int
    end: int
    doc: int
    new_document: bool


def _pieces(real: list[bool] | None, docs: list[int] | None, t: int, last_doc: int) -> list[_Piece]:
    if real is None:
        a, e = 0, t
    else:
        a = real.index(True) if True in real else 0
        e = a + sum(real)
    out: list[_Piece] = []
    col = a
    while col < e:
        if docs is None:
            out.append(_Piece(col, e, NO_DOCUMENT, False))
            break
        d = docs[col]
        end = col
        while end < e and docs[end] == d:
            end += 1
        prev = out[-1].doc if out else last_doc
        out.append(_Piece(col, end, d, prev != NO_DOCUMENT and prev != d))
        col = end
    return out


# ------------------------------------------------------------------ the forward
def forward(
    backbone: "Backbone", x: Tensor, state: AnyState | None, attention_mask: Tensor | None, document_ids: Tensor | None,
    *, step: Callable[[Tensor, State], tuple[Tensor, State]] | None = None, return_state: bool = True,
) -> tuple[Tensor, AnyState | None]:
    """A ragged call through ``backbone`` (validated ``x``): outputs (B, T, D) with zeros
    at padding, and the state after each row's real tokens. ``step``: the per-wave call
    (default: ``backbone.step``; the slow reference passes its own). ``return_state=False``
    (no state wanted, e.g. a training step that does not pass its state on): rows that
    start at one position run as **one** call, see :func:`_one_call`; the state is None."""
    run = step or backbone.step
    b, t = x.shape[0], x.shape[1]
    real = check_mask(attention_mask, (b, t), x.device) if attention_mask is not None else None
    docs = check_documents(document_ids, (b, t), x.device) if document_ids is not None else None
    if docs is None and not isinstance(state, RaggedState) and (real is None or bool(real.all())):
        # nothing is ragged: the plain call (no gather, no scatter)
        y, new_state = run(x, state if state is not None else backbone.init_state(b, device=x.device, dtype=x.dtype))
        return y, (new_state if return_state else None)
    if not return_state and docs is None:
        one = _one_call(backbone, run, x, state, real if real is not None else torch.ones(b, t, dtype=torch.bool, device=x.device))
        if one is not None:
            return one, None
    groups = as_groups(state if state is not None else backbone.init_state(b, device=x.device, dtype=x.dtype))
    # the groups' states take turns in the backbone (a padded batch decoding through forward,
    # as transformers' generate does): a per-state cache must keep one per group (xl's memo)
    backbone.expect_streams(len(groups))
    last = documents_of(state, b)
    real_rows = real.cpu().tolist() if real is not None else None
    doc_rows = docs.cpu().tolist() if docs is not None else None
    todo = [
        _pieces(real_rows[i] if real_rows else None, doc_rows[i] if doc_rows else None, t, int(last[i])) for i in range(b)
    ]
    # per row: (group index in `groups`) is found by `gather`; keep rows' states as groups
    cursor = [p[0].col if p else 0 for p in todo]  # next column of each row
    out_rows: list[Tensor] = []
    out_cols: list[Tensor] = []
    out_vals: list[Tensor] = []
    new_docs = last.clone()
    while True:
        active = [i for i in range(b) if todo[i]]
        if not active:
            break
        # rows starting a new document restart from the fresh state
        starting = [i for i in active if todo[i][0].new_document and cursor[i] == todo[i][0].col]
        if starting:
            fresh = backbone.init_state(len(starting), device=x.device, dtype=x.dtype)
            groups = _replace_rows(groups, starting, fresh)
            for i in starting:
                todo[i][0].new_document = False
        by_pos: dict[int, list[int]] = {}
        for i in active:
            by_pos.setdefault(_pos_of(groups, i), []).append(i)
        for pos, rows in by_pos.items():
            n = min(todo[i][0].end - cursor[i] for i in rows)
            sub = gather(groups, rows)
            index_r = torch.tensor(rows, device=x.device)
            cols = torch.tensor([cursor[i] for i in rows], device=x.device)[:, None] + torch.arange(n, device=x.device)
            xs = x[index_r[:, None], cols]  # (g, n, D)
            y, new = run(xs, sub)
            out_rows.append(index_r[:, None].expand(-1, n).reshape(-1))
            out_cols.append(cols.reshape(-1))
            out_vals.append(y.reshape(-1, y.shape[-1]))
            groups = _replace_rows(groups, rows, new)
            for i in rows:
                cursor[i] += n
                if todo[i][0].doc != NO_DOCUMENT:  # a call without ids continues the row's document
                    new_docs[i] = todo[i][0].doc
                if cursor[i] >= todo[i][0].end:
                    todo[i].pop(0)
                    if todo[i]:
                        cursor[i] = todo[i][0].col
    y_out = x.new_zeros(x.shape)
    if out_vals:
        y_out = y_out.index_put((torch.cat(out_rows), torch.cat(out_cols)), torch.cat(out_vals))
    documents = None
    if docs is not None or (isinstance(state, RaggedState) and state.documents is not None):
        documents = new_docs
    return y_out, (normalise(groups, documents) if return_state else None)


def _one_call(
    backbone: "Backbone", run: Callable[[Tensor, State], tuple[Tensor, State]], x: Tensor, state: AnyState | None,
    real: Tensor,
) -> Tensor | None:
    """The outputs of the rows that have real tokens in this call, in one call, when they
    all stand at one position (None otherwise): every row's real tokens are moved to the
    front of the row (left padding becomes right padding), those rows run as they are, and
    the outputs go back to the real tokens' columns.

    Exact because every variant is causal (the conformance kit checks it for each one):
    what comes after a row's last real token never reaches the outputs before it. Only
    the final state would be wrong, for the rows shorter than the call, which is why this
    path hands none back."""
    b = x.shape[0]
    counts = real.sum(dim=1)
    busy = [i for i, n in enumerate(counts.tolist()) if n]
    if not busy:
        return x.new_zeros(x.shape)
    groups = as_groups(state if state is not None else backbone.init_state(b, device=x.device, dtype=x.dtype))
    if len({_pos_of(groups, i) for i in busy}) != 1:
        return None
    rows = torch.tensor(busy, device=x.device)
    sub_real = real.index_select(0, rows)
    aligned = torch.arange(x.shape[1], device=x.device)[None, :] < counts.index_select(0, rows)[:, None]  # real tokens, at the front
    moved = x.new_zeros((len(busy), *x.shape[1:])).index_put((aligned,), x.index_select(0, rows)[sub_real])
    y, _ = run(moved, gather(groups, busy))
    placed = x.new_zeros(moved.shape).index_put((sub_real,), y[aligned])
    return x.new_zeros(x.shape).index_copy(0, rows, placed)


def _pos_of(groups: Sequence[tuple[tuple[int, ...], State]], i: int) -> int:
    return _locate(groups, i)[1].pos


def _replace_rows(
    groups: list[tuple[tuple[int, ...], State]], rows: Sequence[int], new: State
) -> list[tuple[tuple[int, ...], State]]:
    """``groups`` with ``rows`` taken out of their groups and held by ``new`` (in that order)."""
    taken = set(rows)
    out: list[tuple[tuple[int, ...], State]] = []
    for g_rows, s in groups:
        keep = [j for j, r in enumerate(g_rows) if r not in taken]
        if len(keep) == len(g_rows):
            out.append((g_rows, s))
        elif keep:
            out.append((tuple(g_rows[j] for j in keep), select_rows(s, keep)))
    out.append((tuple(rows), new))
    return out
