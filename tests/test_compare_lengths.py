"""Training lengths as a range (issue #11): ``train.length = [lo, hi]`` draws each
training sequence's length from the run's seeded generator, right-pads the batch and
feeds it with ``attention_mask``; the loss counts real scored tokens only. Checked
against the slow, obvious reference: every row run alone, unpadded, in float64.

Shapes: ``B`` batch, ``T`` (padded) length."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import memzoo
from memzoo.cli import main
from memzoo.compare import CompareConfig, compare_runs
from memzoo.compare.runner import load_finished, run_path, run_spec
from memzoo.compare.settings import TrainSettings
from memzoo.compare.trainer import (
    carry_state,
    forward_backward,
    right_padded,
    seeded,
    stream_stats,
    train,
    training_batch,
)
from memzoo.ragged import RaggedState, select_rows
from memzoo.tasks import make_task
from memzoo.testing import TOLERANCES, tiny_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
F64 = TOLERANCES[torch.float64]
VARIANTS = memzoo.list_variants()
TASK = {"n_digits": 2, "n_filler": 3, "eval_depths": (0.0, 1.0)}
MICRO = dict(
    task="passkey", task_options=TASK,
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
    train={"steps": 2, "batch_size": 4, "length": [8, 16], "warmup_steps": 1, "chunk_len": 6},
    eval={"lengths": (16,), "examples": 4, "batch_size": 4},
)


def first_options(name: str) -> dict:
    return dict(memzoo.get_variant(name).config.conformance_options[0])


# ------------------------------------------------------------------ the setting
@pytest.mark.parametrize("value", [[8, 16], (8, 16), [16, 16], [2, 3]])
def test_a_length_range_is_accepted_and_kept_exactly(value) -> None:
    t = TrainSettings(length=value)
    lo, hi = value
    assert t.length == (lo, hi) and t.length_range == (lo, hi) and (t.min_length, t.max_length) == (lo, hi)
    assert t.model_dump(mode="json")["length"] == [lo, hi]
    assert TrainSettings.model_validate_json(t.model_dump_json()) == t  # read back from a run file


def test_a_range_sets_the_default_eval_lengths_and_chunk_from_hi() -> None:
    c = CompareConfig(**{**MICRO, "eval": {"examples": 4}, "train": {**MICRO["train"], "chunk_len": None}})
    assert c.train_length == 16 and c.eval_lengths == (16, 32, 64) and c.eval_chunk == 16


@pytest.mark.parametrize("value, words", [
    ([1, 4], "lo must be >= 2"), ([9, 8], "lo must be <= hi"), ([8], "a range [lo, hi] of two ints"),
    ([8, 9, 10], "a range [lo, hi] of two ints"), ([8.0, 9], "got [8.0, 9]"), ([True, 4], "got [True, 4]"),
    ("8", "got '8'"), (True, "got True"), (1, "must be >= 2, got 1"), (None, "got None"), (16.0, "got 16.0"),
])
def test_a_bad_length_is_refused_with_a_clear_message(value, words) -> None:
    with pytest.raises(ValidationError) as info:
        TrainSettings(length=value)
    text = str(info.value)
    assert "train.length" in text and words in text, text
    assert "an int >= 2, or a range [lo, hi] of two ints with 2 <= lo <= hi" in text


def test_a_range_too_short_for_the_task_is_refused_before_training() -> None:
    with pytest.raises(ValidationError, match=r"at least 6 tokens .*got length=4 \(the shortest of train.length range \[4, 16\]\)"):
        CompareConfig(**{**MICRO, "train": {**MICRO["train"], "length": [4, 16]}})


def test_an_int_length_keeps_its_run_settings_and_hash() -> None:
    """The run file and cache key of an int-length config are what they were before ranges
    existed: the train settings dump (hashed into config_hash) is the same dict, with the
    int, and the training data stream is the task's own batch."""
    t = TrainSettings(length=16)
    assert t.model_dump(mode="json") == {
        "steps": 200, "batch_size": 16, "length": 16, "chunk_len": None, "detach_every": 0, "rsp_prob": 0.0,
        "lr": 3e-3, "weight_decay": 0.01, "decay": "matrices", "betas": [0.9, 0.95], "warmup_steps": 20,
        "min_lr_ratio": 0.1, "grad_clip": 1.0, "explode_factor": 10.0,
    }
    task = make_task("passkey", **TASK)
    batch, mask = training_batch(task, TrainSettings(batch_size=3, length=16), seeded("train-data", "passkey", 0))
    same = task.sample(3, 16, seeded("train-data", "passkey", 0), split="train")
    assert mask is None and torch.equal(batch.tokens, same.tokens) and torch.equal(batch.mask, same.mask)
    spec = run_spec(CompareConfig(**{**MICRO, "train": {**MICRO["train"], "length": 16}}), "bswa", 0)
    assert spec.train["length"] == 16


