"""Variable-length batches (issue #11): the RaggedState API, input validation, and the
conformance kit rejecting variants that break what ragged batches need of them.

The property itself (each padded row / packed document == run alone, chunked, continued;
outputs, states and gradients) runs for every registered case in
``tests/test_conformance.py``; here the API around it, generated from the registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import memzoo
from memzoo import testing as kit
from memzoo.config import VariantConfig
from memzoo.errors import InputError, StateError
from memzoo.ragged import NO_DOCUMENT, RaggedState
from memzoo.registry import register_variant, unregister_variant
from memzoo.state import CHECKSUM_KEY, State, load_state, save_state
from memzoo.variants.base import Backbone

VARIANTS = memzoo.list_variants()
#: variants keeping a slow reference step beside their fast one
WITH_REFERENCE = [n for n in VARIANTS if hasattr(memzoo.get_variant(n).cls, "step_reference")]

#: rows of 7 columns: all real, right-padded (3), both sides (2:6), left-padded (5:7)
SPANS = [(0, 7), (0, 3), (2, 6), (5, 7)]


def first_options(name: str) -> dict:
    return dict(memzoo.get_variant(name).config.conformance_options[0])


def model_of(name: str, **overrides) -> memzoo.MemzooLM:
    return kit.tiny_model(name, first_options(name), **overrides)


def ragged(model, spans=SPANS, width: int = 7, seed: int = 0):
    """A padded batch and the ragged state after it."""
    tokens, mask = kit.padded_batch(model, spans, width, seed)
    with torch.no_grad():
        _, state = model(tokens, attention_mask=mask)
    return tokens, mask, state


def alone_state(model, tokens: Tensor, span: tuple[int, int]) -> State:
    a, e = span
    if e == a:
        return model.init_state(1)
    with torch.no_grad():
        return model(tokens[:, a:e]).state


# ------------------------------------------------------------------ RaggedState
@pytest.mark.parametrize("name", VARIANTS)
def test_rows_at_different_positions_make_a_ragged_state(name):
    model = model_of(name)
    tokens, _, state = ragged(model)
    assert isinstance(state, RaggedState) and state.documents is None
    assert state.positions.tolist() == [e - a for a, e in SPANS]
    assert state.batch_size == len(SPANS) and state.variant == name
    for i, span in enumerate(SPANS):
        kit.assert_states_equal(state.row(i), alone_state(model, tokens[i : i + 1], span), f"row {i}")
    assert len(state.rows()) == len(SPANS)
    with pytest.raises(IndexError, match="out of range"):
        state.row(len(SPANS))
    assert state.nbytes == sum(s.nbytes for s in state.rows())
    same = state.map(lambda t: t.clone())
    kit.assert_any_states_equal(same, state, "mapped")
    assert all(not t.requires_grad for t in state.detach().tensors())


@pytest.mark.parametrize("name", VARIANTS)
def test_where_resets_rows_at_different_positions(name):
    """``state.where(keep, model.init_state(B))``: the reset rows start afresh, the
    others go on from where they stand, and a next call continues each row as alone."""
    model = model_of(name)
    tokens, _, state = ragged(model)
    keep = torch.tensor([True, False, True, False])
    reset = state.where(keep, model.init_state(len(SPANS)))
    assert reset.positions.tolist() == [7, 0, 4, 0]
    fresh = model.init_state(1)
    expected = [state.row(0), fresh, state.row(2), fresh]
    kit.assert_rows_equal(reset, expected, "after where")
    nxt = kit.random_tokens(model, len(SPANS), 3, seed=5)
    with torch.no_grad():
        logits, after = model(nxt, reset)
        for i, row_state in enumerate(expected):
            row_logits, row_after = model(nxt[i : i + 1], row_state)
            kit.assert_close(logits[i], row_logits[0], f"row {i} continued after where")
            kit.assert_states_equal(kit.state_row(after, i), row_after, f"row {i} state continued after where")
    # every row from the other (ragged) side, and the other way round
    kit.assert_any_states_equal(reset.where(torch.zeros(4, dtype=torch.bool), state), state, "all rows from other")
    everything_fresh = state.where(torch.zeros(4, dtype=torch.bool), model.init_state(4))
    assert isinstance(everything_fresh, model.backbone.State) and everything_fresh.pos == 0  # plain again
    # a plain state's where with a state at another position gives a ragged one
    with torch.no_grad():
        _, plain = model(tokens[:, :2])
    mixed = plain.where(keep, model.init_state(4))
    assert isinstance(mixed, RaggedState) and mixed.positions.tolist() == [2, 0, 2, 0]
    with pytest.raises(StateError, match=r"bool tensor of shape \(4,\)"):
        state.where(keep.float(), model.init_state(4))
    with pytest.raises(StateError, match="batch size"):
        state.where(keep, model.init_state(3))


@pytest.mark.parametrize("name", VARIANTS)
def test_a_ragged_state_saves_and_loads_checked(name, tmp_path: Path):
    model = model_of(name)
    tokens, mask = kit.padded_batch(model, SPANS, 7)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2]] * len(SPANS))
    with torch.no_grad():
        _, state = model(tokens, attention_mask=mask, document_ids=docs)
    assert isinstance(state, RaggedState) and state.documents.tolist() == [2, 1, 2, 2]
    assert state.positions.tolist() == [2, 1, 1, 2]  # in each row's last document
    path = tmp_path / "ragged.safetensors"
    save_state(state, path)
    loaded = load_state(path, model=model)
    assert isinstance(loaded, RaggedState)
    kit.assert_any_states_equal(loaded, state, "loaded ragged state")
    again = RaggedState.from_dict(state.to_dict(), model.backbone.State)
    kit.assert_any_states_equal(again, state, "to_dict/from_dict")
    nxt = kit.random_tokens(model, len(SPANS), 3, seed=2)
    with torch.no_grad():
        kit.assert_close(model(nxt, loaded).logits, model(nxt, state).logits, "continued from the loaded state")

    # a hand-edited file (rows of two groups swapped) is refused by its checksum
    flat = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = {CHECKSUM_KEY: f.metadata()[CHECKSUM_KEY]}
    flat["__documents__"] = flat["__documents__"].flip(0)
    save_file(flat, path, metadata=meta)
    with pytest.raises(StateError, match="checksum"):
        load_state(path, model=model)

    # another config refused
    other = kit.tiny_model(name, first_options(name), d_ff=(model.backbone.d_ff or 0) + 2)
    save_state(state, path)
    with pytest.raises(StateError, match="another config"):
        load_state(path, model=other)


@pytest.mark.parametrize("name", VARIANTS)
def test_groups_must_partition_the_rows(name):
    model = model_of(name)
    _, _, state = ragged(model)
    (rows0, s0), (rows1, s1), *rest = state.groups
    with pytest.raises(StateError, match="partition the rows"):
        RaggedState(((rows0, s0), (rows0, s0), *rest))  # a row twice, another missing
    with pytest.raises(StateError, match="partition the rows"):
        RaggedState((((1,), kit.state_row(s0, 0)),))  # row 0 missing
    with pytest.raises(StateError, match="batch size"):
        RaggedState(((rows0 + rows1, s0), *rest))  # a group's state smaller than its rows
    with pytest.raises(StateError, match="at least one group"):
        RaggedState(())
    flat = state.to_dict()
    flat["__rows__.1"] = flat["__rows__.0"].clone()
    with pytest.raises(StateError, match="partition the rows"):
        RaggedState.from_dict(flat, model.backbone.State)
    with pytest.raises(StateError, match="int64 tensor of shape"):
        RaggedState(state.groups, torch.zeros(len(SPANS)))  # float document ids
    with pytest.raises(StateError, match=f">= {NO_DOCUMENT}"):
        RaggedState(state.groups, torch.full((len(SPANS),), -2))


@pytest.mark.parametrize("name", VARIANTS)
def test_carry_applies_per_group(name):
    """``backbone.carry`` on a ragged state: each row carried as ``carry_state`` carries it alone."""
    model = model_of(name)
    _, _, state = ragged(model)
    carried = model.backbone.carry(state)
    assert carried.batch_size == len(SPANS)
    for i in range(len(SPANS)):
        kit.assert_states_equal(kit.state_row(carried, i), model.backbone.carry_state(state.row(i)), f"row {i} carried")


@pytest.mark.parametrize("name", VARIANTS)
def test_check_state_refuses_a_ragged_state_of_another_config(name):
    model = model_of(name)
    other = kit.tiny_model(name, first_options(name), d_ff=(model.backbone.d_ff or 0) + 2)
    tokens, mask, foreign = ragged(other)
    with pytest.raises(StateError, match="another config"):
        model(tokens, foreign, attention_mask=mask)
    with pytest.raises(StateError, match="another config"):
        model.backbone.check_state(foreign, batch_size=len(SPANS), device=torch.device("cpu"), dtype=torch.float64)
    _, _, mine = ragged(model)
    with pytest.raises(StateError, match="batch size"):
        model(tokens[:2], mine)


# ----------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("name", VARIANTS)
def test_bad_masks_are_refused(name):
    model = model_of(name)
    tokens = kit.random_tokens(model, 2, 5)
    ones = torch.ones(2, 5, dtype=torch.long)
    holed = ones.clone()
    holed[1, 2] = 0
    cases = [
        (holed, ["row 1", "contiguous", "document_ids"]),
        (ones * 2, ["0 (padding) and 1 (real token)", "[2]"]),
        (ones.float(), ["bool or an integer", "float32"]),
        (ones[:, :4], ["(B, T) = (2, 5)", "(2, 4)"]),
        (ones.tolist(), ["tensor", "list"]),
    ]
    for mask, words in cases:
        for call in (lambda: model(tokens, attention_mask=mask),
                     lambda: model.backbone(model.embed(tokens), attention_mask=mask)):
            with pytest.raises(InputError) as err:
                call()
            assert all(w in str(err.value) for w in words), (str(err.value), words)


@pytest.mark.parametrize("name", VARIANTS)
def test_ids_at_padding_are_not_read(name):
    """Pads may hold any id (-100 as in labels, vocab_size): they are never embedded."""
    model = model_of(name)
    tokens, mask = kit.padded_batch(model, SPANS, 7)
    with torch.no_grad():
        logits, state = model(tokens, attention_mask=mask)
        for pad in (-100, model.vocab_size, 0):
            odd, odd_state = model(tokens.masked_fill(~mask.bool(), pad), attention_mask=mask)
            assert torch.equal(odd, logits), pad
            kit.assert_any_states_equal(odd_state, state, f"state with pad id {pad}")
    with pytest.raises(InputError, match=rf"\[0, {model.vocab_size - 1}\]"):
        model(tokens.masked_fill(~mask.bool(), -100))  # without the mask they are real tokens


@pytest.mark.parametrize("name", VARIANTS)
def test_bad_document_ids_are_refused(name):
    model = model_of(name)
    tokens = kit.random_tokens(model, 2, 5)
    zeros = torch.zeros(2, 5, dtype=torch.long)
    cases = [
        (zeros - 1, [">= 0", "-1"]),
        (zeros.float(), ["integer", "float32"]),
        (zeros.bool(), ["integer", "bool"]),
        (zeros[:, :3], ["(B, T) = (2, 5)", "(2, 3)"]),
    ]
    for docs, words in cases:
        with pytest.raises(InputError) as err:
            model(tokens, document_ids=docs)
        assert all(w in str(err.value) for w in words), (str(err.value), words)


@pytest.mark.parametrize("name", VARIANTS)
def test_model_level_documents_equal_each_document_alone(name):
    """``model(tokens, document_ids=..., attention_mask=...)``: logits of each document ==
    that document's tokens run alone (the kit checks the backbone level with gradients)."""
    model = model_of(name)
    tokens, mask = kit.padded_batch(model, SPANS, 7)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2]] * len(SPANS))
    with torch.no_grad():
        for extra in ({"document_ids": docs}, {"document_ids": docs, "attention_mask": mask}):
            logits, _ = model(tokens, **extra)
            spans = kit.row_spans(extra.get("attention_mask", torch.ones(len(SPANS), 7)))
            for i, row in enumerate(kit.documents_of_rows(docs, spans)):
                for a, e, d in row:
                    kit.assert_close(logits[i, a:e], model(tokens[i : i + 1, a:e]).logits[0], f"row {i} document {d}")


