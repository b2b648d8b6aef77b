"""The comparison runner, trainer, results schema, leaderboard files and the CLI, on
micro settings (tiny models, a few steps)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pydantic import Field, ValidationError

import memzoo
from memzoo.cli import main
from memzoo.compare import (
    CompareConfig,
    Leaderboard,
    ResultRow,
    RunRecord,
    TrainSettings,
    build_leaderboard,
    compare,
    compare_runs,
    load_leaderboard,
    markdown_table,
    variant_options,
    write_leaderboard,
)
from memzoo.compare import runner
from memzoo.compare.leaderboard import cell
from memzoo.compare.plots import MISSING
from memzoo.compare.results import dump, load, write_atomic
from memzoo.compare.settings import ModelSettings
from memzoo.compare.trainer import lr_factor, train
from memzoo.config import VariantConfig
from memzoo.errors import UnknownNameError
from memzoo.registry import register_variant, unregister_variant
from memzoo.tasks import make_task
from memzoo.variants.full import Full
from memzoo.variants.kv import KVState

MICRO = dict(
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
    train={"steps": 3, "batch_size": 4, "length": 16, "warmup_steps": 1},
    eval={"lengths": (16, 32), "examples": 4, "batch_size": 4},
    task_options={"n_digits": 2, "n_filler": 3, "eval_depths": (0.0, 1.0)},
)
MICRO_SIZES = [
    "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.block_size=4",
    "--set", "train.batch_size=4", "--set", "train.length=16", "--set", "train.warmup_steps=1",
    "--set", "eval.lengths=[16,32]", "--set", "eval.examples=4", "--no-progress",
]
MICRO_ARGS = [*MICRO_SIZES, "--set", "task_options.n_digits=2", "--steps", "3", "--jobs", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared cores run fastest on one thread (as compare() does)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def measured(rows: list[ResultRow]) -> list[tuple]:
    """The parts of rows that do not depend on timing."""
    return [(r.variant, r.eval_length, r.seed, r.metric, r.slice, r.value, r.state_bytes, r.parameters) for r in rows]


def test_compare_rows_are_tidy_and_honest() -> None:
    rows = compare(["bswa", "full"], "passkey", **MICRO)
    assert {r.variant for r in rows} == {"bswa", "full"}
    assert {r.eval_length for r in rows} == {16, 32}
    assert {(r.metric, r.slice) for r in rows} == {
        (m, s) for m in ("accuracy", "digit_accuracy") for s in ("all", "depth=0", "depth=1")
    }
    for r in rows:
        assert 0.0 <= r.value <= 1.0 and r.higher_is_better
        assert r.train_length == 16 and r.task == "passkey" and r.seed == 0
        assert r.backend in memzoo.list_backends() or "+" in r.backend
        assert r.parameters > 0 and r.tokens_per_s > 0 and r.wall_s > 0
        assert r.provenance.memzoo_version == memzoo.__version__ and r.provenance.torch_version == torch.__version__
        assert len(r.provenance.config_hash) == 16
    state = {(r.variant, r.eval_length): r.state_bytes for r in rows}
    # full keeps every key/value (grows with length); bswa keeps a bounded window
    assert state[("full", 32)] == 2 * state[("full", 16)]
    assert state[("bswa", 32)] == state[("bswa", 16)] < state[("full", 32)]


def test_compare_is_deterministic_and_records_the_backend() -> None:
    a = compare("bswa", "mqar", seeds=(3,), **{**MICRO, "task_options": {"num_pairs": 2}}, backend="reference")
    b = compare("bswa", "mqar", seeds=(3,), **{**MICRO, "task_options": {"num_pairs": 2}}, backend="reference")
    assert measured(a) == measured(b)
    assert {r.backend for r in a} == {"reference"}
    c = compare("bswa", "mqar", seeds=(4,), **{**MICRO, "task_options": {"num_pairs": 2}}, backend="reference")
    assert measured(a) != measured(c)


def test_every_registered_variant_runs() -> None:
    names = memzoo.list_variants()
    rows = compare(names, "copy", **{**MICRO, "task_options": {"segment_len": 3}, "eval": {"lengths": (16,), "examples": 2}})
    assert {r.variant for r in rows} == set(names)


def run_train(**settings) -> list[float]:
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=18, d_model=16, n_layers=2, n_heads=2, block_size=4, memory_blocks=1)
    model = model.double()
    fields = dict(steps=3, batch_size=2, length=16, warmup_steps=1, grad_clip=None)
    report = train(model, make_task("copy", segment_len=3), TrainSettings(**{**fields, **settings}), seed=0)
    return report.losses


def test_chunked_training_equals_whole_sequence_training() -> None:
    whole = run_train()
    chunked = run_train(chunk_len=5)  # chunks 5,5,5,1 carrying the state, full BPTT
    assert chunked == pytest.approx(whole, abs=1e-10)
    truncated = run_train(chunk_len=4, detach_every=1)
    assert truncated[0] == pytest.approx(whole[0], abs=1e-10)  # same weights, same first loss
    assert truncated[1:] != pytest.approx(whole[1:], abs=1e-6)  # different gradients, different path


def test_random_state_passing_starts_from_the_carried_state() -> None:
    task = make_task("copy", segment_len=3)
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=4)
    seen: list[int] = []
    original = model.backbone.forward

    def spy(x, state=None):
        seen.append(-1 if state is None else state.pos)
        return original(x, state)

    model.backbone.forward = spy  # type: ignore[method-assign]
    report = train(model, task, TrainSettings(steps=4, batch_size=2, length=12, rsp_prob=1.0), seed=0)
    assert report.carried_steps == 3
    assert seen == [-1, 12, 24, 36]  # every step after the first continues from the previous final state
    fresh = train(model, task, TrainSettings(steps=3, batch_size=2, length=12, rsp_prob=0.0), seed=0)
    assert fresh.carried_steps == 0


def test_lr_schedule_warmup_then_cosine() -> None:
    s = TrainSettings(steps=11, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, s) == pytest.approx(0.5) and lr_factor(1, s) == pytest.approx(1.0)
    assert lr_factor(2, s) == pytest.approx(1.0)
    assert lr_factor(2 + 9 / 2, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(11, s) == pytest.approx(0.1)


# --------------------------------------------------------------- variant options
def test_variant_options_come_from_field_names() -> None:
    m = ModelSettings(block_size=8)
    assert variant_options("bswa", m) == {"memory_blocks": 1}
    assert variant_options("full", m) == {}
    assert variant_options("bswa", m, {"memory_blocks": 2}) == {"memory_blocks": 2}
    with pytest.raises(UnknownNameError, match="valid: memory_blocks"):
        variant_options("bswa", m, {"fam_len": 2})


def test_a_newly_registered_variant_uses_its_own_defaults() -> None:
    class PlainConfig(VariantConfig):
        pass

    @dataclass
    class PlainState(KVState):
        pass

    @register_variant("zz_plain_test", config=PlainConfig)
    class Plain(Full):
        State = PlainState

    try:
        assert variant_options("zz_plain_test", ModelSettings()) == {}
        rows = compare(["zz_plain_test"], "copy", **{**MICRO, "task_options": {"segment_len": 3}})
        assert {r.variant for r in rows} == {"zz_plain_test"}
    finally:
        unregister_variant("zz_plain_test")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        CompareConfig(train={"stepz": 3})
    with pytest.raises(ValueError, match="unknown variant 'nope'; registered: .*bswa"):
        CompareConfig(variants=("nope",))
    with pytest.raises(ValueError, match="unknown task 'nope'; registered: .*passkey"):
        CompareConfig(task="nope")
    with pytest.raises(ValidationError, match="more than once"):
        CompareConfig(seeds=(0, 0))
    with pytest.raises(ValidationError, match="at least 17 tokens for split 'train'"):
        CompareConfig(task="copy", train={"length": 16})  # refused before any training
    with pytest.raises(ValidationError, match="at least 32 tokens for split 'eval'"):
        CompareConfig(task="mqar", task_options={"num_pairs": 2, "eval_pairs": (8,)}, train={"length": 16})


def test_memzoo_compare_is_an_ordinary_package_imported_on_first_use() -> None:
    import types

    import memzoo.compare.runner as runner_module

    assert runner_module is runner
    assert type(memzoo.compare) is types.ModuleType and memzoo.compare.compare is compare
    code = "import sys, memzoo; print('memzoo.compare' in sys.modules); memzoo.compare; print('memzoo.compare' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"], out.stdout


# ------------------------------------------------------------- results & resume
def test_results_round_trip_and_schema_refuses_bad_files(tmp_path: Path) -> None:
    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    records = compare_runs(config, quiet=True)
    board = build_leaderboard(config, records, command="memzoo compare test")
    written = write_leaderboard(board, tmp_path)
    loaded = load_leaderboard(written["json"])
    assert loaded == board
    assert Leaderboard.model_validate_json(dump(loaded)) == board
    data = json.loads(Path(written["json"]).read_text())
    assert data["schema"] == "memzoo.compare.leaderboard/1"
    bad = dict(data, schema="memzoo.compare.leaderboard/0")
    with pytest.raises(ValidationError):
        Leaderboard.model_validate(bad)
    extra = dict(data, rows=[dict(data["rows"][0], colour="red")])
    with pytest.raises(ValidationError, match="colour"):
        Leaderboard.model_validate(extra)
    md = Path(written["md"]).read_text()
    assert "| `bswa` |" in md and "memzoo compare test" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert written["png"] == MISSING and not (tmp_path / "passkey.png").exists() and ".png" not in md
    else:
        assert Path(written["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "passkey.png" in md


def test_write_atomic_never_leaves_half_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "r.json"
    write_atomic(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_cli_writes_files_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls: list[tuple[str, int]] = []
    real = runner.run_one

    def counting(spec, config, **kwargs):
        calls.append((spec.variant, spec.seed))
        return real(spec, config, **kwargs)

    monkeypatch.setattr(runner, "run_one", counting)
    out = tmp_path / "lb"
    args = ["compare", "--task", "passkey", "--variants", "bswa,full", "--out", str(out), *MICRO_ARGS]
    assert main(args) == 0
    assert sorted(calls) == [("bswa", 0), ("full", 0)]
    table = capsys.readouterr().out
    assert "| `bswa` |" in table and "| `full` |" in table
    board = load_leaderboard(out / "passkey.json")
    assert board.command is not None and "--variants bswa,full" in board.command
    runs = sorted((out / "runs" / "passkey").glob("*.json"))
    assert [p.name.split("-")[0] for p in runs] == ["bswa", "full"]
    for p in runs:
        load(p, RunRecord)
    first = {p.name: p.read_text() for p in runs}

    # re-rendering from the JSON alone gives the same files
    md_before, json_before = (out / "passkey.md").read_text(), (out / "passkey.json").read_text()
    (out / "passkey.md").unlink()
    assert main(["render", str(out / "passkey.json")]) == 0
    assert (out / "passkey.md").read_text() == md_before and (out / "passkey.json").read_text() == json_before

    # an interrupted comparison: one run's file is missing; only that run recomputes
    calls.clear()
    runs[1].unlink()
    assert main(args) == 0
    assert calls == [("full", 0)]
    assert runs[0].read_text() == first[runs[0].name]
    again = load_leaderboard(out / "passkey.json")
    assert measured(again.rows) == measured(board.rows)

    # another setting is another experiment: nothing is reused
    calls.clear()
    assert main([*args, "--set", "train.lr=0.001"]) == 0
    assert sorted(calls) == [("bswa", 0), ("full", 0)]
    assert main(["compare", "--set", "train.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def test_cli_help_and_list(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "compare" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--variants" in capsys.readouterr().out
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in memzoo.list_variants():
        assert f"  {name} " in listed
    assert "passkey" in listed and "mqar" in listed


def test_cli_as_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(memzoo.__file__).parent.parent)}
    args = ["compare", "--task", "mqar", "--out", str(tmp_path), "--quiet", *MICRO_SIZES,
            "--set", "task_options.num_pairs=2", "--set", "task_options.eval_pairs=[2]", "--steps", "2",
            "--jobs", "1", "--variants", "bswa"]
    done = subprocess.run([sys.executable, "-m", "memzoo.cli", *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    board = load_leaderboard(tmp_path / "mqar.json")
    assert {r.variant for r in board.rows} == {"bswa"} and "| `bswa` |" in done.stdout
    # the settings stored in the file reproduce its numbers
    config = CompareConfig.model_validate(board.settings)
    again = [row for record in compare_runs(config, quiet=True) for row in record.rows]
    assert measured(again) == measured(board.rows)


def test_worker_processes_give_the_same_numbers(tmp_path: Path) -> None:
    config = CompareConfig(task="copy", variants=("bswa", "full"), **{**MICRO, "task_options": {"segment_len": 3}})
    parallel = compare_runs(config, quiet=True, jobs=2, results_dir=tmp_path)
    assert len(list((tmp_path / "copy").glob("*.json"))) == 2  # the workers wrote their runs
    serial = compare_runs(config, quiet=True, jobs=1)
    assert [measured(r.rows) for r in parallel] == [measured(r.rows) for r in serial]


# ------------------------------------------------------------------ tables
def test_table_cells_are_mean_and_std_over_seeds() -> None:
    assert cell([0.5]) == "0.500"
    assert cell([0.25, 0.75]) == f"0.500 ± {math.sqrt(0.125):.3f}"
    prov = dict(memzoo_version="0", git_commit=None, git_dirty=None, torch_version="0", python_version="3",
                device="cpu", threads=1, config_hash="0" * 16)
    rows = [
        ResultRow(variant="a", task="t", train_length=8, eval_length=8, seed=s, metric="accuracy", value=v,
                  higher_is_better=True, backend="sdpa", parameters=10, state_bytes=2048, tokens_per_s=1.0,
                  eval_tokens_per_s=1.0, wall_s=1.0, provenance=prov)
        for s, v in ((0, 0.25), (1, 0.75))
    ]
    table = markdown_table(rows)
    assert f"| `a` | 0.500 ± {math.sqrt(0.125):.3f} | 10 | 2.0 |" in table
    assert "2 seed(s): 0, 1" in table


def test_compare_refuses_config_with_task_and_an_empty_variant_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``task`` beside ``config`` used to be ignored silently (the config's task ran), and
    ``compare([])`` ran every variant where the CLI refuses ``--variants ""``."""
    calls: list = []
    monkeypatch.setattr(runner, "compare_runs", lambda *a, **k: calls.append(a) or [])
    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    for given in [{"task": "mqar"}, {"task": "passkey"}, {"variants": ["bswa"]}, {"preset": "tiny"}, {"seeds": (1,)}]:
        name = next(iter(given))
        with pytest.raises(TypeError, match=rf"pass either config=\.\.\. or variants/task/preset/fields, not both \(also given: {name}\)"):
            compare(config=config, **given)
    for empty in ([], (), "", ","):
        with pytest.raises(memzoo.MemzooError, match="variants is empty; valid: variant names"):
            compare(empty, "passkey", **MICRO)
    assert calls == []
    assert compare(config=config) == [] and len(calls) == 1  # config alone is accepted