# --------------------------------------------------------------- the batches
def test_training_batches_are_deterministic_and_right_padded() -> None:
    task = make_task("passkey", **TASK)
    s = TrainSettings(batch_size=8, length=[8, 14])
    a, b = seeded("train-data", "passkey", 3), seeded("train-data", "passkey", 3)
    seen: set[int] = set()
    for _ in range(6):
        (x, mx), (y, my) = training_batch(task, s, a), training_batch(task, s, b)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets) and torch.equal(mx, my)
        lengths = mx.sum(1)
        seen |= set(lengths.tolist())
        assert mx.shape[1] == int(lengths.max()) and bool((lengths >= 8).all() and (lengths <= 14).all())
        assert torch.equal(mx, torch.arange(mx.shape[1])[None] < lengths[:, None])  # right padding
        assert not bool((x.mask & ~mx).any()) and bool((x.tokens[~mx] == 0).all())  # a pad is never scored
        assert x.mask.sum(1).tolist() == [2] * 8  # each row scores its own answer digits
    assert {8, 14} <= seen  # both ends of the range are drawn
    other = training_batch(task, s, seeded("train-data", "passkey", 4))[0]
    assert not torch.equal(other.tokens[:, :8], x.tokens[:, :8])


def test_each_row_is_what_the_task_makes_at_its_length() -> None:
    """Rows of one length are the task's batch of that length, in row order, shortest
    length first (the layout right_padded documents)."""
    task = make_task("passkey", **TASK)
    lengths = torch.tensor([12, 9, 12, 10])
    batch, real = right_padded(task, lengths, torch.Generator().manual_seed(5), pad_id=7)
    g = torch.Generator().manual_seed(5)
    for n, rows in ((9, [1]), (10, [3]), (12, [0, 2])):
        part = task.sample(len(rows), n, g, split="train")
        assert torch.equal(batch.tokens[rows, :n], part.tokens) and torch.equal(batch.mask[rows, :n], part.mask)
    assert bool((batch.tokens[~real] == 7).all()) and batch.shape == (4, 12)