# --------------------------------------------------------------- the reference
@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_forward_reference_with_a_mask_equals_forward(name):
    """The slow reference step through the same ragged machinery: outputs, state, gradients."""
    model = model_of(name)
    backbone = model.backbone
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(SPANS), 7, backbone.d_model, generator=gen, dtype=torch.float64)
    _, mask = kit.padded_batch(model, SPANS, 7)
    docs = torch.tensor([[0, 0, 1, 1, 1, 2, 2]] * len(SPANS))
    for extra in ({"attention_mask": mask}, {"attention_mask": mask, "document_ids": docs}):
        y, state = backbone(x, **extra)
        y_ref, state_ref = backbone.forward_reference(x, **extra)
        kit.assert_close(y.detach(), y_ref.detach(), f"outputs with {sorted(extra)} vs forward_reference")
        kit.assert_any_states_equal(state, state_ref, f"state with {sorted(extra)} vs forward_reference")
        params = [p for p in backbone.parameters() if p.requires_grad]
        g = torch.autograd.grad(y.sum(), params, allow_unused=True)
        g_ref = torch.autograd.grad(y_ref.sum(), params, allow_unused=True)
        for i, (a, b) in enumerate(zip(g, g_ref)):
            if a is None or b is None:
                assert a is None and b is None
            else:
                kit.assert_close(a, b, f"grad of parameter {i} vs forward_reference")


