"""Issue #14: results you can trust. Diverged runs are reported as such, run files
are verified on resume (bad ones set aside and re-run), settings are strict and
checked for every variant before the first run, CLI user errors are one line with
exit status 2 before any training, and killing the parent leaves no workers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import memzoo
from memzoo.cli import EXIT_DIVERGED, main
from memzoo.compare import CompareConfig, build_leaderboard, compare_runs, load_leaderboard, markdown, write_leaderboard
from memzoo.compare import runner
from memzoo.compare.results import RunRecord, dump, load
from memzoo.compare.runner import load_finished, run_path, run_spec

MICRO = dict(
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
    train={"steps": 3, "batch_size": 4, "length": 16, "warmup_steps": 1},
    eval={"lengths": (16, 32), "examples": 4, "batch_size": 4},
    task_options={"n_digits": 2, "n_filler": 3, "eval_depths": (0.0, 1.0)},
)
MICRO_ARGS = [
    "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.block_size=4",
    "--set", "train.batch_size=4", "--set", "train.length=16", "--set", "train.warmup_steps=1",
    "--set", "eval.lengths=[16,32]", "--set", "eval.examples=4", "--set", "task_options.n_digits=2", "--no-progress",
]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    real = runner.run_one

    def counting(spec, config, **kwargs):
        calls.append((spec.variant, spec.seed))
        return real(spec, config, **kwargs)

    monkeypatch.setattr(runner, "run_one", counting)
    return calls


def measured(rows) -> list[tuple]:
    return [(r.variant, r.eval_length, r.seed, r.metric, r.slice, r.value, r.state_bytes, r.parameters) for r in rows]


# ------------------------------------------------------------- 1. divergence
@pytest.mark.parametrize("lr", [1e4, 1e30])
def test_diverged_training_is_recorded_not_published(lr: float) -> None:
    config = CompareConfig(task="passkey", variants=("bswa",), **{**MICRO, "train": {**MICRO["train"], "steps": 30, "lr": lr}})
    (record,) = compare_runs(config, quiet=True)
    assert record.status == "diverged" and record.rows == []
    d = record.divergence
    assert d is not None and 0 < d.step < 30 and d.last_finite_loss is not None and math.isfinite(d.last_finite_loss)
    assert record.content_hash == record.computed_hash()
    board = build_leaderboard(config, [record])
    assert board.rows == [] and [r.status for r in board.runs] == ["diverged"]
    md = markdown(board)
    assert "diverged" in md and f"step {d.step}" in md and "0." not in md.split("Settings:")[0].replace("0.0", "")


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_a_non_finite_gradient_stops_the_run_at_its_step(grad_clip: float | None) -> None:
    """A NaN gradient with a finite loss is the step's divergence, with or without
    clipping (without it, the NaN was applied and the next step blamed its NaN loss)."""
    from memzoo.compare.settings import TrainSettings
    from memzoo.compare.trainer import train
    from memzoo.tasks import make_task

    task = make_task("passkey", n_digits=2, n_filler=3)
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=4, memory_blocks=1)
    calls = [0]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return grad * float("nan") if calls[0] == 3 else grad

    model.embed.weight.register_hook(poison)
    settings = TrainSettings(steps=6, batch_size=2, length=16, warmup_steps=1, grad_clip=grad_clip)
    report = train(model, task, settings, seed=0)
    d = report.diverged
    assert d is not None and d.step == 2 and "gradient norm" in d.reason, d
    assert len(report.losses) == 3 and all(math.isfinite(x) for x in report.losses)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # the NaN was never applied


def test_a_finished_run_is_not_diverged_and_partial_divergence_is_marked(tmp_path: Path) -> None:
    ok = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    bad = CompareConfig(task="passkey", variants=("full",), **{**MICRO, "train": {**MICRO["train"], "steps": 30, "lr": 1e4}})
    (good,) = compare_runs(ok, quiet=True)
    (gone,) = compare_runs(bad, quiet=True)
    assert good.status == "finished" and good.divergence is None and good.rows
    board = build_leaderboard(ok.model_copy(update={"variants": ("bswa", "full")}), [good, gone])
    md = markdown(board)
    assert "| `full` | diverged | diverged |" in md and "| `bswa` |" in md and "full seed 0 diverged at step" in md
    assert gone.provenance.config_hash == gone.config_hash  # a diverged run still says what made it
    written = write_leaderboard(board, tmp_path)  # the plot and the Markdown show it too
    assert load_leaderboard(written["json"]) == board and "diverged" in Path(written["md"]).read_text()


def test_every_table_marks_the_variants_whose_runs_diverged(tmp_path: Path) -> None:
    """Not only the headline table: the other metrics' tables and the by-slice tables mark a
    variant with some diverged seeds (†) and say "diverged" for one with no finished run;
    a page where every run diverged still says what made it."""
    ok = CompareConfig(task="passkey", variants=("bswa", "full"), seeds=(0, 1), **MICRO)
    bad = CompareConfig(task="passkey", variants=("full", "sinks"), seeds=(1,), **{**MICRO, "train": {**MICRO["train"], "steps": 30, "lr": 1e4}})
    finished = [r for r in compare_runs(ok, quiet=True) if (r.spec.variant, r.spec.seed) != ("full", 1)]
    gone = compare_runs(bad, quiet=True)
    assert [r.status for r in gone] == ["diverged", "diverged"]
    board = build_leaderboard(ok.model_copy(update={"variants": ("bswa", "full", "sinks")}), finished + gone, command="memzoo compare ...")
    tables = [t for t in markdown(board).split("\n\n") if t.startswith("| ")]
    metrics = {r.metric for r in board.rows}
    assert len(metrics) >= 2 and len(tables) >= 1 + len(metrics)  # the headline, the other metrics, the slices
    for table in tables:
        assert "| `full` † |" in table and "| `sinks` | diverged |" in table and "| `bswa` |" in table, table
    gone_only = build_leaderboard(bad, gone, command="memzoo compare --made-this")
    md = markdown(gone_only)
    assert "memzoo compare --made-this" in md and "Settings: " in md


def test_a_leaderboard_whose_rows_and_runs_disagree_is_refused(tmp_path: Path) -> None:
    """A leaderboard file is held to its own run list: rows of a run it does not list as
    finished, a finished run missing rows, a run listed twice: each refused with what is wrong."""
    from memzoo.compare.results import ResultsFileError

    config = CompareConfig(task="passkey", variants=("bswa",), seeds=(0, 1), **MICRO)
    board = build_leaderboard(config, compare_runs(config, quiet=True))
    good = json.loads(board.model_dump_json(by_alias=True))
    lacking = {**good, "rows": [r for r in good["rows"] if not (r["seed"] == 1 and r["eval_length"] == 32 and r["slice"] == "all")]}
    unlisted = {**good, "runs": [r for r in good["runs"] if r["seed"] == 0]}
    twice = {**good, "runs": good["runs"] + good["runs"][:1]}
    diverged = {**good, "runs": [{**r, "status": "diverged"} if r["seed"] == 1 else r for r in good["runs"]]}
    for edited, message in [
        (lacking, "finished run bswa seed 1 lacks"), (unlisted, "bswa seed 1 .* has no entry in runs"),
        (twice, "bswa seed 0 is listed twice"), (diverged, r"that run is diverged \(such a run has no rows\)"),
    ]:
        path = tmp_path / "board.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(ResultsFileError, match=message):
            load_leaderboard(path)
    path.write_text(json.dumps(good))
    assert load_leaderboard(path) == board


def test_a_leaderboard_is_held_to_its_own_task_lengths_seeds_and_unique_rows_even_without_runs(tmp_path: Path, capsys) -> None:
    """A leaderboard without ``runs`` skipped every check (a duplicated row was averaged in:
    a 2-seed page over 3 values), and rows relabelled with another task or training length
    were averaged in too."""
    from memzoo.compare.results import ResultsFileError

    config = CompareConfig(task="passkey", variants=("bswa",), seeds=(0, 1), **MICRO)
    board = build_leaderboard(config, compare_runs(config, quiet=True))
    good = json.loads(board.model_dump_json(by_alias=True))
    bare = {k: v for k, v in good.items() if k != "runs"}
    first = good["rows"][0]
    relabel = lambda **kw: [{**first, **kw}, *good["rows"][1:]]  # noqa: E731
    for edited, message in [
        ({**bare, "rows": good["rows"] + [first]}, "bswa seed 0 has two rows for accuracy all at length 16"),
        ({**bare, "rows": relabel(seed=2)}, r"a row of bswa seed 2 .* is of a seed this board does not run \(seeds \[0, 1\]\)"),
        ({**bare, "rows": relabel(variant="full")}, r"is of a variant this board does not run \(variants \['bswa'\]\)"),
        ({**bare, "rows": relabel(eval_length=64)}, r"is at a length this board does not evaluate \(eval_lengths \[16, 32\]\)"),
        ({**bare, "rows": relabel(task="mqar")}, "is of task 'mqar', but this is the 'passkey' board"),
        ({**good, "rows": relabel(task="mqar")}, "is of task 'mqar', but this is the 'passkey' board"),
        ({**good, "rows": relabel(train_length=32)}, "has train length 32, but this board trained at 16"),
        ({**bare, "rows": [r for r in good["rows"] if not (r["seed"] == 1 and r["eval_length"] == 32 and r["slice"] == "all")]},
         "finished run bswa seed 1 lacks"),
    ]:
        path = tmp_path / "board.json"
        path.write_text(json.dumps(edited))
        with pytest.raises(ResultsFileError, match=message):
            load_leaderboard(path)
        assert main(["render", str(path)]) == 2 and not (tmp_path / "board.md").exists()
    capsys.readouterr()
    path.write_text(json.dumps(bare))  # a board without a run list still loads when its rows are its own
    assert load_leaderboard(path).rows == board.rows
    ranged = {**bare, "settings": {**bare["settings"], "train": {**bare["settings"]["train"], "length": [8, 16]}}}
    path.write_text(json.dumps(ranged))  # rows name hi of a training-length range
    assert load_leaderboard(path).rows == board.rows


def test_cli_exit_status_says_a_run_diverged(tmp_path: Path, capsys) -> None:
    out = tmp_path / "lb"
    args = ["compare", "--variants", "bswa", "--set", "train.lr=10000", "--steps", "30", "--jobs", "1", "--out", str(out), *MICRO_ARGS]
    assert main(args) == EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "bswa seed 0 diverged at step" in err
    board = load_leaderboard(out / "passkey.json")
    assert board.rows == [] and board.runs[0].status == "diverged"
    assert "diverged" in (out / "passkey.md").read_text()
    if importlib.util.find_spec("matplotlib"):  # the plot says so too (no stale PNG of earlier numbers)
        assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG" and "passkey.png" in (out / "passkey.md").read_text()
    # the diverged run is a finished run: resuming loads it and still says so
    assert main(args) == EXIT_DIVERGED


def test_compare_warns_about_a_diverged_run() -> None:
    from memzoo.compare import compare

    with pytest.warns(RuntimeWarning, match="bswa seed 0 diverged at step"):
        rows = compare(["bswa"], "passkey", **{**MICRO, "train": {**MICRO["train"], "steps": 30, "lr": 1e4}})
    assert rows == []


def test_infinite_learning_rates_are_refused() -> None:
    for lr in (math.inf, math.nan):
        with pytest.raises(ValidationError, match="finite"):
            CompareConfig(train={"lr": lr})


# ------------------------------------------------------- 2, 3. run files
def _mutations(data: dict) -> dict[str, str]:
    """name -> the edited file's text."""
    def edit(fn) -> str:  # type: ignore[no-untyped-def]
        d = json.loads(json.dumps(data))
        fn(d)
        return json.dumps(d)

    def set_value(v):  # type: ignore[no-untyped-def]
        return lambda d: d["rows"][0].__setitem__("value", v)

    def relabel(key, v):  # type: ignore[no-untyped-def]
        return lambda d: [r.__setitem__(key, v) for r in d["rows"]]

    def drop_length(d) -> None:  # type: ignore[no-untyped-def]
        d["rows"] = [r for r in d["rows"] if r["eval_length"] != 32]

    text = json.dumps(data)
    return {
        "value 0.99": edit(set_value(0.99)),
        "value NaN": text.replace(f'"value": {data["rows"][0]["value"]}', '"value": NaN', 1),
        "value '0.5'": edit(set_value("0.5")),
        "rows []": edit(lambda d: d.__setitem__("rows", [])),
        "relabelled variant": edit(relabel("variant", "full")),
        "relabelled seed": edit(relabel("seed", 7)),
        "relabelled task": edit(relabel("task", "mqar")),
        "one length dropped": edit(drop_length),
        "status diverged": edit(lambda d: d.__setitem__("status", "diverged")),
        "truncated": text[: len(text) // 2],
        "not JSON": "\x00garbage",
        "empty": "",
        "hash removed": edit(lambda d: d.pop("content_hash")),
        "rehashed with a changed value": "REHASH",
    }


def test_edited_or_corrupt_run_files_are_set_aside_and_rerun(tmp_path: Path, count_runs, capsys) -> None:
    out = tmp_path / "lb"
    args = ["compare", "--variants", "bswa", "--jobs", "1", "--steps", "3", "--out", str(out), *MICRO_ARGS]
    assert main(args) == 0
    (path,) = (out / "runs" / "passkey").glob("*.json")
    original = path.read_text()
    board = load_leaderboard(out / "passkey.json")
    data = json.loads(original)
    for name, text in _mutations(data).items():
        if text == "REHASH":  # consistent hash, but rows that are not this run's: the row checks refuse it
            record = RunRecord.model_validate_json(original)
            rows = [r.model_copy(update={"eval_length": 64}) if r.eval_length == 32 else r for r in record.rows]
            text = dump(record.model_copy(update={"rows": rows}).sealed())
        path.write_text(text)
        count_runs.clear()
        capsys.readouterr()
        assert main(args) == 0, name
        err = capsys.readouterr().err
        assert count_runs == [("bswa", 0)], name  # re-run, not trusted
        assert f"run file {path}" in err and "running it again" in err, name
        aside = sorted(path.parent.glob(f"{path.name}.rejected-*"))
        assert aside and aside[-1].read_text() == text, name  # moved aside, not deleted
        for p in aside:
            p.unlink()
        assert measured(load(path, RunRecord).rows) == measured(RunRecord.model_validate_json(original).rows), name
        assert measured(load_leaderboard(out / "passkey.json").rows) == measured(board.rows), name


def test_an_untouched_file_is_loaded_and_a_reformatted_one_still_verifies(tmp_path: Path, count_runs) -> None:
    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    (record,) = compare_runs(config, quiet=True, results_dir=tmp_path)
    path = run_path(tmp_path, run_spec(config, "bswa", 0))
    count_runs.clear()
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4, sort_keys=True))  # same content, other layout
    (again,) = compare_runs(config, quiet=True, results_dir=tmp_path)
    assert count_runs == [] and again == record
    assert load_finished(path, run_spec(config, "bswa", 0)) == (record, None)