def test_a_changed_text_corpus_changes_the_run_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The text task's run identity used to hold only the corpus's path: editing the file
    reused the old results silently (with another vocabulary, even)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh" * 8, encoding="utf-8")
    config = CompareConfig(
        task="text", variants=("bswa",), task_options={"path": str(corpus), "eval_fraction": 0.5},
        model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
        train={"steps": 1, "batch_size": 2, "length": 8, "warmup_steps": 0}, eval={"lengths": (8,), "examples": 2, "batch_size": 2},
    )
    runs = tmp_path / "runs"
    (first,) = compare_runs(config, results_dir=runs, quiet=True)
    before = runner.run_spec(config, "bswa", 0)
    assert before.task_data == {"corpus_sha256": __import__("hashlib").sha256(corpus.read_bytes()).hexdigest()}
    assert runner.run_spec(config, "bswa", 0).config_hash == before.config_hash  # the same file: the same run
    corpus.write_text("abcdefgh" * 7 + "ijklmnop", encoding="utf-8")  # the same path, other content (and vocabulary)
    after = runner.run_spec(config, "bswa", 0)
    assert after.config_hash != before.config_hash and after.task_options == before.task_options
    calls: list = []
    real = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda spec, cfg, **kw: calls.append(spec) or real(spec, cfg, **kw))
    (second,) = compare_runs(config, results_dir=runs, quiet=True)
    assert [s.config_hash for s in calls] == [after.config_hash] and second.spec == after  # trained again, not loaded
    assert len(list((runs / "text").glob("bswa-seed0-*.json"))) == 2
    with pytest.raises(memzoo.MemzooError, match="its data is not the data this run was planned with"):
        real(before, config)  # a worker whose file differs from the planned one refuses to run
    # tasks whose config says it all keep the hashes they had: no task_data in their spec
    plain = runner.run_spec(CompareConfig(task="passkey", variants=("bswa",), **MICRO), "bswa", 0)
    assert plain.task_data is None and "task_data" not in plain.model_dump(mode="json")