def test_forward_reference_needs_a_reference_step():
    without = [n for n in VARIANTS if n not in WITH_REFERENCE]
    if not without:
        pytest.skip("every registered variant keeps a step_reference")
    backbone = model_of(without[0]).backbone
    with pytest.raises(NotImplementedError, match="no step_reference"):
        backbone.forward_reference(torch.zeros(1, 2, backbone.d_model, dtype=torch.float64))


# ------------------------------------------------- the kit rejects broken variants
class ToyConfig(VariantConfig):
    """Toy variants for the kit's own tests: no fields."""


@dataclass
class RunningSumState(State):
    """``total``: (B, D) the running sum; ``scale``: (1, D), deliberately not batch-first."""

    total: Tensor
    scale: Tensor


class RunningSum(Backbone):
    """y = proj(running sum of x) * scale: streams exactly (chunked == whole), but keeps a
    state tensor without the batch on dim 0."""

    State = RunningSumState

    def build(self) -> None:
        self.proj = nn.Linear(self.d_model, self.d_model)

    def empty_state(self, batch_size, device, dtype):
        return self.State(pos=0, fingerprint=self.fingerprint, total=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
                          scale=torch.ones(1, self.d_model, device=device, dtype=dtype))

    def total_after(self, x: Tensor, state) -> Tensor:
        return state.total[:, None] + x.cumsum(1)

    def step(self, x, state):
        c = self.total_after(x, state)
        new = self.State(pos=state.pos + x.shape[1], fingerprint=self.fingerprint, total=c[:, -1], scale=state.scale)
        return self.proj(c) * state.scale, new


