"""Issue #14: a hypothesis-driven fuzz suite over the CLI's arguments, the comparison
settings and run files (mutated, truncated, relabelled). Each input gives a clear
error or a correct result, never a changed or lost finished result. (Saved states
are fuzzed in tests/test_state_files.py.)"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from memzoo.cli import main
from memzoo.compare import CompareConfig, compare_runs
from memzoo.compare import runner
from memzoo.compare.results import RunRecord, dump
from memzoo.compare.runner import load_finished, run_path, run_spec
from memzoo.compare.settings import preset

torch.set_num_threads(1)

# ---------------------------------------------------------------- CLI and settings
LEAVES = [
    "model.d_model", "model.n_layers", "model.n_heads", "model.block_size", "model.d_ff", "model.n_kv_heads",
    "model.mlp", "model.norm_eps", "model.rope_base", "model.tie_embeddings",
    "train.steps", "train.batch_size", "train.length", "train.chunk_len", "train.detach_every", "train.rsp_prob",
    "train.lr", "train.weight_decay", "train.betas", "train.warmup_steps", "train.min_lr_ratio", "train.grad_clip",
    "eval.lengths", "eval.examples", "eval.batch_size", "eval.chunk_len",
    "task_options.n_digits", "task_options.n_filler", "task_options.eval_depths",
    "variant_options.bswa.memory_blocks", "variant_options.fam.fam_len", "variant_options.xl.memory_len",
    "seeds", "backend", "device", "task",
]
ODD_KEYS = ["train", "model", "nope", "train.nope", "variant_options.nope.x", "variant_options.bswa", "model.d_model.x"]
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "7", "0.5", "auto", "cpu", "sdpa", "gelu", "x"]),
)
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=4), st.lists(st.integers(2, 64), min_size=1, max_size=3))
#: values that many settings take, so that a good share of the fuzzed command lines are valid
plausible = st.one_of(st.integers(1, 6), st.sampled_from([0.01, 0.5, 1e-3]), st.just([32, 64]))


def as_text(value: Any) -> str:
    """How a user types a JSON value on the command line (NaN and Infinity as JSON5-ish tokens Python reads)."""
    return json.dumps(value)


def reflects(expected: Any, got: Any) -> bool:
    """``got`` holds ``expected`` exactly (no coercion): dicts key by key, sequences item by item."""
    if isinstance(expected, dict):
        return isinstance(got, dict) and all(k in got and reflects(v, got[k]) for k, v in expected.items())
    if isinstance(expected, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(expected) and all(map(reflects, expected, got))
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, float) and math.isnan(expected):
        return False  # NaN is never a valid setting
    return expected == got


def nest(path: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path.split(".")):
        out = {key: out}
    return out


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[CompareConfig]:
    """compare_runs replaced by a recorder: the fuzzed CLI never trains."""
    seen: list[CompareConfig] = []

    def record(config, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(config)
        return []

    monkeypatch.setattr(runner, "compare_runs", record)
    return seen


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    sets=st.dictionaries(st.sampled_from(LEAVES + ODD_KEYS), st.one_of(plausible, plausible, json_values), max_size=3),
    flags=st.lists(
        st.tuples(st.sampled_from(["--jobs", "--threads", "--seeds", "--variants", "--steps", "--option"]),
                  st.one_of(st.sampled_from(["", "0", "1", "-1", "2", "0,1", "bswa", "bswa,full", "nope", "a,b", "x=1",
                                             "bswa.memory_blocks=2", "fam.fam_len=1"]), st.text(max_size=5))),
        max_size=2, unique_by=lambda f: f[0],
    ),
)
def test_fuzz_cli_arguments_give_one_error_line_or_exactly_the_settings(sets, flags, captured, capsys) -> None:
    argv = ["compare", "--no-progress", "--quiet"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={as_text(value)}"]
    for flag, value in flags:
        argv += [flag, value]
    captured.clear()
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    event(f"exit status {status}")
    if status == 2:
        assert err.startswith("memzoo: error: ") and err.count("\n") == 1, err
        assert captured == []  # refused before anything ran
        return
    assert status == 0, err
    (config,) = captured
    got = config.model_dump(mode="json")
    for key, value in sets.items():  # every --set is in the config exactly as given
        assert reflects(nest(key, value), got), (key, value, got)
    # nothing of the preset was dropped: what was not set is the preset's
    expected = preset("tiny", config.task)
    for key in sets:
        expected = deep_merge(expected, nest(key, sets[key]))
    expected.pop("variants", None)
    for key, value in expected.items():
        if key not in ("seeds", "variant_options"):
            assert reflects(value, got[key]), (key, value, got[key])


@settings(max_examples=40)
@given(fields=st.dictionaries(
    st.sampled_from(["train", "eval", "model", "seeds", "variants", "task_options"]),
    st.one_of(json_values, st.dictionaries(st.sampled_from(["steps", "lengths", "d_model", "lr", "n_digits", "examples"]),
                                           json_values, max_size=2)),
    max_size=3,
))
def test_fuzz_comparison_settings_are_refused_or_exact(fields) -> None:
    try:
        config = CompareConfig(**fields)
    except ValueError:  # pydantic's ValidationError and memzoo's errors are ValueErrors
        event("refused")
        return
    event("accepted")
    got = config.model_dump(mode="json")
    for key, value in fields.items():
        assert reflects(value, got[key]), (key, value, got[key])


# ----------------------------------------------------------------------- run files
MICRO = dict(
    task="passkey", variants=("bswa",),
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
    train={"steps": 2, "batch_size": 4, "length": 16, "warmup_steps": 1},
    eval={"lengths": (16, 32), "examples": 4, "batch_size": 4},
    task_options={"n_digits": 2, "n_filler": 3, "eval_depths": (0.0, 1.0)},
)
_RUN: dict[str, Any] = {}


def finished_run() -> tuple[CompareConfig, RunRecord]:
    if not _RUN:
        config = CompareConfig(**MICRO)
        (record,) = compare_runs(config, quiet=True)
        _RUN.update(config=config, record=record)
    return _RUN["config"], _RUN["record"]


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every leaf path of a JSON value."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in paths(v, (*prefix, k))] or [prefix]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in paths(v, (*prefix, i))] or [prefix]
    return [prefix]


def put(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@st.composite
def mutated_run_files(draw) -> str:  # type: ignore[no-untyped-def]
    _, record = finished_run()
    text = dump(record)
    kind = draw(st.sampled_from(["leaf", "leaf", "relabel", "drop", "truncate", "bytes"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "bytes":
        raw = bytearray(text.encode())
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        return raw.decode("utf-8", errors="replace")
    data = json.loads(text)
    if kind == "relabel":  # every row at once: consistent, but not this run's
        key, value = draw(st.sampled_from([("variant", "full"), ("seed", 7), ("task", "mqar"), ("eval_length", 64),
                                           ("metric", "digit_accuracy"), ("slice", "depth=0.5")]))
        for row in data["rows"]:
            row[key] = value
    elif kind == "drop":
        rows = data["rows"]
        del rows[draw(st.integers(0, len(rows) - 1))]
    else:
        path = draw(st.sampled_from(paths(data)))
        put(data, path, draw(json_values))
    return json.dumps(data, allow_nan=True)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=mutated_run_files())
def test_fuzz_mutated_run_files_are_refused_or_unchanged(text: str, tmp_path_factory) -> None:
    config, record = finished_run()
    spec = run_spec(config, "bswa", 0)
    path = run_path(tmp_path_factory.mktemp("runs"), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    loaded, why = load_finished(path, spec)
    event("refused" if loaded is None else "accepted (unchanged)")
    if loaded is None:
        assert why  # named and explained, to be set aside and re-run
    else:
        assert loaded == record, "a changed run file was accepted"


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=mutated_run_files())
def test_fuzz_a_mutated_run_file_never_changes_the_result(text: str, tmp_path_factory) -> None:
    """Through compare_runs: the mutated file is loaded unchanged or set aside and the run
    recomputed; either way the numbers are the run's own."""
    config, record = finished_run()
    results = tmp_path_factory.mktemp("results")
    path = run_path(results, run_spec(config, "bswa", 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (again,) = compare_runs(config, quiet=True, results_dir=results)
    fields = ("variant", "eval_length", "seed", "metric", "slice", "value", "state_bytes", "parameters")
    assert [tuple(getattr(r, f) for f in fields) for r in again.rows] == [tuple(getattr(r, f) for f in fields) for r in record.rows]
    kept = list(path.parent.glob(f"{path.name}.rejected-*"))
    assert (again == load_finished(path, run_spec(config, "bswa", 0))[0])
    if kept:
        assert kept[0].read_text() == text  # set aside, never deleted


VALID = {
    "train.steps": st.integers(0, 50), "train.lr": st.floats(1e-5, 1.0), "train.rsp_prob": st.floats(0.0, 1.0),
    "train.weight_decay": st.floats(0.0, 0.5), "train.betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.999)).map(list),
    "train.grad_clip": st.one_of(st.none(), st.floats(0.1, 10.0)), "train.chunk_len": st.one_of(st.none(), st.integers(1, 32)),
    "eval.examples": st.integers(1, 64), "eval.lengths": st.lists(st.integers(32, 256), min_size=1, max_size=3, unique=True),
    "model.rope_base": st.floats(10.0, 1e6), "model.tie_embeddings": st.booleans(),
    "model.mlp": st.sampled_from(["gelu", "swiglu", "geglu_tanh"]), "model.norm_eps": st.floats(1e-8, 1e-3),
    "task_options.n_filler": st.integers(1, 4), "variant_options.bswa.memory_blocks": st.integers(0, 3),
    "variant_options.xl.memory_len": st.integers(0, 16), "backend": st.sampled_from(["auto", "reference", "sdpa"]),
}


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sets=st.fixed_dictionaries({}, optional=VALID), seeds=st.lists(st.integers(0, 2**31), min_size=1, max_size=3, unique=True))
def test_fuzz_valid_cli_settings_are_taken_exactly_and_nothing_is_dropped(sets, seeds, captured, capsys) -> None:
    argv = ["compare", "--no-progress", "--quiet", "--seeds", ",".join(map(str, seeds))]
    for key, value in sets.items():
        argv += ["--set", f"{key}={as_text(value)}"]
    captured.clear()
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    (config,) = captured
    got = config.model_dump(mode="json")
    expected = preset("tiny", "passkey")
    expected.pop("variants", None)
    for key, value in sets.items():
        expected = deep_merge(expected, nest(key, value))
    expected["seeds"] = seeds
    for key, value in expected.items():
        assert reflects(value, got[key]), (key, value, got[key])