def test_a_skipped_plot_leaves_no_older_plot_behind(tmp_path: Path) -> None:
    """Rerunning into an --out that holds an older comparison's plots left them there when the
    new board's plots were skipped ("no rows to plot"), beside a page they are not of."""
    from memzoo.compare import RunSummary

    (tmp_path / "passkey.png").write_bytes(b"old plot")
    (tmp_path / "passkey-loss.png").write_bytes(b"old loss plot")
    (tmp_path / "mqar.png").write_bytes(b"another board's plot")
    board = Leaderboard(task="passkey", settings={}, eval_lengths=[16], variant_options={},
                        runs=[RunSummary(variant="bswa", seed=0, status="failed", error="boom")], rows=[])
    written = write_leaderboard(board, tmp_path)
    assert isinstance(written["png"], str) and isinstance(written["loss png"], str)  # both skipped: nothing to plot
    assert "removed the older passkey.png" in written["png"] and "removed the older passkey-loss.png" in written["loss png"]
    assert not (tmp_path / "passkey.png").exists() and not (tmp_path / "passkey-loss.png").exists()
    assert (tmp_path / "mqar.png").read_bytes() == b"another board's plot"  # only this board's names
    assert ".png" not in Path(written["md"]).read_text()


def test_the_seed_line_lists_the_comparisons_seeds_and_what_each_marked_cell_is_over() -> None:
    """Under partial divergence the line said "1 seed(s): 0" for a 2-seed comparison (the
    seeds with rows) and not which seeds a marked variant's cells are over."""
    from memzoo.compare import Divergence, RunSummary

    prov = dict(memzoo_version="0", git_commit=None, git_dirty=None, torch_version="0", python_version="3",
                device="cpu", threads=1, config_hash="0" * 16)
    rows = [
        ResultRow(variant=v, task="t", train_length=8, eval_length=8, seed=0, metric="accuracy", value=0.5,
                  higher_is_better=True, backend="sdpa", parameters=10, state_bytes=2048, tokens_per_s=1.0,
                  eval_tokens_per_s=1.0, wall_s=1.0, provenance=prov)
        for v in ("a", "b")
    ]
    gone = Divergence(step=1, last_finite_loss=2.0, reason="loss is nan")
    runs = [RunSummary(variant=v, seed=s, status="finished" if s == 0 else "diverged", divergence=None if s == 0 else gone)
            for v in ("a", "b") for s in (0, 1)]
    table = markdown_table(rows, runs=runs)
    assert "2 seed(s): 0, 1; cells are mean ± standard deviation over seeds." in table
    assert "its cells are over the runs that did not (`a`: seed(s) 0; `b`: seed(s) 0)." in table
    assert "1 seed(s): 0;" in markdown_table(rows, runs=[r for r in runs if r.seed == 0])  # no divergence: as before