@dataclass
class LeakyState(State):
    total: Tensor


class Leaky(RunningSum):
    """Batch-first, but its rows see each other (the batch mean leaks into every row)."""

    State = LeakyState

    def empty_state(self, batch_size, device, dtype):
        return self.State(pos=0, fingerprint=self.fingerprint, total=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def step(self, x, state):
        c = state.total[:, None] + (x + x.mean(0, keepdim=True)).cumsum(1)
        return self.proj(c), self.State(pos=state.pos + x.shape[1], fingerprint=self.fingerprint, total=c[:, -1])


@dataclass
class SingleRowState(State):
    total: Tensor


class FailsOnOneRow(Leaky):
    """Row-independent, but raises when a call holds a single row (as a state whose batch
    dim is not where ragged calls cut would)."""

    State = SingleRowState

    def step(self, x, state):
        if x.shape[0] == 1:
            raise RuntimeError("shape '[1, 16]' is invalid for this state")
        c = state.total[:, None] + x.cumsum(1)
        return self.proj(c), self.State(pos=state.pos + x.shape[1], fingerprint=self.fingerprint, total=c[:, -1])


@dataclass
class HeadsFirstState(State):
    """``heads``: (H, B, D), heads-first: right-sized by chance when B == H."""

    heads: Tensor


class HeadsFirst(RunningSum):
    """Streams exactly, with a state field whose first dim is the head count, not the batch."""

    State = HeadsFirstState

    def empty_state(self, batch_size, device, dtype):
        return self.State(pos=0, fingerprint=self.fingerprint,
                          heads=torch.zeros(self.n_heads, batch_size, self.d_model, device=device, dtype=dtype))

    def step(self, x, state):
        c = state.heads[0][:, None] + x.cumsum(1)
        heads = c[:, -1].expand(self.n_heads, -1, -1).clone()
        return self.proj(c), self.State(pos=state.pos + x.shape[1], fingerprint=self.fingerprint, heads=heads)


@dataclass
class PerLayerState(State):
    totals: list[Tensor]


class NoStateShapes(RunningSum):
    """A running sum per layer, without ``expected_state_shapes``: a state missing a
    layer crashes inside ``step`` instead of being refused."""

    State = PerLayerState

    def empty_state(self, batch_size, device, dtype):
        zeros = [torch.zeros(batch_size, self.d_model, device=device, dtype=dtype) for _ in range(self.n_layers)]
        return self.State(pos=0, fingerprint=self.fingerprint, totals=zeros)

    def step(self, x, state):
        totals = []
        for i in range(self.n_layers):
            x = state.totals[i][:, None] + x.cumsum(1)
            totals.append(x[:, -1])
        return self.proj(x), self.State(pos=state.pos + x.shape[1], fingerprint=self.fingerprint, totals=totals)


@pytest.fixture
def toy():
    """Register the toy variants for one test, and forget them after (the registry is shared)."""
    names = {"zz_not_batch_first": RunningSum, "zz_leaky_rows": Leaky, "zz_fails_on_one_row": FailsOnOneRow,
             "zz_heads_first": HeadsFirst, "zz_no_state_shapes": NoStateShapes}
    for name, cls in names.items():
        register_variant(name, config=ToyConfig)(cls)
    try:
        yield lambda name: kit.tiny_model(name)
    finally:
        for name in names:
            unregister_variant(name)
    assert not set(names) & set(memzoo.list_variants())


def test_the_kit_rejects_a_state_that_is_not_batch_first(toy):
    model = toy("zz_not_batch_first")
    tokens = kit.random_tokens(model, 2, 9)
    kit.check_state_equivalence(model, tokens, [3, 4])  # plain streaming is fine
    tokens, mask = kit.padded_batch(model, [(0, 5), (2, 9)], 9)
    with pytest.raises(AssertionError) as err:
        kit.check_padded_rows(model, tokens, mask)
    msg = str(err.value)
    assert msg.startswith("zz_not_batch_first: the fresh state of a batch of 2: field 'scale' has shape (1, 16)"), msg
    for words in ("not batch-first", "select_rows"):
        assert words in msg, msg
    with pytest.raises(AssertionError, match="zz_not_batch_first: .*'scale'.*not batch-first"):
        kit.check_packed_rows(model, torch.tensor([[0, 0, 1], [1, 1, 1]]))


def test_the_kit_names_row_and_max_error_when_rows_see_each_other(toy):
    model = toy("zz_leaky_rows")
    kit.check_state_equivalence(model, kit.random_tokens(model, 2, 9), [3, 4])  # chunking alone does not show it
    tokens, mask = kit.padded_batch(model, [(0, 4), (0, 4)], 5)
    with pytest.raises(AssertionError) as err:
        kit.check_padded_rows(model, tokens, mask)
    msg = str(err.value)
    assert msg.startswith("zz_leaky_rows: padded batch"), msg
    assert "row 0 logits at its real tokens vs the row alone: max abs difference" in msg, msg
    with pytest.raises(AssertionError, match=r"zz_leaky_rows: packed batch.*row 0 document 0 .*max abs difference"):
        kit.check_packed_rows(model, torch.tensor([[0, 0, 0], [0, 0, 0]]))


def test_the_kit_turns_an_exception_into_a_readable_failure(toy):
    model = toy("zz_fails_on_one_row")
    tokens, mask = kit.padded_batch(model, [(0, 2), (0, 4)], 4)
    with pytest.raises(AssertionError) as err:
        kit.check_padded_rows(model, tokens, mask)
    msg = str(err.value)
    assert msg.startswith("zz_fails_on_one_row: padded batch, rows real at columns ['0:2', '0:4'] of 4 raised RuntimeError"), msg
    assert "is invalid for this state" in msg and "batch-first" in msg, msg


def test_a_call_without_document_ids_continues_each_rows_document() -> None:
    """After packed rows, a call with only a mask (or nothing) continues every row's last
    document: the ids the state keeps stay, so a later call with the same id continues
    too and a new id starts afresh."""
    model = memzoo.build_model("bswa", vocab_size=23, d_model=16, n_heads=2, block_size=4, memory_blocks=1).double()
    tokens = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    _, state = model(tokens, document_ids=torch.tensor([[0, 0, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5]]))
    _, state = model(tokens[:, :3], state, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert state.documents.tolist() == [1, 5]
    _, state = model(tokens[:, :2], state, document_ids=torch.tensor([[1, 1], [6, 6]]))
    assert state.positions.tolist() == [9, 2] and state.documents.tolist() == [1, 6]


def test_the_kit_finds_a_heads_first_field_when_the_batch_equals_the_heads(toy):
    """At B == H a heads-first field has the right first dim by chance; the kit also checks
    a batch size no dimension of the state has, and names the field."""
    model = toy("zz_heads_first")
    assert model.backbone.n_heads == 2
    with pytest.raises(AssertionError, match=r"zz_heads_first: the fresh state of a batch of 3: field 'heads' has shape \(2, 3, 16\)"):
        kit.check_state_is_batch_first(model, 2)


def test_a_variant_without_state_shapes_fails_the_kit_with_a_pointer(toy):
    """A state missing a layer that crashes the variant (no expected_state_shapes) is an
    AssertionError naming the check, what was expected and where the refusal comes from."""
    model = toy("zz_no_state_shapes")
    with pytest.raises(AssertionError) as err:
        kit.check_bad_inputs(model)
    msg = str(err.value)
    for words in ("state missing a layer: expected a StateError", "got IndexError", "expected_state_shapes(pos, batch_size)"):
        assert words in msg, msg