# ------------------------------------------------- the loss: real tokens only
def ragged_inputs(model, lengths: list[int], *, seed: int = 0, pad: int | None = 0, extra: int = 0):
    """Random tokens/targets/scored of ``lengths`` right-padded to max + ``extra``;
    ``pad`` fills padding (None: random ids there)."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    tokens = torch.randint(0, model.vocab_size, (b, t), generator=g)
    targets = torch.randint(0, model.vocab_size, (b, t), generator=g)
    scored = torch.rand(b, t, generator=g) < 0.7
    real = torch.arange(t)[None] < torch.tensor(lengths)[:, None]
    if extra:
        tokens = torch.cat([tokens, torch.randint(0, model.vocab_size, (b, extra), generator=g)], 1)
        targets = torch.cat([targets, torch.randint(0, model.vocab_size, (b, extra), generator=g)], 1)
        scored = torch.cat([scored, torch.zeros(b, extra, dtype=torch.bool)], 1)
        real = torch.cat([real, torch.zeros(b, extra, dtype=torch.bool)], 1)
    if pad is not None:
        tokens, targets = tokens.masked_fill(~real, pad), targets.masked_fill(~real, pad)
    return tokens, targets, scored & real, real


def loss_and_grads(model, tokens, targets, scored, real, **kw):
    model.zero_grad(set_to_none=True)
    total, state = forward_backward(model, tokens, targets, scored, real, None, **kw)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, state


def assert_same(a, b, what: str) -> None:
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **F64, msg=f"{what}: loss")
    assert ga.keys() == gb.keys(), what
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **F64, msg=f"{what}: gradient of {name}")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("chunk_len, detach_every", [(None, 0), (3, 2)])
def test_padded_batch_loss_and_gradients_equal_rows_alone(name, chunk_len, detach_every) -> None:
    """The padded batch's loss (mean over its real scored tokens) and its gradients equal
    the sum of every row's alone (unpadded, no mask) with the same denominator, in
    float64; chunked with the gradient cut every 2 chunks too."""
    model = tiny_model(name, first_options(name))
    lengths = [9, 4, 7, 9, 2]
    tokens, targets, scored, real = ragged_inputs(model, lengths)
    denominator = scored.sum().double()
    kw = dict(chunk_len=chunk_len, detach_every=detach_every, denominator=denominator)
    total, grads, state = loss_and_grads(model, tokens, targets, scored, real, **kw)
    alone_total, alone_grads = torch.zeros((), dtype=torch.float64), {}
    for i, n in enumerate(lengths):
        t, g, s = loss_and_grads(model, tokens[i:i + 1, :n], targets[i:i + 1, :n], scored[i:i + 1, :n], None, **kw)
        alone_total = alone_total + t
        for k, v in g.items():
            alone_grads[k] = alone_grads.get(k, 0) + v
        assert s.pos == n
    assert_same((total, grads), (alone_total, alone_grads), f"{name}: padded batch vs rows alone")
    assert isinstance(state, RaggedState) and state.positions.tolist() == lengths


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("chunk_len", [None, 4])
def test_a_step_that_keeps_no_state_runs_its_last_chunk_as_one_call(name, chunk_len) -> None:
    """``keep_state=False`` (the trainer without random state passing): the last chunk of
    a padded batch is one backbone call (``return_state=False``), and the loss and every
    gradient equal the step that keeps its state (one call per distinct row length)."""
    model = tiny_model(name, first_options(name))
    tokens, targets, scored, real = ragged_inputs(model, [9, 4, 7, 9, 2])
    kw = dict(chunk_len=chunk_len, detach_every=0, denominator=scored.sum().double())
    kept = loss_and_grads(model, tokens, targets, scored, real, **kw)
    calls = []
    step = model.backbone.step
    model.backbone.step = lambda x, st: calls.append(x.shape) or step(x, st)  # type: ignore[method-assign]
    try:
        model.zero_grad(set_to_none=True)
        total, state = forward_backward(model, tokens, targets, scored, real, None, keep_state=False, **kw)
    finally:
        del model.backbone.step
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert state is None
    assert_same((total, grads), kept[:2], f"{name}: keep_state=False vs True")
    last_start = 0 if chunk_len is None else (tokens.shape[1] - 1) // chunk_len * chunk_len
    in_last = real[:, last_start:].sum(dim=1)  # the last chunk's real tokens per row
    # one call: every row with real tokens there, for the longest of them
    assert tuple(calls[-1][:2]) == (int((in_last > 0).sum()), int(in_last.max())), calls
    if chunk_len is None:
        assert len(calls) == 1


@pytest.mark.parametrize("name", VARIANTS)
def test_return_state_false_equals_the_ragged_call_left_and_right_padded(name) -> None:
    """``model(tokens, attention_mask=mask, return_state=False)`` (one call: real tokens
    moved to the front) gives the ragged call's logits and gradients, with left, right
    and two-sided padding and a row with no real token; its state is None."""
    model = tiny_model(name, first_options(name))
    tokens = torch.randint(0, model.vocab_size, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 11, dtype=torch.long)
    mask[0] = 1
    mask[1, 5:] = 1
    mask[2, 2:7] = 1
    got, state = model(tokens, attention_mask=mask, return_state=False)
    want, _ = model(tokens, attention_mask=mask)
    assert state is None
    torch.testing.assert_close(got, want, **F64)
    params = list(model.parameters())
    g_got = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    g_want = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for p_got, p_want in zip(g_got, g_want):
        assert (p_got is None) == (p_want is None)
        if p_got is not None:
            torch.testing.assert_close(p_got, p_want, **F64)


@pytest.mark.parametrize("name", VARIANTS)
def test_pad_ids_and_pad_count_change_nothing(name) -> None:
    model = tiny_model(name, first_options(name))
    lengths = [6, 3, 8]
    base = ragged_inputs(model, lengths, pad=0)
    kw = dict(chunk_len=4, detach_every=0, denominator=base[2].sum().double())
    ref = loss_and_grads(model, *base, **kw)[:2]
    for what, inputs in (
        ("pad id 5", ragged_inputs(model, lengths, pad=5)),
        ("random ids at padding", ragged_inputs(model, lengths, pad=None)),
        ("3 more pad columns", ragged_inputs(model, lengths, pad=None, extra=3)),
    ):
        assert_same(loss_and_grads(model, *inputs, **kw)[:2], ref, f"{name}: {what}")


def test_train_loss_is_the_mean_over_real_scored_tokens_of_the_batch() -> None:
    """train()'s first loss is the rows-alone reference over the batch it drew: every row
    unpadded, summed, divided by the batch's scored tokens (float64)."""
    task = make_task("passkey", **TASK)
    model = tiny_model("bswa", first_options("bswa"), vocab_size=task.vocab_size).train()
    settings = TrainSettings(steps=1, batch_size=5, length=[8, 13], warmup_steps=1, chunk_len=5)
    batch, real = training_batch(task, settings, seeded("train-data", "passkey", 0))
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i, n in enumerate(real.sum(1).tolist()):
            logits = model(batch.tokens[i:i + 1, :n]).logits
            nll = torch.nn.functional.cross_entropy(logits[0], batch.targets[i, :n], reduction="none")
            expected += (nll * batch.mask[i, :n]).sum()
    expected /= batch.mask.sum()
    report = train(model, task, settings, seed=0)
    assert report.losses[0] == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    assert report.tokens == int(real.sum())  # real tokens, not padded positions