def test_a_plot_skipped_for_want_of_matplotlib_keeps_an_older_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, re-rendering a committed board must not delete its plots: the
    older file stays, and the message says so."""
    from memzoo.compare import RunSummary, plots

    monkeypatch.setattr(plots, "plot_headline", lambda board, path: plots.MISSING)
    monkeypatch.setattr(plots, "plot_losses", lambda board, path: plots.MISSING)
    (tmp_path / "passkey.png").write_bytes(b"the board's plot")
    board = Leaderboard(task="passkey", settings={}, eval_lengths=[16], variant_options={},
                        runs=[RunSummary(variant="bswa", seed=0, status="failed", error="boom")], rows=[])
    written = write_leaderboard(board, tmp_path)
    assert "left as it was" in written["png"] and (tmp_path / "passkey.png").read_bytes() == b"the board's plot"


def test_each_metric_says_its_own_direction(tmp_path: Path) -> None:
    """A task with a bits headline (lower is better) and an accuracy metric: the accuracy
    rows and table say higher is better (the task-wide flag was stamped on every metric),
    and a run file with them verifies when loaded again."""
    from memzoo.compare.leaderboard import markdown
    from memzoo.tasks import register_task, unregister_task
    from memzoo.tasks.text import Text, TextConfig

    @register_task("text_acc_demo", config=TextConfig)
    class TextAcc(Text):
        metrics = {"bpc": "bits", "accuracy": "token_accuracy"}
        higher_is_better = False

    try:
        config = CompareConfig(
            task="text_acc_demo", variants=("bswa",), model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
            train={"steps": 1, "length": 12, "batch_size": 2}, eval={"lengths": (12,), "examples": 2},
        )
        records = compare_runs(config, quiet=True, results_dir=tmp_path)
        assert {(r.metric, r.higher_is_better) for r in records[0].rows} == {("bpc", False), ("accuracy", True)}
        page = markdown(build_leaderboard(config, records))
        assert "accuracy (higher is better)" in page and "bpc (lower is better)" in page
        (again,) = compare_runs(config, quiet=True, results_dir=tmp_path)  # loaded, verified
        assert again.rows == records[0].rows
    finally:
        unregister_task("text_acc_demo")


def test_a_plugin_field_named_like_a_builtin_one_keeps_its_own_default() -> None:
    """The small-setting table is keyed by variant and field: a plug-in's ``window``
    (previous tokens, at most 12 here) is not given sinks' ``window`` formula (15 at
    block_size 8, which its own bound then refused with a value the user never set)."""

    class WindowConfig(VariantConfig):
        window: int = Field(8, ge=0, le=12)

    @dataclass
    class WindowState(KVState):
        pass

    @register_variant("zz_window_test", config=WindowConfig)
    class Window(Full):
        State = WindowState

    try:
        assert variant_options("zz_window_test", ModelSettings(block_size=8)) == {}
        assert variant_options("sinks", ModelSettings(block_size=8))["window"] == 15
        CompareConfig(task="copy", variants=["zz_window_test"], task_options={"segment_len": 3})
    finally:
        unregister_variant("zz_window_test")


def test_a_cached_run_of_a_plugin_whose_code_changed_is_not_loaded_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run's hash covers its settings and ``git_commit`` memzoo's own code: a plug-in
    variant (or task) edited since a run was cached was loaded with no word. The run
    records its plug-in packages' source hashes; a changed one is warned about on load."""
    import importlib

    package = tmp_path / "zz_plugin_pkg"
    package.mkdir()
    source = (
        "from dataclasses import dataclass\n"
        "from memzoo.config import VariantConfig\n"
        "from memzoo.registry import register_variant\n"
        "from memzoo.variants.full import Full\n"
        "from memzoo.variants.kv import KVState\n\n"
        "class PlugConfig(VariantConfig):\n    pass\n\n"
        "@dataclass\nclass PlugState(KVState):\n    pass\n\n"
        "@register_variant('zz_plugin_code', config=PlugConfig)\n"
        "class Plug(Full):\n    State = PlugState\n"
    )
    (package / "__init__.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("zz_plugin_pkg")
    runner._source_hash.cache_clear()
    try:
        config = CompareConfig(task="passkey", variants=["zz_plugin_code"], **MICRO)
        (first,) = compare_runs(config, quiet=True, results_dir=tmp_path / "runs")
        code = first.provenance.plugin_code
        assert code is not None and set(code) == {"zz_plugin_pkg"}
        compare_runs(config, quiet=True, results_dir=tmp_path / "runs")
        assert "zz_plugin_pkg" not in capsys.readouterr().err  # unchanged: loaded without a word
        (package / "__init__.py").write_text(source + "# an edit\n")
        runner._source_hash.cache_clear()  # a new process reads the files again
        compare_runs(config, quiet=True, results_dir=tmp_path / "runs")
        assert "was made by other code of zz_plugin_pkg" in capsys.readouterr().err
        # memzoo's own variants and tasks record nothing: their run files are as they were
        assert runner.plugin_code(runner.run_spec(CompareConfig(task="passkey", variants=["bswa"], **MICRO), "bswa", 0)) is None
    finally:
        runner._source_hash.cache_clear()
        unregister_variant("zz_plugin_code")
        sys.modules.pop("zz_plugin_pkg", None)
