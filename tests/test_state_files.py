"""Issue #14 item 6: a loaded state is checked (checksum, position, metadata,
finite values, shapes for its position against a model); anything else is refused
with a StateError naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import memzoo
from memzoo.errors import StateError
from memzoo.state import CHECKSUM_KEY, check_state_for, checksum, load_state, save_state

torch.set_num_threads(1)
SIZES = dict(vocab_size=20, d_model=16, n_layers=2, n_heads=2, block_size=4)
#: every registered variant at its first conformance setting (small, block_size 4)
OPTIONS = {name: dict(memzoo.get_variant(name).config.conformance_options[0]) for name in memzoo.list_variants()}
VARIANTS = sorted(OPTIONS)


def model_and_state(name: str, length: int = 10):
    torch.manual_seed(0)
    model = memzoo.build_model(name, **SIZES, **OPTIONS.get(name, {}))
    with torch.no_grad():
        _, state = model(torch.randint(0, 20, (2, length)))
    return model, state


def states_equal(a, b) -> bool:
    fa, fb = a.to_dict(), b.to_dict()
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_saved_state_loads_back_checked_against_the_model(name: str, tmp_path: Path) -> None:
    model, state = model_and_state(name)
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    loaded = load_state(path, model=model)
    assert states_equal(loaded, state)
    other = memzoo.build_model(name, **{**SIZES, "d_ff": 8}, **OPTIONS.get(name, {}))
    with pytest.raises(StateError, match="another config"):
        load_state(path, model=other)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_hand_edited_position_is_refused(name: str, tmp_path: Path) -> None:
    """The issue's case: a state at position 10 edited to 14 (for bswa and fam the shapes
    are the same at both positions, so only the checksum shows it)."""
    model, state = model_and_state(name, 10)
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    flat = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = {CHECKSUM_KEY: f.metadata()[CHECKSUM_KEY]}
    flat["__pos__"] = torch.tensor(14)
    save_file(flat, path, metadata=meta)
    with pytest.raises(StateError, match="checksum"):
        load_state(path, model=model)
    save_file(flat, path)  # no checksum at all
    with pytest.raises(StateError, match="no checksum"):
        load_state(path)


@pytest.mark.parametrize("name", VARIANTS)
def test_position_and_shapes_must_agree_for_the_model(name: str) -> None:
    model, state = model_and_state(name, 10)
    check_state_for(model, state)
    shapes = model.backbone.expected_state_shapes
    moved_to = next((p for p in range(11, 40) if shapes(p, 2) != shapes(10, 2)), None)
    if moved_to is None:
        pytest.skip(f"{name}'s state shapes do not depend on the position")
    moved = type(state).from_dict(dict(state.to_dict(), __pos__=torch.tensor(moved_to)))
    with pytest.raises(StateError, match="malformed state"):
        check_state_for(model, moved)


@pytest.mark.parametrize(
    "entry, value, match",
    [
        ("__pos__", torch.tensor(10.7), "__pos__.*int64 scalar"),
        ("__pos__", torch.tensor(10, dtype=torch.int32), "__pos__.*int64 scalar"),
        ("__pos__", torch.tensor([10]), "__pos__.*int64 scalar"),
        ("__pos__", torch.tensor(-1), r"__pos__.*must lie in \[0, "),
        ("__pos__", torch.tensor(2**62), r"__pos__.*must lie in \[0, "),
        ("__variant__", torch.tensor([0xFF, 0xFE], dtype=torch.uint8), "__variant__.*UTF-8"),
        ("__fingerprint__", torch.tensor([0xC3], dtype=torch.uint8), "__fingerprint__.*UTF-8"),
        ("__fingerprint__", torch.tensor(list(b"nope"), dtype=torch.uint8), "__fingerprint__.*JSON"),
        ("__variant__", torch.tensor([1.0]), "__variant__.*uint8"),
        ("__fingerprint__", torch.tensor(list(b"[1, 2]"), dtype=torch.uint8), "__fingerprint__.*JSON object"),
        ("__fingerprint__", torch.tensor(list(b'"bswa"'), dtype=torch.uint8), "__fingerprint__.*JSON object"),
    ],
)
@pytest.mark.parametrize("name", VARIANTS)
def test_bad_metadata_is_refused_naming_the_entry(name: str, entry: str, value: torch.Tensor, match: str) -> None:
    _, state = model_and_state(name)
    with pytest.raises(StateError, match=match):
        type(state).from_dict(dict(state.to_dict(), **{entry: value}))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state_values_are_refused(name: str, bad: float) -> None:
    _, state = model_and_state(name)
    flat = state.to_dict()
    entry = next(k for k, v in flat.items() if not k.startswith("__") and v.is_floating_point() and v.numel())
    t = flat[entry].clone()
    t.view(-1)[-1] = bad
    with pytest.raises(StateError, match=rf"'{entry}'.*non-finite"):
        type(state).from_dict(dict(flat, **{entry: t}))


def test_unreadable_files_are_state_errors(tmp_path: Path) -> None:
    for content in (b"", b"not a safetensors file", b"\xff" * 64):
        p = tmp_path / "x.safetensors"
        p.write_bytes(content)
        with pytest.raises(StateError, match="x.safetensors"):
            load_state(p)
    with pytest.raises(StateError, match="missing.safetensors"):
        load_state(tmp_path / "missing.safetensors")


@settings(max_examples=25)
@given(data=st.data())
def test_fuzz_mutated_state_files_are_refused_or_unchanged(data, tmp_path_factory) -> None:
    """Any truncated or byte-flipped state file: a StateError, or exactly the saved state."""
    name = data.draw(st.sampled_from(VARIANTS))
    model, state = _CACHE.get(name) or _CACHE.setdefault(name, model_and_state(name))
    path = tmp_path_factory.mktemp("fuzz") / "s.safetensors"
    save_state(state, path)
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:cut]
    else:
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    try:
        loaded = load_state(path, model=model)
    except StateError:
        return
    assert states_equal(loaded, state)


_CACHE: dict = {}


@pytest.mark.parametrize(
    "field, edit, match",
    [
        ("residual", lambda s: s.residual.fill_(0.5), "'residual' must be 0 or 1"),
        ("offset", lambda s: s.offset.fill_(-3), "'offset' must be int64"),
        ("fam_k", lambda s: s.fam_k[1].zero_(), r"'fam_k\[1\]' does not match"),
        ("fam_v", lambda s: s.fam_v[0].mul_(2), r"'fam_v\[0\]' does not match"),
    ],
)
def test_fam_state_values_are_checked_against_the_model(field: str, edit, match: str) -> None:
    """The issue's FAM cases (residual 0.5, a negative offset, zeroed or scaled FAM
    keys/values): shapes are right, only the values are impossible. A state the model
    made passes the same check."""
    model, state = model_and_state("fam", 10)
    check_state_for(model, state)
    bad = state.map(torch.clone)
    edit(bad)
    with pytest.raises(StateError, match=match):
        check_state_for(model, bad)


def test_a_fingerprint_written_as_other_text_is_named_as_such() -> None:
    """The right fields with other whitespace: the error says so instead of listing no field."""
    import dataclasses
    import json

    model, state = model_and_state("bswa")
    spaced = dataclasses.replace(state, fingerprint=json.dumps(json.loads(state.fingerprint), indent=1))
    with pytest.raises(StateError, match="the same fields written as other text"):
        model(torch.zeros(2, 3, dtype=torch.long), state=spaced)


def test_where_refuses_a_keep_that_is_not_a_tensor() -> None:
    model, state = model_and_state("bswa")
    with torch.no_grad():
        _, other = model(torch.randint(0, 20, (2, 10)))
    for against in (other, model.init_state(2)):  # the same position, and another
        with pytest.raises(StateError, match=r"keep must be a bool tensor of shape \(2,\), got list"):
            state.where([True, False], against)


def _ragged_file(tmp_path: Path, edit) -> Path:
    model = memzoo.build_model("bswa", **SIZES, **OPTIONS["bswa"])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        _, state = model(torch.randint(0, 20, (2, 6)), attention_mask=mask)
    path = tmp_path / "r.safetensors"
    save_state(state, path)
    flat = edit(load_file(path))
    save_file(flat, path, metadata={CHECKSUM_KEY: checksum(flat)})
    return path


def test_a_ragged_file_with_a_group_variant_or_an_empty_group_is_refused(tmp_path: Path) -> None:
    """Nothing in a file is dropped: a group's own ``__variant__`` (never written) and a
    group of no rows are refused, not ignored."""
    from memzoo.state import _encode

    path = _ragged_file(tmp_path, lambda f: {**f, "0/__variant__": _encode("full")})
    with pytest.raises(StateError, match="unknown entries.*0/__variant__"):
        load_state(path)
    path = _ragged_file(tmp_path, lambda f: {**f, "__rows__.1": torch.zeros(0, dtype=torch.int64)})
    with pytest.raises(StateError, match="__rows__.1.*at least one"):
        load_state(path)


def test_a_state_from_generate_keeps_its_model_through_detach_to_and_where() -> None:
    """docs/generation.md: a state generate() handed back is refused by another model
    instance; so are the states made from it by detach, to and where."""
    model, _ = model_and_state("bswa")
    other, _ = model_and_state("bswa")
    prompt = torch.randint(0, 20, (2, 5))
    _, state = model.generate(prompt, 3, return_state=True)
    keep = torch.tensor([True, False])
    for derived in (state.detach(), state.to("cpu"), state.to(torch.float32), state.where(keep, state)):
        with pytest.raises(StateError, match="another model"):
            other.generate(prompt[:, :1], 2, state=derived)
        model.generate(prompt[:, :1], 2, state=derived)  # its own model continues it


def test_a_compiled_first_call_holds_a_state_to_its_field_dtypes() -> None:
    """The field dtypes are read when the model is built, so a model whose first call is
    compiled refuses a state with fam's int64 offsets stored as floats too (a first
    version read them lazily and skipped the check while Dynamo traced)."""
    import dataclasses

    model = memzoo.build_model("fam", **SIZES, **OPTIONS["fam"])  # has never made a state
    _, state = model_and_state("fam")  # another instance's, same config
    bad = dataclasses.replace(state, offset=state.offset.float())
    compiled = torch.compile(lambda m, t, s: m(t, state=s), backend="eager")
    with pytest.raises(StateError, match="offset has dtype torch.float32, expected torch.int64"):
        compiled(model, torch.randint(0, 20, (2, 2)), bad)


def test_init_state_refuses_a_non_floating_dtype() -> None:
    model, _ = model_and_state("xl")
    with pytest.raises(memzoo.InputError, match="dtype must be a floating torch.dtype"):
        model.init_state(2, dtype=torch.int64)
    model(torch.zeros(2, 2, dtype=torch.long), state=model.init_state(2))  # nothing kept from the refused call


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_loading_states_in_a_loop_does_not_grow_memory(tmp_path: Path) -> None:
    """A server that reloads states (one per request) must not grow: safetensors'
    ``safe_open(...).get_tensor`` keeps ~64 bytes per tensor it hands out (0.8.0), so
    load_state reads the bytes instead. 4000 loads of a 19-entry file leaked ~4.8 MB."""
    import ctypes
    import gc

    def rss_kb() -> int:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so only what is held counts
        except OSError:
            pass
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    torch.manual_seed(0)
    model = memzoo.build_model("bswa", **{**SIZES, "n_layers": 8}, memory_blocks=1)
    with torch.no_grad():
        _, state = model(torch.randint(0, 20, (1, 6)))
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    for _ in range(300):  # warm up the allocator
        load_state(path)
    before = rss_kb()
    for _ in range(4000):
        load_state(path)
    grown = rss_kb() - before
    assert grown < 1200, f"4000 loads grew the resident set by {grown} kB"