def test_setting_a_bad_file_aside_never_loses_it_even_when_racing(tmp_path: Path) -> None:
    import threading

    from memzoo.compare.runner import set_aside

    path = tmp_path / "run.json"
    path.write_text("bad")
    moved: list = []
    threads = [threading.Thread(target=lambda: moved.append(set_aside(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [m for m in moved if m is not None]
    assert len(kept) == 1 and kept[0].read_text() == "bad" and not path.exists()
    path.write_text("bad again")
    second = set_aside(path)
    assert second is not None and second != kept[0] and kept[0].read_text() == "bad"  # never overwritten


def test_two_comparisons_writing_into_one_results_dir_never_corrupt_a_file(tmp_path: Path) -> None:
    import threading

    config = CompareConfig(task="passkey", variants=("bswa", "full"), **MICRO)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(compare_runs(config, quiet=True, results_dir=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    files = sorted((tmp_path / "passkey").iterdir())
    assert [p.suffix for p in files] == [".json", ".json"]  # no temporary or set-aside file left
    for variant, path in zip(("bswa", "full"), files):
        loaded, why = load_finished(path, run_spec(config, variant, 0))
        assert why is None and loaded is not None
        assert measured(loaded.rows) == measured(results[0][("bswa", "full").index(variant)].rows)


def test_a_leaderboard_missing_some_rows_still_renders(tmp_path: Path) -> None:
    config = CompareConfig(task="passkey", variants=("bswa", "full"), **MICRO)
    board = build_leaderboard(config, compare_runs(config, quiet=True))
    partial = board.model_copy(update={"rows": [r for r in board.rows if not (r.variant == "full" and r.eval_length == 32)]})
    md = markdown(partial)  # used to crash: max() arg is an empty sequence
    assert "| `full` |" in md and "–" in md


@pytest.mark.parametrize("value", ["NaN", '"0.5"', "Infinity", "true"])
def test_render_refuses_an_edited_leaderboard_naming_it(value: str, tmp_path: Path, capsys) -> None:
    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    written = write_leaderboard(build_leaderboard(config, compare_runs(config, quiet=True)), tmp_path)
    path = Path(written["json"])
    data = json.loads(path.read_text())
    text = json.dumps(data).replace(f'"value": {data["rows"][0]["value"]}', f'"value": {value}', 1)
    path.write_text(text)
    md_before = Path(written["md"]).read_text()
    capsys.readouterr()
    assert main(["render", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memzoo: error: {path} is not a valid leaderboard file: rows.0.value") and err.count("\n") == 1
    assert path.read_text() == text and Path(written["md"]).read_text() == md_before  # nothing rewritten


# --------------------------------------------------------------- 4, 5. settings
def test_variant_options_are_checked_for_every_variant_before_any_run(count_runs) -> None:
    base = dict(task="passkey", **MICRO)
    with pytest.raises(ValidationError, match="memory_len"):
        CompareConfig(variants=("bswa", "xl"), variant_options={"xl": {"memory_len": -1}}, **base)
    with pytest.raises(ValidationError, match="does not run"):
        CompareConfig(variants=("bswa",), variant_options={"fam": {"nope": 1}}, **base)
    with pytest.raises(ValidationError, match="does not run"):
        CompareConfig(variants=("bswa",), variant_options={"fam": {"fam_len": 200}}, **base)
    with pytest.raises(ValidationError, match="fam_len"):
        CompareConfig(variants=("fam",), variant_options={"fam": {"fam_len": True}}, **base)
    assert count_runs == []


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"train": {"steps": True}}, "valid integer"),
        ({"train": {"steps": "7"}}, "valid integer"),
        ({"train": {"steps": 7.0}}, "valid integer"),
        ({"model": {"block_size": True}}, "valid integer"),
        ({"train": {"lr": math.inf}}, "finite"),
        ({"train": {"lr": "0.1"}}, "valid number"),
        ({"train": {"betas": (0.9, math.nan)}}, "finite"),
        ({"train": {"betas": (1.5, 0.9)}}, r"betas.0\n.*less than 1"),
        ({"train": {"betas": (0.9, 1.0)}}, r"betas.1\n.*less than 1"),
        ({"train": {"betas": (0.9, -0.1)}}, r"betas.1\n.*greater than or equal to 0"),
        ({"train": {"detach_every": 2}}, r"train.detach_every=2 cuts the gradient between chunks, but train.chunk_len is not set"),
        ({"eval": {"lengths": (16, 16)}}, "more than once"),
        ({"eval": {"lengths": (16, "32")}}, "valid integer"),
        ({"seeds": (0, True)}, "valid integer"),
        ({"seeds": (-1,)}, "greater than or equal"),
        ({"task_options": {"n_digits": True}}, "n_digits"),
        ({"task_options": {"eval_depths": (0.0, math.nan)}}, "eval_depths"),
        ({"device": "bogus"}, "unknown device"),
        ({"model": {"n_heads": 3}}, "divisible"),
    ],
)
def test_settings_are_strict(fields: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CompareConfig(task="passkey", variants=("bswa",), **{**MICRO, **fields})


def test_settings_from_json_and_lists_still_load() -> None:
    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    again = CompareConfig.model_validate(json.loads(config.model_dump_json()))
    assert again == config
    assert CompareConfig(eval={"lengths": [16, 32]}, train={"length": 16}).eval.lengths == (16, 32)


# -------------------------------------------------------------------- 7. CLI
CLI_ERRORS = [
    ["--backend", "flex"],
    ["--backend", "nope"],
    ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:4096"],
    ["--device", "bogus"],
    ["--threads", "-1"],
    ["--jobs", "0"],
    ["--jobs", "-3"],
    ["--variants", ""],
    ["--variants", ","],
    ["--variants", "nope"],
    ["--set", "train=5", "--steps", "5"],
    ["--set", "model=[1]"],
    ["--set", "train.steps=true"],
    ["--set", 'train.steps="7"'],
    ["--set", "model.block_size=true"],
    ["--set", "train.lr=inf"],
    ["--set", "train.lr=Infinity"],
    ["--set", "train.betas=[1.5,0.9]"],
    ["--set", "train.detach_every=1"],
    ["--set", "eval.lengths=[32,32]"],
    ["--set", "nope=1"],
    ["--set", "=1"],
    ["--set", "train..steps=1"],
    ["--variants", "bswa,xl", "--option", "xl.memory_len=-1"],
    ["--variants", "bswa", "--option", "fam.nope=1"],
    ["--variants", "bswa", "--set", "variant_options.fam.fam_len=200"],
    ["--option", "fam=1"],
    ["--steps", "-1"],
    ["--steps", "x"],
    ["--seeds", "a"],
    ["--seeds", "0,0"],
    ["--task", "nope"],
    ["--preset", "nope"],
    ["--bogus"],
]


@pytest.mark.parametrize("extra", CLI_ERRORS, ids=lambda a: " ".join(a))
def test_cli_user_errors_are_one_line_before_training(extra: list[str], tmp_path: Path, count_runs, capsys) -> None:
    out = tmp_path / "lb"
    assert main(["compare", "--variants", "bswa", "--out", str(out), *MICRO_ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memzoo: error: ") and err.count("\n") == 1, err
    assert count_runs == [] and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "5", "--set", "train.steps=10"], "train.steps is given twice, by --steps 5 and by --set train.steps=10"),
    (["--steps", "5", "--set", 'train={"steps": 10}'], "train.steps is given twice, by --steps 5 and by --set train.steps=10"),
    (["--compile", "--set", "train.compile=false"], "train.compile is given twice, by --compile and by --set train.compile=false"),
    (["--set", 'variants=["fam"]'], 'variants is given twice, by --variants bswa and by --set variants=\\["fam"\\]'),
    (["--seeds", "0", "--set", "seeds=[1]"], r"seeds is given twice, by --seeds 0 and by --set seeds=\[1\]"),
    (["--backend", "sdpa", "--set", 'backend="auto"'], 'backend is given twice, by --backend sdpa and by --set backend="auto"'),
    (["--device", "cpu", "--set", 'device="cpu"'], 'device is given twice, by --device cpu and by --set device="cpu"'),
    (["--variants", "fam", "--option", "fam.fam_len=2", "--set", "variant_options.fam.fam_len=3"],
     "variant_options.fam.fam_len is given twice, by --option fam.fam_len=2 and by --set variant_options.fam.fam_len=3"),
    (["--set", 'task="mqar"'], r"--set task=\"mqar\": the task is chosen with --task .*now 'passkey'\); valid: --task NAME, e.g. --task mqar"),
])
def test_a_setting_given_both_by_set_and_by_a_flag_is_refused(extra, message, tmp_path: Path, count_runs, capsys) -> None:
    """A flag used to win over the same --set silently (--steps 5 --set train.steps=10 trained 5 steps);
    --set task=mqar blamed the passkey preset's task options, which the user never set."""
    out = tmp_path / "lb"
    assert main(["compare", "--variants", "bswa", "--out", str(out), *MICRO_ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"memzoo: error: {message}", err), err
    assert count_runs == [] and not out.exists()


def test_flags_and_sets_of_different_settings_still_combine(monkeypatch: pytest.MonkeyPatch) -> None:
    from memzoo.cli import build_parser, compare_config

    args = build_parser().parse_args(["compare", "--steps", "2", "--set", 'train={"lr": 0.01}', "--set", 'task="passkey"',
                                      "--option", "fam.fam_len=1", "--set", "variant_options.fam.memory_blocks=2"])
    config = compare_config(args)
    assert (config.train.steps, config.train.lr, config.variant_options) == (2, 0.01, {"fam": {"fam_len": 1, "memory_blocks": 2}})


def test_a_bad_item_is_reported_once_not_also_as_a_short_sequence(tmp_path: Path, count_runs, capsys) -> None:
    """pydantic reports a sequence whose only item failed as too short as well; the line
    names the item and what is valid, nothing else."""
    assert main(["compare", "--variants", "bswa", "--out", str(tmp_path / "lb"), *MICRO_ARGS, "--seeds", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "memzoo: error: seeds.0: Input should be greater than or equal to 0 (got -1)\n"
    assert count_runs == []


@pytest.mark.parametrize("kwargs", [{"jobs": 0}, {"jobs": -2}, {"jobs": True}, {"jobs": 1.5}, {"threads": 0}, {"threads": -1}])
def test_python_api_refuses_bad_jobs_and_threads(kwargs: dict, count_runs) -> None:
    with pytest.raises(ValueError, match="jobs|threads"):
        compare_runs(CompareConfig(task="passkey", variants=("bswa",), **MICRO), quiet=True, **kwargs)
    assert count_runs == []


def test_a_subcommand_is_added_by_one_registration(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from memzoo import cli

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def add(p) -> None:  # type: ignore[no-untyped-def]
        p.add_argument("--n", type=int, required=True)

    cli.register_command(cli.Command("echo_test", "print N", add, lambda args, argv: print(args.n) or 0))
    assert main(["echo_test", "--n", "3"]) == 0 and capsys.readouterr().out == "3\n"
    assert main(["echo_test", "--n", "x"]) == 2
    assert capsys.readouterr().err.startswith("memzoo: error: echo_test: argument --n")
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command(cli.Command("compare", "again", add, lambda args, argv: 0))


def test_cli_refuses_an_out_that_is_a_file_and_render_errors(tmp_path: Path, count_runs, capsys) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    for flag in ("--out", "--results-dir"):
        assert main(["compare", "--variants", "bswa", flag, str(afile), *MICRO_ARGS]) == 2
        assert main(["compare", "--variants", "bswa", flag, str(afile / "sub"), *MICRO_ARGS]) == 2
    assert main(["render", str(tmp_path / "missing.json")]) == 2
    assert main(["render", str(afile)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(line.startswith("memzoo: error: ") for line in err)
    assert "missing.json" in err[4] and str(afile) in err[5]
    assert count_runs == []
    # a leaderboard with no settings still renders (nothing half-written)
    lb = tmp_path / "x.json"
    lb.write_text(json.dumps({"schema": "memzoo.compare.leaderboard/1", "task": "x", "settings": {}, "eval_lengths": [],
                              "variant_options": {}, "rows": []}))
    assert main(["render", str(lb)]) == 0 and (tmp_path / "x.md").exists()


# --------------------------------------------------- workers: no orphans, resume
def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # a zombie is dead (nobody reaps it here)


LAUNCHER = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from memzoo.cli import main; sys.exit(main())")


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(memzoo.__file__).parent.parent)}
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", LAUNCHER, *args], stderr=err, stdout=subprocess.DEVNULL, env=env)


def _worker_pids(log: Path) -> list[int]:
    return [int(part.split(")")[0]) for part in log.read_text().split("(worker ")[1:]]


def _wait_for_workers(parent: subprocess.Popen, log: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(_worker_pids(log)) < n:
        assert parent.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


needs_proc = pytest.mark.skipif(not Path("/proc").is_dir() or sys.platform != "linux", reason="uses /proc")


@needs_proc
def test_killing_the_parent_leaves_no_workers(tmp_path: Path) -> None:
    """SIGTERM and SIGINT: the parent kills its workers' process groups; SIGKILL: the
    workers see their stdin close and kill their own groups. Each worker's run would
    take minutes, so only that ends it within the deadline. The three run at once."""
    started = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        out = tmp_path / sig.name
        args = ["compare", "--task", "passkey", "--variants", "bswa", "--seeds", "0,1", "--steps", "100000", "--jobs", "2",
                "--out", str(out), *MICRO_ARGS]
        started[sig] = (_launch(args, tmp_path / f"{sig.name}.log"), tmp_path / f"{sig.name}.log", out)
    pids: dict[signal.Signals, list[int]] = {}
    try:
        for sig, (parent, log, _) in started.items():
            _wait_for_workers(parent, log, 2)
            parent.send_signal(sig)
        for sig, (parent, log, _) in started.items():
            assert parent.wait(timeout=60) != 0
            pids[sig] = _worker_pids(log)
            assert len(pids[sig]) == 2
        deadline = time.monotonic() + 30  # a worker's run takes minutes: only being killed ends it in time
        while any(_alive(p) for ps in pids.values() for p in ps) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for parent, log, _ in started.values():
            if parent.poll() is None:
                parent.kill()
                parent.wait()
        orphans = {sig.name: [p for p in _worker_pids(log) if _alive(p)] for sig, (_, log, _) in started.items()}
        for ps in orphans.values():  # never leave them running, even when the test fails
            for p in ps:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p, signal.SIGKILL)
    assert not any(orphans.values()), f"orphan workers: {orphans}"
    for _, _, out in started.values():
        assert not list((out / "runs").glob("*/*.json"))  # nothing half-finished was kept


@needs_proc
def test_after_the_parent_is_killed_the_rerun_resumes(tmp_path: Path, count_runs) -> None:
    out = tmp_path / "lb"
    base = ["compare", "--task", "passkey", "--variants", "bswa", "--steps", "3", "--out", str(out), *MICRO_ARGS]
    assert main([*base, "--seeds", "0", "--jobs", "1"]) == 0  # one run finished before
    finished = sorted((out / "runs" / "passkey").glob("*.json"))
    before = finished[0].read_text()
    log = tmp_path / "killed.log"
    parent = _launch([*base, "--seeds", "0,1", "--jobs", "2"], log)
    try:
        _wait_for_workers(parent, log, 1)  # seed 1's worker started (seed 0 was loaded)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "seed 0: finished before, loaded" in log.read_text()
    # seed 1's 3 steps may have finished (and been written whole) before the kill reached
    # its worker: then it is loaded too; otherwise it, and only it, is computed again
    kept = set((out / "runs" / "passkey").glob("*.json")) - set(finished)
    count_runs.clear()
    assert main([*base, "--seeds", "0,1", "--jobs", "1"]) == 0
    runs = sorted((out / "runs" / "passkey").glob("*.json"))
    assert finished[0] in runs and finished[0].read_text() == before  # the finished run was kept and loaded
    assert count_runs == ([] if kept else [("bswa", 1)]), (kept, count_runs)  # never seed 0 again
    assert {r.seed for r in load_leaderboard(out / "passkey.json").rows} == {0, 1}


# ------------------------------------------------------------------ 8. sizes
@pytest.mark.parametrize(
    "variant, fields, match",
    [
        ("bswa", {"n_layers": 2**40}, "n_layers"),
        ("bswa", {"block_size": 2**62}, "block_size"),
        ("fam", {"position_offset_max": 2**63}, "position_offset_max"),
        ("xl", {"memory_len": 2**40}, "memory_len"),
        ("rmt", {"num_memory_tokens": 2**40}, "num_memory_tokens"),
        ("bswa", {"d_model": 2**15, "n_heads": 2, "head_dim": 2**15}, "parameters"),
        ("bswa", {"vocab_size": 2**24, "d_model": 2**12, "n_heads": 2**5}, "parameters"),
        ("bswa", {"d_model": 2**20}, "d_model"),
    ],
)
def test_sizes_have_upper_bounds_that_fail_at_build_time(variant: str, fields: dict, match: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValidationError, match=match):
        memzoo.build_model(variant, **fields)
    assert time.perf_counter() - start < 5  # refused, not attempted
    if "vocab_size" in fields:
        return  # a comparison takes the vocabulary from its task
    shared = CompareConfig.model_fields["model"].annotation.model_fields
    model = {k: v for k, v in fields.items() if k in shared}
    own = {k: v for k, v in fields.items() if k not in shared}
    with pytest.raises(ValidationError, match=match):  # a comparison refuses it before any run
        CompareConfig(variants=(variant,), model=model, variant_options={variant: own} if own else {})