# ------------------------------------------------------- chunks, TBPTT, RSP
@pytest.mark.parametrize("name", VARIANTS)
def test_training_with_a_range_chunks_detach_and_random_state_passing(name) -> None:
    """Every variant trains on a length range with chunks, the gradient cut every chunk
    and every later step starting from the previous (ragged) state; deterministic."""
    task = make_task("passkey", **TASK)
    settings = TrainSettings(steps=3, batch_size=4, length=[8, 15], warmup_steps=1, chunk_len=5, detach_every=1,
                             rsp_prob=1.0)

    def run():
        model = tiny_model(name, first_options(name), vocab_size=task.vocab_size, dtype=torch.float32).train()
        return train(model, task, settings, seed=1), model

    (one, m1), (two, m2) = run(), run()
    assert one.diverged is None and one.carried_steps == 2 and len(one.losses) == 3
    assert one.losses == two.losses
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", VARIANTS)
def test_a_ragged_state_is_carried_group_by_group(name) -> None:
    model = tiny_model(name, first_options(name))
    tokens, targets, scored, real = ragged_inputs(model, [7, 3, 7])
    _, _, state = loss_and_grads(model, tokens, targets, scored, real, chunk_len=None, detach_every=0, denominator=1.0)
    carried = carry_state(model, state)
    expected = [model.backbone.carry_state(state.row(i)) for i in range(3)]
    rows = carried.rows() if isinstance(carried, RaggedState) else [select_rows(carried, [i]) for i in range(3)]
    for i, (got, want) in enumerate(zip(rows, expected)):
        assert got.pos == want.pos, (name, i)
        for a, b in zip(got.tensors(), want.tensors()):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, **F64)


# --------------------------------------------------------------- evaluation
@pytest.mark.parametrize("name", VARIANTS)
def test_a_ragged_eval_batch_gives_every_row_its_own_stats(name) -> None:
    """The streaming evaluator with a mask: each row's sums (scored, correct, nll) equal
    the row evaluated alone, unpadded (compare's evaluate feeds one length per batch;
    this is the path a mixed-length batch takes)."""
    model = tiny_model(name, first_options(name))
    lengths = [10, 3, 7, 10]
    tokens, targets, scored, real = ragged_inputs(model, lengths, pad=None)
    stats, state = stream_stats(model, tokens, targets, scored, chunk_len=4, attention=real)
    for i, n in enumerate(lengths):
        alone, s = stream_stats(model, tokens[i:i + 1, :n], targets[i:i + 1, :n], scored[i:i + 1, :n], chunk_len=4)
        for f in ("scored", "correct", "nll"):
            torch.testing.assert_close(getattr(stats, f)[i:i + 1], getattr(alone, f), **F64, msg=f"{name} row {i} {f}")
    assert state.positions.tolist() == lengths


