"""Issue #14 item 6: a loaded state is checked (checksum, position, metadata,
finite values, shapes for its position against a model); anything else is refused
with a StateError naming the entry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import memzoo
from memzoo.errors import StateError
from memzoo.state import CHECKSUM_KEY, check_state_for, load_state, save_state

torch.set_num_threads(1)
SIZES = dict(vocab_size=20, d_model=16, n_layers=2, n_heads=2, block_size=4)
OPTIONS = {"bswa": {"memory_blocks": 1}, "fam": {"memory_blocks": 1, "fam_len": 2}, "xl": {"memory_len": 4}}


def model_and_state(name: str, length: int = 10):
    torch.manual_seed(0)
    model = memzoo.build_model(name, **SIZES, **OPTIONS.get(name, {}))
    with torch.no_grad():
        _, state = model(torch.randint(0, 20, (2, length)))
    return model, state


def states_equal(a, b) -> bool:
    fa, fb = a.to_dict(), b.to_dict()
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("name", ["bswa", "fam", "xl", "full", "rmt"])
def test_a_saved_state_loads_back_checked_against_the_model(name: str, tmp_path: Path) -> None:
    model, state = model_and_state(name)
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    loaded = load_state(path, model=model)
    assert states_equal(loaded, state)
    other = memzoo.build_model(name, **{**SIZES, "d_ff": 8}, **OPTIONS.get(name, {}))
    with pytest.raises(StateError, match="another config"):
        load_state(path, model=other)


@pytest.mark.parametrize("name", ["bswa", "fam"])
def test_a_hand_edited_position_is_refused(name: str, tmp_path: Path) -> None:
    model, state = model_and_state(name, 10)
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    flat = load_file(path)
    meta = {CHECKSUM_KEY: __import__("safetensors").safe_open(str(path), "pt").metadata()[CHECKSUM_KEY]}
    flat["__pos__"] = torch.tensor(14)  # same shapes as position 10 for these settings: only the checksum shows it
    assert model.backbone.expected_state_shapes(14, 2) == model.backbone.expected_state_shapes(10, 2)
    save_file(flat, path, metadata=meta)
    with pytest.raises(StateError, match="checksum"):
        load_state(path, model=model)
    save_file(flat, path)  # no checksum at all
    with pytest.raises(StateError, match="no checksum"):
        load_state(path)


def test_position_and_shapes_must_agree_for_the_model() -> None:
    model, state = model_and_state("xl", 10)
    shapes = model.backbone.expected_state_shapes
    assert shapes(11, 2) != shapes(10, 2)
    moved = type(state).from_dict(dict(state.to_dict(), __pos__=torch.tensor(11)))
    with pytest.raises(StateError, match="malformed state"):
        check_state_for(model, moved)
    check_state_for(model, state)


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
    ],
)
def test_bad_metadata_is_refused_naming_the_entry(entry: str, value: torch.Tensor, match: str) -> None:
    _, state = model_and_state("fam")
    with pytest.raises(StateError, match=match):
        type(state).from_dict(dict(state.to_dict(), **{entry: value}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_state_values_are_refused(bad: float, tmp_path: Path) -> None:
    _, state = model_and_state("fam")
    flat = state.to_dict()
    name = "fam.1"
    t = flat[name].clone()
    t.view(-1)[3] = bad
    with pytest.raises(StateError, match=r"'fam\.1'.*non-finite"):
        type(state).from_dict(dict(flat, **{name: t}))


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
    name = data.draw(st.sampled_from(["bswa", "fam", "xl"]))
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
