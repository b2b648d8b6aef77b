"""The benchmark scripts run and report what they say (fast smoke runs; no timing assertions)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_counts_full_attention_pairs_in_closed_form(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_train")
    report = bench.main(["--variants", "full", "--rounds", "1", "--inner", "1", "--warmup", "0"])
    capsys.readouterr()
    assert set(report["results"]) == {"bswa", "full"}  # bswa always runs: it is the unit
    s = report["setting"]
    # full: every query sees itself and every earlier position, in every layer and head
    expected = s["B"] * s["n_heads"] * s["n_layers"] * s["T"] * (s["T"] + 1) // 2
    full = report["results"]["full"]
    assert full["attention_pairs_times_heads"] == expected
    assert report["results"]["bswa"]["attention_pairs_times_heads"] < expected  # a window sees fewer keys
    assert report["results"]["bswa"]["vs_bswa_median"] == 1.0
    for row in report["results"].values():
        assert row["tokens_per_s"] > 0 and 0 < row["fraction_of_matmul"]


def test_bench_train_times_compiled_steps_with_and_without_the_isolation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--non-finite both``: each compiled step also runs under propagate_non_finite, in
    the same rounds, with the ratio between the two. (torch.compile replaced by the
    function itself here: what is checked is which steps run under which setting.)"""
    from memzoo import ops

    bench = load("bench_train")
    isolating: list[bool] = []
    real_loss = bench.training_loss

    def recording_loss(model, tokens):  # type: ignore[no-untyped-def]
        isolating.append(ops.isolating_non_finite())
        return real_loss(model, tokens)

    monkeypatch.setattr(bench, "training_loss", recording_loss)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    report = bench.main(["--variants", "full", "--compile", "--non-finite", "both", "--rounds", "2", "--inner", "1", "--warmup", "0"])
    capsys.readouterr()
    rows = report["results"]
    assert set(rows) == {f"{v}{k}" for v in ("bswa", "full") for k in ("", "+compiled", "+compiled(propagate)")}
    for v in ("bswa", "full"):
        assert rows[f"{v}+compiled(propagate)"]["isolating_over_propagating_median"] > 0
        assert "isolating_over_propagating_median" not in rows[f"{v}+compiled"]
    assert report["non_finite"] == "both"
    # each compiled step, 2 contenders x (the compiling first call + 2 rounds): one set isolating, one not;
    # plus each contender's untimed eager step that counts the executed FLOPs (isolating)
    assert isolating.count(False) == 6 and isolating.count(True) == 6 + 2
    assert ops.isolating_non_finite()
    with pytest.raises(SystemExit):
        bench.main(["--non-finite", "both"])  # without --compile: refused
    assert "add --compile" in capsys.readouterr().err


def test_bench_train_covers_the_registry_and_xl_with_rope() -> None:
    import memzoo

    bench = load("bench_train")
    labels = bench.contenders(bench.SIZES["leaderboard"], None)
    assert set(labels) == set(memzoo.list_variants()) | {"xl(rope)"}
    assert labels["xl(rope)"][1]["positions"] == "rope"
    mid = bench.contenders(bench.SIZES["mid"], ["fam", "xl"])
    assert mid["fam"][1]["fam_len"] == 16 and mid["fam"][1]["memory_blocks"] == 1
    assert mid["xl"][1]["memory_len"] == 256


