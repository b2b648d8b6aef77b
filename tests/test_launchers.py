"""Launchers (in-process, the local process pool, Ray), retries and failures, TensorBoard
logs, AdamW's parameter groups, and one run trained data-parallel under torchrun
(2 gloo processes) against the same run in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memzoo
from memzoo.cli import main
from memzoo.compare import CompareConfig, RunRecord, compare_runs, load_leaderboard
from memzoo.compare import runner
from memzoo.compare.launchers import RAY, LocalPool, make_launcher
from memzoo.compare.results import load
from memzoo.compare.trainer import param_groups, train
from memzoo.errors import MemzooError
from memzoo.tasks import make_task

ROOT = Path(memzoo.__file__).resolve().parent.parent
MICRO = dict(
    model={"d_model": 16, "n_layers": 1, "n_heads": 2, "block_size": 4},
    train={"steps": 3, "batch_size": 4, "length": 16, "warmup_steps": 1},
    eval={"lengths": (16,), "examples": 4, "batch_size": 4},
    task_options={"n_digits": 2, "n_filler": 3, "eval_depths": (0.0, 1.0)},
)
#: what depends on the machine and the moment, not on the experiment
TIMING = {"tokens_per_s", "eval_tokens_per_s", "wall_s"}


def measured(records: list[RunRecord]) -> list[dict]:
    out = []
    for record in records:
        for row in record.rows:
            d = row.model_dump(mode="json")
            for key in TIMING:
                d.pop(key)
            out.append(d)
    return out


def _config(**over) -> CompareConfig:
    return CompareConfig(task="passkey", variants=("bswa", "fam"), seeds=(0, 1), **{**MICRO, **over})


def test_rows_do_not_depend_on_the_launcher() -> None:
    """In-process, the local pool and a real local Ray cluster (2 CPUs) give the same rows."""
    config = _config()
    alone = compare_runs(config, quiet=True, jobs=1)
    pooled = compare_runs(config, quiet=True, jobs=2)
    assert measured(pooled) == measured(alone)
    if not RAY:
        pytest.fail(f"ray is a dev dependency and must be installed for this test: {RAY.message}")
    on_ray = compare_runs(config, quiet=True, jobs=2, launcher="ray")
    assert measured(on_ray) == measured(alone)
    assert [r.losses for r in on_ray] == [r.losses for r in alone]
    assert all(len(r.losses) == config.train.steps and r.log_every == 1 for r in alone)  # every step's loss


def test_launcher_choice_is_validated() -> None:
    with pytest.raises(MemzooError, match="unknown launcher 'slurm'; valid: local, ray"):
        make_launcher("slurm")
    with pytest.raises(MemzooError, match="--address and --resources are for --launcher ray"):
        make_launcher("local", address="ray://x:1")
    with pytest.raises(MemzooError, match="jobs must be >= 1"):
        LocalPool(0)


def test_a_failing_run_is_retried_then_recorded_as_failed(monkeypatch, capsys) -> None:
    real = runner.run_one
    calls: list[str] = []

    def flaky(spec, config, **kwargs):
        calls.append(spec.variant)
        if spec.variant == "fam" and calls.count("fam") == 1:
            raise RuntimeError("transient failure")  # the first attempt only
        if spec.variant == "full":
            raise RuntimeError("always broken")
        return real(spec, config, **kwargs)

    monkeypatch.setattr(runner, "run_one", flaky)
    config = CompareConfig(task="passkey", variants=("bswa", "fam", "full"), **MICRO)
    records = compare_runs(config, quiet=True, retries=2)
    assert [r.status for r in records] == ["finished", "finished", "failed"]
    assert calls.count("fam") == 2 and calls.count("full") == 3  # bounded: 1 + 2 retries
    assert records[2].rows == [] and "always broken" in (records[2].error or "")
    err = capsys.readouterr().err
    assert "fam seed 0 failed (RuntimeError: transient failure); retry 1 of 2" in err
    assert "full seed 0 failed 3 time(s), recorded as failed" in err


def test_cli_exit_status_and_leaderboard_say_a_run_failed(tmp_path: Path, monkeypatch, capsys) -> None:
    real = runner.run_one

    def broken(spec, config, **kwargs):
        if spec.variant == "full":
            raise RuntimeError("always broken")
        return real(spec, config, **kwargs)

    monkeypatch.setattr(runner, "run_one", broken)
    out = tmp_path / "lb"
    args = ["compare", "--variants", "bswa,full", "--out", str(out), "--jobs", "1", "--retries", "0", "--no-progress",
            "--steps", "2", "--set", "model.d_model=16", "--set", "model.block_size=4", "--set", "train.length=16",
            "--set", "train.batch_size=4", "--set", "eval.lengths=[16]", "--set", "eval.examples=4",
            "--set", "task_options.n_digits=2"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "1 run(s) failed: full seed 0" in captured.err
    assert "full seed 0 FAILED (RuntimeError: always broken)" in captured.out
    board = load_leaderboard(out / "passkey.json")
    assert [(r.variant, r.status) for r in board.runs] == [("bswa", "finished"), ("full", "failed")]
    assert not list((out / "runs" / "passkey").glob("full-*.json")), "a failed run is never cached as finished"
    assert (out / "passkey-loss.png").is_file()


FLAKY_TASK = '''
import os
from pathlib import Path
from memzoo.tasks.copy import Copy, CopyConfig
from memzoo.tasks.registry import register_task

@register_task("flaky_copy", config=CopyConfig)
class FlakyCopy(Copy):
    def sample(self, *args, **kwargs):
        marker = Path(os.environ["MEMZOO_FLAKY_MARKER"])
        in_worker = os.getpid() != int(os.environ["MEMZOO_FLAKY_DRIVER"])  # the driver samples too (config checks)
        if in_worker and not marker.exists():
            marker.write_text("killed once")
            os._exit(9)  # the worker process dies mid-run, as if killed
        return super().sample(*args, **kwargs)
'''


def test_a_killed_pool_worker_is_retried(tmp_path: Path, monkeypatch) -> None:
    """A worker that dies (not an exception: the process is gone) breaks the pool; the
    runner starts a new pool and the run is retried and finishes."""
    (tmp_path / "flaky_task_plugin.py").write_text(textwrap.dedent(FLAKY_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MEMZOO_FLAKY_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("MEMZOO_FLAKY_DRIVER", str(os.getpid()))
    import flaky_task_plugin  # noqa: F401  (registers the task in this process too)

    from memzoo.tasks.registry import unregister_task

    try:
        config = CompareConfig(
            task="flaky_copy", variants=("bswa",), seeds=(0, 1), task_options={"segment_len": 2},
            model=MICRO["model"], train=MICRO["train"], eval={"lengths": (16,), "examples": 2, "batch_size": 2},
        )
        records = compare_runs(config, quiet=True, jobs=2, retries=1)
        assert [r.status for r in records] == ["finished", "finished"]
        assert (tmp_path / "marker").read_text() == "killed once"
    finally:
        unregister_task("flaky_copy")


def test_tensorboard_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = CompareConfig(task="passkey", variants=("bswa",), **MICRO)
    compare_runs(config, quiet=True, log_dir=tmp_path)
    (run_dir,) = (tmp_path / "passkey").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == config.train.steps and all(v > 0 for v in losses)
    assert "eval/accuracy" in events.Tags()["scalars"]


def test_adamw_decays_only_weight_matrices() -> None:
    model = memzoo.build_model("fam", d_model=16, n_heads=2, block_size=4, fam_len=2, qkv_bias=True)
    decay, rest = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    kept = sorted(names[id(p)] for p in rest["params"])
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "backbone.prompt" in kept and "norm.weight" in kept
    assert any(n.endswith("q_proj.bias") for n in kept) and any(n.endswith("input_layernorm.weight") for n in kept)
    assert "embed.weight" in decayed and all(n.endswith(".weight") for n in decayed)
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    (everything,) = param_groups(model, 0.1, "all")
    assert len(everything["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------ torchrun (DDP on gloo)
DDP_SCRIPT = '''
import json, sys, torch
import memzoo
from memzoo.compare import distributed
from memzoo.compare.settings import TrainSettings
from memzoo.compare.trainer import train
from memzoo.tasks import make_task

torch.set_num_threads(1)
variant, out = sys.argv[1], sys.argv[2]
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
ctx = distributed.context("cpu")
task = make_task("passkey", n_digits=2, n_filler=3)
torch.manual_seed(0)
own = {"fam": {"fam_len": 2, "memory_blocks": 1}, "bswa": {"memory_blocks": 1}, "rmt": {"num_memory_tokens": 2}}[variant]
model = memzoo.build_model(variant, vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=4, **own)
settings = TrainSettings(**{"steps": 4, "batch_size": 4, "length": 16, "warmup_steps": 1, "chunk_len": 8, "rsp_prob": 0.5, **extra})
report = train(model, task, settings, seed=0, dist=ctx)
if ctx is None or ctx.is_main:
    torch.save({"losses": report.losses, "params": model.state_dict(), "carried": report.carried_steps}, out)
'''


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("variant", ["bswa", "fam"])
def test_ddp_training_equals_one_process(tmp_path: Path, variant: str) -> None:
    """2 gloo processes, each with half of the global batch (chunked, with Random State
    Passing): the loss curve and the final parameters equal one process."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    single = subprocess.run([sys.executable, str(script), variant, str(tmp_path / "one.pt")],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    done = _torchrun(str(script), variant, str(tmp_path / "two.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(one["losses"]) == len(two["losses"]) == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("variant", "extra"), [
    ("fam", {"chunk_len": 4, "rsp_prob": 1.0}), ("rmt", {"chunk_len": 4, "detach_every": 1, "rsp_prob": 1.0}),
])
def test_ddp_carried_and_detached_states_equal_one_process(tmp_path: Path, variant: str, extra: dict) -> None:
    """Steps that start from a carried state (RSP) and backwards after a detach leave the
    learned initial state (FAM's prompt, RMT's memory embeddings) out of the loss: DDP's
    reducer then stopped at the next step ("Expected to have finished reduction"), and once
    every parameter was in every backward, a zero gradient moved those parameters by AdamW's
    momentum and decay where one process (no gradient) leaves them."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    single = subprocess.run([sys.executable, str(script), variant, str(tmp_path / "one.pt"), json.dumps(extra)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    done = _torchrun(str(script), variant, str(tmp_path / "two.pt"), json.dumps(extra))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["carried"] == two["carried"] == 3
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_torchrun_compare_writes_rows_equal_to_one_process(tmp_path: Path) -> None:
    """``torchrun -m memzoo compare``: rank 0 writes the leaderboard; its rows equal a
    one-process run's (within float tolerance), and it records the world size."""
    common = ["--variants", "bswa", "--steps", "3", "--no-progress", "--quiet", "--set", "model.d_model=16",
              "--set", "model.n_layers=1", "--set", "model.block_size=4", "--set", "train.batch_size=4",
              "--set", "train.length=16", "--set", "train.warmup_steps=1", "--set", "eval.lengths=[16]",
              "--set", "eval.examples=4", "--set", "task_options.n_digits=2"]
    done = _torchrun("-m", "memzoo", "compare", *common, "--out", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["compare", *common, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    ddp, one = load_leaderboard(tmp_path / "ddp" / "passkey.json"), load_leaderboard(tmp_path / "one" / "passkey.json")
    assert {r.provenance.world_size for r in ddp.rows} == {2} and {r.provenance.dist_backend for r in ddp.rows} == {"gloo"}
    assert "trained on 2 processes (gloo, data parallel)" in (tmp_path / "ddp" / "passkey.md").read_text()
    assert [(r.metric, r.slice, r.eval_length) for r in ddp.rows] == [(r.metric, r.slice, r.eval_length) for r in one.rows]
    for a, b in zip(ddp.rows, one.rows):
        assert a.value == pytest.approx(b.value, abs=1e-6)
    torch.testing.assert_close(torch.tensor(ddp.runs[0].losses), torch.tensor(one.runs[0].losses), atol=1e-5, rtol=1e-5)


class _FakeRay:
    """Stands in for the ``ray`` module: records ``init``, reports ``cluster`` as the
    cluster's resources; no cluster is started."""

    def __init__(self, cluster: dict[str, float], *, cpus_from_init: bool = True) -> None:
        self.cluster, self.cpus_from_init = cluster, cpus_from_init
        self.inits: list[dict] = []
        self.shutdowns = 0
        self.up = False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, address=None, **kwargs) -> None:
        self.inits.append({"address": address, **kwargs})
        self.up = True

    def cluster_resources(self) -> dict[str, float]:
        if self.cpus_from_init and self.inits and "num_cpus" in self.inits[-1]:
            return {**self.cluster, "CPU": float(self.inits[-1]["num_cpus"])}
        return dict(self.cluster)

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.up = False

    def remote(self, fn):
        class _Options:
            def options(self, **kwargs):
                return kwargs

        return _Options()


def test_ray_caps_a_local_cluster_at_jobs_times_the_cpus_of_a_run(monkeypatch) -> None:
    """--jobs caps a local Ray cluster's CPUs (also --jobs 1), consistent with each run's CPU
    request (--threads), so --jobs 2 --threads 3 runs two at a time instead of never."""
    from memzoo.compare.launchers import RayLauncher

    for jobs, threads, cpus in [(1, 1, 1), (2, 1, 2), (2, 3, 6), (1, None, 1)]:
        fake = _FakeRay({"memory": 1e9})
        monkeypatch.setitem(sys.modules, "ray", fake)
        launcher = make_launcher("ray", jobs=jobs, threads=threads)
        assert isinstance(launcher, RayLauncher)
        assert fake.inits[0]["num_cpus"] == cpus and launcher.resources["CPU"] == (threads or 1)
        launcher.close()
        assert fake.shutdowns == 1


def test_ray_refuses_a_run_the_cluster_can_never_schedule(monkeypatch, tmp_path: Path, capsys) -> None:
    """A per-run request beyond the cluster (a GPU the local cluster lacks, a custom resource,
    more CPUs than a remote cluster has) used to leave the Ray task pending forever."""
    fake = _FakeRay({"memory": 1e9})
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(MemzooError, match=r"each run asks Ray for GPU=1, more than the local Ray cluster has \(GPU=0\)"):
        make_launcher("ray", jobs=2, resources={"GPU": 1})
    assert fake.shutdowns == 1 and not fake.up  # the cluster it started is shut down again
    fake = _FakeRay({"memory": 1e9})
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(MemzooError, match=r"asks Ray for my_label=1, more than the local Ray cluster has \(my_label=0\)"):
        make_launcher("ray", resources={"my_label": 1})
    assert fake.shutdowns == 1 and not fake.up  # refused once the cluster shows what it has; shut down again
    fake = _FakeRay({"CPU": 4.0, "GPU": 1.0}, cpus_from_init=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    # a cluster of one's own may autoscale, and its totals span nodes: warned, not refused
    with pytest.warns(RuntimeWarning, match=r"CPU=8, more than the Ray cluster at ray://head:1 has \(CPU=4\)"):
        make_launcher("ray", address="ray://head:1", resources={"CPU": 8, "GPU": 1}).close()
    assert "num_cpus" not in fake.inits[0] and fake.shutdowns == 1
    fake = _FakeRay({"memory": 1e9})
    monkeypatch.setitem(sys.modules, "ray", fake)  # address="local" starts a local cluster too: refused, capped
    with pytest.raises(MemzooError, match=r"GPU=1, more than the local Ray cluster has"):
        make_launcher("ray", address="local", jobs=2, resources={"GPU": 1})
    assert fake.inits[0]["num_cpus"] == 2 and fake.shutdowns == 1
    fake = _FakeRay({"memory": 1e9, "GPU": 1.0, "accelerator_type:H100": 1.0})
    monkeypatch.setitem(sys.modules, "ray", fake)  # Ray detects a local GPU's accelerator type itself
    make_launcher("ray", resources={"GPU": 1, "accelerator_type:H100": 0.001}).close()
    fake = _FakeRay({"CPU": 4.0, "GPU": 1.0}, cpus_from_init=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    make_launcher("ray", address="ray://head:1", resources={"CPU": 4, "GPU": 1}).close()  # fits: accepted
    # the command line: one line, exit 2, nothing trained
    fake = _FakeRay({"memory": 1e9})
    monkeypatch.setitem(sys.modules, "ray", fake)
    calls: list = []
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: calls.append(a))
    args = ["compare", "--variants", "bswa", "--steps", "2", "--set", "model.d_model=16", "--set", "model.n_layers=1",
            "--set", "eval.examples=4", "--set", "eval.lengths=[32]", "--no-progress", "--launcher", "ray",
            "--resources", '{"GPU": 1}', "--out", str(tmp_path / "lb")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("memzoo: error: each run asks Ray for GPU=1") and err.count("\n") == 1, err
    assert calls == [] and not (tmp_path / "lb" / "passkey.json").exists()