# ------------------------------------------------------------- end to end
def test_a_tiny_compare_with_a_length_range_runs_and_resumes(tmp_path: Path) -> None:
    config = CompareConfig(**{**MICRO, "variants": ("bswa", "fam"), "variant_options": {"fam": {"fam_len": 2}}})
    records = compare_runs(config, quiet=True, results_dir=tmp_path)
    assert [r.status for r in records] == ["finished", "finished"]
    for record in records:
        assert record.spec.train["length"] == [8, 16]
        assert {r.train_length for r in record.rows} == {16} and {r.eval_length for r in record.rows} == {16}
        spec = run_spec(config, record.spec.variant, 0)
        again = load_finished(run_path(tmp_path, spec), spec)[0]
        assert again == record  # the run file of a range is verified and reused
    assert records[0].losses != records[1].losses


def test_the_cli_takes_a_length_range(tmp_path: Path, capsys) -> None:
    args = ["compare", "--variants", "bswa", "--steps", "2", "--no-progress", "--quiet", "--out", str(tmp_path),
            "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.block_size=4",
            "--set", "train.batch_size=4", "--set", "train.length=[8,16]", "--set", "train.warmup_steps=1",
            "--set", "eval.lengths=[16]", "--set", "eval.examples=4", "--set", "task_options.n_digits=2"]
    assert main(args) == 0, capsys.readouterr().err
    board = json.loads((tmp_path / "passkey.json").read_text())
    assert board["settings"]["train"]["length"] == [8, 16]
    assert main([*args[:-2], "--set", "train.length=[9,8]"]) != 0
    assert "lo must be <= hi" in capsys.readouterr().err


DDP_SCRIPT = '''
import sys, torch
import memzoo
from memzoo.compare import distributed
from memzoo.compare.settings import TrainSettings
from memzoo.compare.trainer import train
from memzoo.tasks import make_task

torch.set_num_threads(1)
out = sys.argv[1]
ctx = distributed.context("cpu")
task = make_task("passkey", n_digits=2, n_filler=3)
torch.manual_seed(0)
model = memzoo.build_model("fam", vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=4, fam_len=2)
settings = TrainSettings(steps=4, batch_size=4, length=[8, 20], warmup_steps=1, chunk_len=4, detach_every=1, rsp_prob=0.5)
report = train(model, task, settings, seed=0, dist=ctx)
if ctx is None or ctx.is_main:
    torch.save({"losses": report.losses, "params": model.state_dict()}, out)
'''


def test_ddp_training_on_a_range_equals_one_process(tmp_path: Path) -> None:
    """2 gloo processes, each with half of the global batch and its mask (chunks, TBPTT
    every chunk, RSP): the same losses and parameters as one process, including chunks
    in which one rank's rows are all padding."""
    task = make_task("passkey", n_digits=2, n_filler=3)
    settings = TrainSettings(steps=4, batch_size=4, length=[8, 20], chunk_len=4)
    data, idle = seeded("train-data", "passkey", 0), 0
    for _ in range(settings.steps):
        _, real = training_batch(task, settings, data)
        for a in range(0, real.shape[1], 4):
            idle += sum(not bool(real[rows, a:a + 4].any()) for rows in (slice(0, 2), slice(2, 4)))
    assert idle > 0  # the case DDP's reducer needs every parameter for is exercised
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two.pt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(one["losses"]) == len(two["losses"]) == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, atol=1e-5, rtol=1e-4, msg=name)