def test_gpu_check_says_there_is_no_gpu_and_exits_0(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, on any machine
    env.pop("GPU_CHECK_DEVICE", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    import json

    assert json.loads(out.read_text())["cuda"] is False


def test_gpu_check_benchmark_code_runs_small_on_cpu(tmp_path: pathlib.Path) -> None:
    """The benchmark part at a toy size on CPU (no GPU here): sdpa measured, the backends
    that cannot train here skipped with their reasons."""
    import json

    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_T": "256",
           "GPU_CHECK_DTYPE": "float32", "GPU_CHECK_BLOCK": "32", "GPU_CHECK_HEADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["bench_rc"] == 0 and report["tests_rc"] is None
    cases = report["bench"]["cases"]
    for variant in ("bswa", "fam"):
        assert cases[f"{variant}/sdpa"]["useful_flops_per_s"] > 0
        assert cases[f"{variant}/sdpa+propagate"]["useful_flops_per_s"] > 0
        assert "skipped" in cases[f"{variant}/flex"] or "seconds" in cases[f"{variant}/flex"]
        assert "skipped" in cases[f"{variant}/xformers"] or "seconds" in cases[f"{variant}/xformers"]
    assert report["bench"]["dense_causal_sdpa"]["flops_per_s"] > 0


def test_bench_backends_position_wise_baseline_sees_no_other_token_and_divides_the_growth() -> None:
    """The cost-growth baseline is position-wise (a token's loss terms do not depend on any
    other token), has the variants' linear layers, and each variant's growth is reported
    over it."""
    import memzoo

    bench = load("bench_backends")
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=256, d_model=32, n_heads=2, n_layers=2, block_size=8)
    tokens = torch.randint(0, 256, (1, 12))
    emb = model.embed.weight
    grads = []
    for t in (tokens, torch.cat([tokens[:, :5], (tokens[:, 5:6] + 1) % 256, tokens[:, 6:]], dim=1)):
        emb.grad = None
        bench.position_wise_step(model, t).backward()
        grads.append(emb.grad.clone())
    # only the rows of the changed token (old and new) can move
    moved = ((grads[0] - grads[1]).abs().sum(1) > 0).nonzero().flatten().tolist()
    assert set(moved) <= {int(tokens[0, 5]), (int(tokens[0, 5]) + 1) % 256} and moved
    for layer in model.backbone.layers:  # it uses each layer's V, O and MLP weights
        assert layer.self_attn.v_proj.weight.grad is not None and layer.self_attn.o_proj.weight.grad is not None
    trains, infers = "forward+backward", "forward (inference-only backend here)"
    rows = bench.growth([
        {"variant": v, "backend": b, "T": t, "step_s": s, "mode": m}
        for v, b, t, s, m in ((bench.POSITION_WISE, "none", 2, 1.0, trains), (bench.POSITION_WISE, "none", 16, 10.0, trains),
                              ("bswa", "sdpa", 2, 2.0, trains), ("bswa", "sdpa", 16, 18.0, trains),
                              ("bswa", "flex", 2, 1.0, infers), ("bswa", "flex", 16, 9.0, infers))
    ], 2, 16)
    by = {(r["variant"], r["backend"]): r for r in rows}
    assert by[(bench.POSITION_WISE, "none")]["time_ratio"] == 10.0 and "over_position_wise" not in by[(bench.POSITION_WISE, "none")]
    assert by[("bswa", "sdpa")]["time_ratio"] == 9.0 and by[("bswa", "sdpa")]["over_position_wise"] == pytest.approx(0.9)
    # the baseline trains: a forward-only growth is not divided by it
    assert by[("bswa", "flex")]["time_ratio"] == 9.0 and "over_position_wise" not in by[("bswa", "flex")]


def test_bench_backends_huge_pages_both_runs_every_cell_off_then_on_and_grows_each_apart() -> None:
    """``--huge-pages both``: every cell twice, its subprocess told THP_MEM_ALLOC_ENABLE=0
    then 1 (the cell reports what it saw), and a growth per setting, each over that
    setting's own position-wise baseline."""
    import json

    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_backends.py"), "--variants", "bswa", "--backends", "sdpa",
         "--lengths", "16", "32", "--growth", "16", "32", "--d-model", "16", "--n-heads", "2", "--block-size", "8",
         "--repeats", "1", "--long-repeats", "1", "--decode-tokens", "1", "--threads", "1", "--huge-pages", "both"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["environment"]["huge_pages"] == "both" and report["environment"]["THP_MEM_ALLOC_ENABLE"] is None
    cells = [(r["variant"], r["T"], r["huge_pages"], r["THP_MEM_ALLOC_ENABLE"]) for r in report["results"] if "step_s" in r]
    bench = load("bench_backends")
    expected = [(v, t, pages, "1" if pages else "0") for v in (bench.POSITION_WISE, "bswa") for t in (16, 32) for pages in (False, True)]
    assert sorted(cells, key=str) == sorted(expected, key=str)
    assert all(r["minor_faults_per_step"] >= 0 for r in report["results"] if "step_s" in r)
    rows = {(r["variant"], r["huge_pages"]): r for r in report["cost_growth"]}
    assert set(rows) == {(v, pages) for v in (bench.POSITION_WISE, "bswa") for pages in (False, True)}
    steps = {(r["variant"], r["T"], r["huge_pages"]): r["step_s"] for r in report["results"] if "step_s" in r}
    for pages in (False, True):
        bswa, base = rows[("bswa", pages)], rows[(bench.POSITION_WISE, pages)]
        assert bswa["time_ratio"] == pytest.approx(steps[("bswa", 32, pages)] / steps[("bswa", 16, pages)])
        assert bswa["over_position_wise"] == pytest.approx(bswa["time_ratio"] / base["time_ratio"])


def test_bench_backends_cell_environment_sets_only_what_it_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load("bench_backends")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert bench.cell_environment(None)["THP_MEM_ALLOC_ENABLE"] == "1"  # inherit: as it is
    assert bench.cell_environment(False)["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    assert "THP_MEM_ALLOC_ENABLE" not in bench.cell_environment(None)
    assert bench.cell_environment(True)["THP_MEM_ALLOC_ENABLE"] == "1"
    assert bench.HUGE_PAGES == {"inherit": (None,), "on": (True,), "both": (False, True)}


def test_bench_decode_profiles_a_variant_without_sizes_of_its_own(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--profile infini`` (a registered variant the script has no sizes for) runs with its
    defaults, as the timings do (it raised a KeyError)."""
    bench = load("bench_decode")
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--profile", "infini"])
    monkeypatch.setattr(bench, "profile", lambda name, steps=500, real=bench.profile: real(name, steps=2))
    bench.main()
    assert '"variant": "infini"' in capsys.readouterr().out


def test_bench_ragged_row_lengths_stay_in_1_to_t_and_refuse_impossible_fractions(capsys: pytest.CaptureFixture[str]) -> None:
    """Every row keeps 1..T real tokens at any padding fraction (at 0.6 the first draw went past
    T and left rows of negative length: all padding, and a reported fraction that was not the
    batch's); a fraction no batch can have is refused by the command line."""
    bench = load("bench_ragged")
    assert bench.padded_lengths(16, 64, 0.1) == [61, 60, 63, 61, 52, 60, 60, 50, 58, 60, 51, 53, 60, 56, 53, 64]  # docs/benchmarks.md
    for fraction in (0.0, 0.5, 0.6, 0.9, 63 / 64):
        lengths = bench.padded_lengths(16, 64, fraction)
        assert all(1 <= n <= 64 for n in lengths), (fraction, lengths)
        assert 16 * 64 - sum(lengths) == round(fraction * 16 * 64)
    with pytest.raises(ValueError, match="at least one real token"):
        bench.padded_lengths(16, 64, 1.5)
    with pytest.raises(SystemExit):
        bench.main(["--pad-fraction", "-0.1", "--variants", "bswa", "--rounds", "1"])
    assert "--pad-fraction -0.1" in capsys.readouterr().err


def test_smollm2_perplexity_quick_keeps_the_lengths_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    """The docstring's ``--variants bswa --lengths 2048 --quick`` measured 512 tokens (``--quick``
    overwrote the lengths); a variant the script has no fields for was a KeyError."""
    bench = load("smollm2_perplexity")
    args = bench.parse_args(["--variants", "bswa", "--lengths", "2048", "--quick"])
    assert args.lengths == [2048] and args.tail == 128
    assert bench.parse_args(["--quick"]).lengths == [512]
    default = bench.parse_args([])
    assert default.lengths == [2048, 9216] and default.tail == 1024
    assert bench.parse_args(["--quick", "--tail", "64"]).tail == 64
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "sinks"])
    assert "invalid choice: 'sinks'" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["bench_train", "bench_ragged"])
@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--inner", "0"], ["--threads", "0"], ["--warmup", "-1"], ["--variants", "nope"]])
def test_bench_train_and_ragged_refuse_bad_counts_on_the_command_line(
    script: str, bad: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A count that cannot be timed is an argparse error naming the option, before any model is
    built (it was a StatisticsError, a RuntimeError or an UnknownNameError traceback after the
    warm-ups, and ``--inner 0`` was silently the default)."""
    bench = load(script)
    with pytest.raises(SystemExit):
        bench.main(bad)
    assert bad[0] in capsys.readouterr().err


def test_bench_train_refuses_a_zero_matmul(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load("bench_train").main(["--matmul-n", "0"])
    assert "--matmul-n" in capsys.readouterr().err


def test_bench_peers_refuses_decode_points_out_of_order_and_zero_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """``--decode-points 64 16`` timed the second point after 64 + a segment of tokens and
    labelled it ``tokens_streamed_before: 16``; ``--repeats 0`` was a StatisticsError."""
    bench = load("bench_peers")
    assert bench.parse_args(["--decode-points", "16", "64"]).decode_points == [16, 64]
    for bad in (["--decode-points", "64", "16"], ["--decode-points", "16", "16"], ["--repeats", "0"], ["--segment", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert bad[0] in capsys.readouterr().err


def test_bench_backends_replays_xl_attention_with_its_relative_position_keys() -> None:
    """xl's (default) attention calls carry relative-position keys; the replayed "largest call"
    dropped them and timed a plain call xl never makes."""
    bench = load("bench_backends")

    class Args:
        d_model, n_heads, n_layers, block_size = 16, 2, 1, 8

    cell = dict(variant="xl", backend="sdpa", T=32, device="cpu", dtype="float32", d_model=16, n_heads=2, n_layers=1,
                block_size=8, options=bench.bench_options("xl", Args), repeats=1, decode_tokens=1, prefill_chunk=32, threads=1)
    call = bench.run_cell(cell)["attention"]["call"]
    assert call["relative_keys"] is not None and call["relative_keys"]["rel_q"][:3] == call["q"][:3]
    rope = bench.run_cell({**cell, "options": {**cell["options"], "positions": "rope"}})["attention"]["call"]
    assert rope["relative_keys"] is None


def test_sinks_perplexity_reports_no_positions_as_null_not_nan() -> None:
    """``--tokens`` below ``--cache`` leaves no position after the cache is full: its perplexity
    was printed as a bare NaN, which is not JSON (jq, JSON.parse and allow_nan=False refuse it)."""
    import json

    bench = load("sinks_perplexity")
    assert bench.ppl(torch.empty(0)) is None
    assert bench.ppl(torch.tensor([0.0, 0.0])) == 1.0
    json.dumps({"ppl_after_cache_full": bench.ppl(torch.empty(0))}, allow_nan=False)


def test_bench_decode_prints_json_lines_and_refuses_unknown_variants(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stdout is one JSON document per line (the rows were lines but the closing report was an
    indented document, so the stream was neither one JSON document nor JSON Lines); an unknown
    variant is an argparse error, not a pydantic traceback. (The timing itself is stubbed.)"""
    import json

    bench = load("bench_decode")
    monkeypatch.setattr(bench, "bench_variant", lambda name, opts, pos, repeats, compile_: {
        "variant": name, "streamed": pos, "decode_step_over_bare": 1.0})
    bench.main(["--quick", "--variants", "bswa,fam"])
    lines = capsys.readouterr().out.splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d.get("variant") for d in docs[:-1]] == ["bswa", "bswa", "fam", "fam"]
    assert docs[-1]["benchmark"] == "decode" and len(docs[-1]["rows"]) == 4
    with pytest.raises(SystemExit):
        bench.main(["--variants", "nope"])
    assert "--variants" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--variants", "sinks"], ["--trials", "0"], ["--lengths", "1k"]])
def test_passkey_smollm2_refuses_bad_options_before_loading_the_model(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--variants sinks`` was a KeyError after the GGUF loaded, ``--trials 0`` a ZeroDivisionError."""
    bench = load("passkey_smollm2")
    with pytest.raises(SystemExit):
        bench.main(bad)
    assert bad[0] in capsys.readouterr().err


def test_gpu_check_writes_a_relative_output_path_where_it_was_called(tmp_path: pathlib.Path) -> None:
    """``bash <repo>/benchmarks/gpu_check.sh out.json`` from another directory wrote the JSON
    (and, on a GPU, the test log) into the repository root."""
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("GPU_CHECK_DEVICE", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "relative_gpu_check.json"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "relative_gpu_check.json").exists()
    assert not (ROOT / "relative_gpu_check.json").exists()


def test_executed_flops_count_sdpa_on_cpu():
    """torch's FlopCounterMode counts sdpa's CUDA kernels but not the CPU one (the default
    --device): a CPU step's attention through sdpa counted nothing, while the reference's
    matmuls were counted, so executed_flops_per_step depended on the backend."""
    import memzoo

    bench = load("bench_train")
    tokens = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))
    counts = {}
    for backend in ("reference", "sdpa"):
        torch.manual_seed(0)
        model = memzoo.build_model("full", vocab_size=64, d_model=64, n_layers=2, n_heads=4, block_size=16, backend=backend)
        counts[backend] = bench.executed_flops(model, tokens)
    assert counts["sdpa"] > 0.9 * counts["reference"], counts