# -------------------------------------------------------------- the benchmark
def test_bench_ragged_runs_and_counts_the_waves(capsys) -> None:
    """benchmarks/bench_ragged.py (smoke: one round, no timing claims): the padding is
    exactly the fraction asked, the mask path of right-padded rows makes one backbone call
    per distinct length, the plain and all-ones feeds one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_ragged", ROOT / "benchmarks" / "bench_ragged.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert sum(64 - n for n in bench.padded_lengths(16, 64, 0.1, seed=3)) == round(0.1 * 16 * 64)
    report = bench.main(["--variants", "bswa", "fam", "--rounds", "1", "--inner", "1", "--warmup", "0"])
    capsys.readouterr()
    s = report["setting"]
    assert (s["B"], s["T"], s["d_model"]) == (16, 64, 64) and abs(s["pad_fraction"] - 0.1) < 1 / (16 * 64)
    for row in report["results"].values():
        assert row["calls"] == {"unpadded": 1, "padded": s["distinct_lengths"], "ones": 1, "padded_stateless": 1}
        assert row["padded_over_unpadded"] > 0 and row["ones_over_unpadded"] > 0


# ----------------------------------------------------------------- train.compile
def test_compile_is_out_of_the_hash_when_off_and_in_it_when_on() -> None:
    off = run_spec(CompareConfig(**MICRO), "bswa", 0)
    assert "compile" not in off.train
    on = run_spec(CompareConfig(**{**MICRO, "train": {**MICRO["train"], "compile": True}}), "bswa", 0)
    assert on.train["compile"] is True and on.config_hash != off.config_hash
    with pytest.raises(ValidationError):
        TrainSettings(compile=1)


def test_compile_options_use_the_cpp_wrapper_only_for_small_cpu_steps(tmp_path, monkeypatch) -> None:
    """cpp_wrapper pays off only where a step is per-kernel overhead and its generated code
    is small; at bench_train's mid size g++ on FAM's generated wrapper ran for over 15
    minutes. The trainer passes the shape of one compiled call (a chunk when
    ``train.chunk_len`` is set, the longest length of a range)."""
    import memzoo.compare.trainer as trainer_mod
    from memzoo.compare.trainer import CPP_WRAPPER_MAX_BLOCKS, CPP_WRAPPER_MAX_ELEMENTS, compile_options

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    leaderboard = {"rows": 16, "tokens": 64, "d_model": 64, "n_layers": 2, "block_size": 8}
    assert compile_options(cpu, **leaderboard) == {"cpp_wrapper": True}
    assert compile_options(cuda, **leaderboard) == {}
    assert compile_options(cpu, **{**leaderboard, "tokens": 4096, "rows": 2, "d_model": 256, "n_layers": 4, "block_size": 256}) == {}  # mid
    assert compile_options(cpu, **{**leaderboard, "tokens": 512}) == {}  # few elements, but 2 x 64 unrolled blocks
    assert compile_options(cpu, **{**leaderboard, "tokens": 8 * CPP_WRAPPER_MAX_BLOCKS // 2 + 1}) == {}  # one block more
    assert compile_options(cpu, **{**leaderboard, "rows": CPP_WRAPPER_MAX_ELEMENTS // (64 * 64) + 1}) == {}
    assert compile_options(cpu, **{**leaderboard, "rows": CPP_WRAPPER_MAX_ELEMENTS // (64 * 64)}) == {"cpp_wrapper": True}
    for bad in ({"rows": 0}, {"tokens": -1}, {"block_size": 8.0}, {"d_model": True}):
        with pytest.raises(ValueError, match="every size must be an int >= 1"):
            compile_options(cpu, **{**leaderboard, **bad})
    seen = []
    monkeypatch.setattr(trainer_mod, "compile_module", lambda net, device, **step: seen.append(step) or net)
    base = ["compare", "--variants", "bswa", "--steps", "1", "--jobs", "1", "--compile", "--set", "train.length=[8,12]",
            "--set", 'task_options={"n_digits": 2, "n_filler": 3}', "--set", "eval.lengths=[16]", "--set", "eval.examples=4",
            "--set", "train.batch_size=4", "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--set", "model.block_size=4"]
    assert main([*base, "--results-dir", str(tmp_path / "a")]) == 0
    assert main([*base, "--set", "train.chunk_len=5", "--results-dir", str(tmp_path / "b")]) == 0
    shape = {"rows": 4, "d_model": 16, "n_layers": 1, "block_size": 4}
    assert seen == [{**shape, "tokens": 12}, {**shape, "tokens": 5}]


def test_compare_compile_trains_through_torch_compile_and_times_the_first_step_apart(tmp_path, monkeypatch) -> None:
    """``memzoo compare --compile``: the model trains through ``torch.compile`` (traced with
    the eager backend here: no codegen), the first step's time is ``compile_s``, and the
    losses equal an eager run's (float32)."""
    import memzoo.compare.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "COMPILE_BACKEND", "eager")
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real_compile(m, **kw))
    base = ["compare", "--variants", "bswa", "--steps", "3", "--jobs", "1", "--set", "train.length=[8,16]",
            "--set", 'task_options={"n_digits": 2, "n_filler": 3}', "--set", "eval.lengths=[16]",
            "--set", "eval.examples=4", "--set", "train.batch_size=4", "--set", "model.d_model=16",
            "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.block_size=4"]
    assert main([*base, "--results-dir", str(tmp_path / "c"), "--compile"]) == 0
    assert main([*base, "--results-dir", str(tmp_path / "e")]) == 0
    assert calls and calls[0]["backend"] == "eager"
    (compiled,), (eager,) = (list((tmp_path / d).rglob("bswa-*.json")) for d in ("c", "e"))
    rc, re_ = json.loads(compiled.read_text()), json.loads(eager.read_text())
    assert rc["rows"][0]["compile_s"] > 0 and re_["rows"][0]["compile_s"] is None
    assert rc["spec"]["train"]["compile"] is True and "compile" not in re_["spec"]["train"]
    torch.testing.assert_close(torch.tensor(rc["losses"]), torch.tensor(re_["losses"]), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------- train.non_finite
def test_train_non_finite_propagate_trains_the_same_steps_without_the_isolation(tmp_path, monkeypatch) -> None:
    """``train.non_finite = "propagate"``: every training step runs under
    :func:`memzoo.ops.propagate_non_finite` and evaluation does not (the flag as each one
    sees it); the run trains and scores like the default one (finite data; what the switch
    does to attention calls is tests/test_propagate_non_finite.py's). The setting is in the
    run hash only when it is not the default, and a value other than the two is refused,
    naming them."""
    import memzoo.compare.runner as runner_mod
    import memzoo.compare.trainer as trainer_mod
    from memzoo import ops

    seen: list[tuple[str, bool]] = []
    real_fb, real_eval = trainer_mod.forward_backward, runner_mod.evaluate
    monkeypatch.setattr(trainer_mod, "forward_backward", lambda *a, **k: seen.append(("train", ops.isolating_non_finite())) or real_fb(*a, **k))
    monkeypatch.setattr(runner_mod, "evaluate", lambda *a, **k: seen.append(("eval", ops.isolating_non_finite())) or real_eval(*a, **k))
    base = ["compare", "--variants", "fam", "--steps", "3", "--jobs", "1", "--set", "train.length=[8,16]",
            "--set", 'task_options={"n_digits": 2, "n_filler": 3}', "--set", "eval.lengths=[16]",
            "--set", "eval.examples=4", "--set", "train.batch_size=4", "--set", "model.d_model=16",
            "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.block_size=4"]
    assert main([*base, "--results-dir", str(tmp_path / "p"), "--set", "train.non_finite=propagate"]) == 0
    assert seen and all(isolate is (kind == "eval") for kind, isolate in seen), seen
    assert {kind for kind, _ in seen} == {"train", "eval"}
    seen.clear()
    assert main([*base, "--results-dir", str(tmp_path / "i")]) == 0
    assert seen and all(isolate for _, isolate in seen)
    assert ops.isolating_non_finite()
    (propagated,), (isolated,) = (list((tmp_path / d).rglob("fam-*.json")) for d in ("p", "i"))
    rp, ri = json.loads(propagated.read_text()), json.loads(isolated.read_text())
    assert rp["losses"] == ri["losses"] and len(rp["losses"]) == 3
    assert rp["spec"]["train"]["non_finite"] == "propagate" and "non_finite" not in ri["spec"]["train"]
    off = run_spec(CompareConfig(**MICRO), "bswa", 0)
    on = run_spec(CompareConfig(**{**MICRO, "train": {**MICRO["train"], "non_finite": "propagate"}}), "bswa", 0)
    assert "non_finite" not in off.train and on.config_hash != off.config_hash
    with pytest.raises(ValidationError, match="'isolate' or 'propagate'"):
        TrainSettings(non_finite="ignore")
