"""``compare(...)``: train and evaluate variants on one task under one budget.

Runs are (variant, seed) pairs. With a ``results_dir``, each finished run is written
there atomically as ``<task>/<variant>-seed<seed>-<config hash>.json``; a rerun with
the same settings loads it instead of recomputing, so an interrupted comparison
resumes where it stopped. Changing any setting changes the hash, so stale results
are never mixed in.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import ValidationError

import memzoo
from memzoo import ops
from memzoo.compare import distributed
from memzoo.compare.distributed import DistContext
from memzoo.compare.launchers import InProcess, Launcher, make_launcher
from memzoo.compare.progress import Progress
from memzoo.compare.results import Divergence, Provenance, ResultRow, RunRecord, RunSpec, dump, one_line, write_atomic
from memzoo.compare.settings import CompareConfig, merge, variant_options
from memzoo.compare.settings import preset as settings_preset
from memzoo.compare.trainer import evaluate, train
from memzoo.errors import MemzooError
from memzoo.tasks import Task, make_task
from memzoo.tasks.base import draw


@functools.lru_cache(maxsize=1)
def git_info() -> tuple[str | None, bool | None]:
    """(commit, whether memzoo/ differs from it) of the checkout memzoo runs from, read
    once per process, at its first run: the code a process runs is the code it
    imported, not whatever the checkout holds when a run ends."""
    root = Path(memzoo.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "memzoo"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


@functools.lru_cache(maxsize=None)
def _source_hash(top: str) -> str:
    """sha256 (16 hex digits) of the ``.py`` files of the imported package or module
    ``top``, read once per process like :func:`git_info`; "unknown" without a file."""
    where = getattr(sys.modules.get(top), "__file__", None)
    if where is None:  # defined interactively: no source to hash
        return "unknown"
    path = Path(where)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def plugin_code(spec: RunSpec) -> dict[str, str] | None:
    """Per package outside memzoo that registered the run's variant or task (a plug-in,
    or a script's ``__main__``): the sha256 of its ``.py`` files, so a result cached
    before its code changed is not loaded silently (the run's hash covers its settings,
    and ``git_commit`` covers memzoo's own code only). None when both are memzoo's."""
    from memzoo.registry import get_variant
    from memzoo.tasks import get_task

    variant, task = get_variant(spec.variant), get_task(spec.task)
    out: dict[str, str] = {}
    for cls in (variant.cls, variant.config, task, task.Config):
        top = cls.__module__.partition(".")[0]
        if top == "memzoo" or top in out:
            continue
        out[top] = _source_hash(top)
    return out or None


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type if dev.type != "cpu" else f"cpu ({platform.machine() or 'unknown'})"


def run_spec(config: CompareConfig, variant: str, seed: int) -> RunSpec:
    task = make_task(config.task, **config.task_options)
    return RunSpec(
        variant=variant,
        variant_options=variant_options(variant, config.model, config.variant_options.get(variant)),
        task=config.task,
        task_options=task.config.model_dump(mode="json"),
        task_data=task.data_fingerprint(),
        seed=seed,
        model=config.model.model_dump(mode="json"),
        train=config.train.model_dump(mode="json"),
        eval={**config.eval.model_dump(mode="json"), "chunk_len": config.eval_chunk},
        eval_lengths=list(config.eval_lengths),
        backend=config.backend,
        device=config.device,
    )


def run_path(results_dir: Path, spec: RunSpec) -> Path:
    return results_dir / spec.task / f"{spec.variant}-seed{spec.seed}-{spec.config_hash}.json"


_INIT_LOCK = threading.Lock()


def provenance_of(spec: RunSpec, dist: DistContext | None = None) -> Provenance:
    """What makes a run here: the code, the libraries, the device, the threads, the ranks."""
    commit, dirty = git_info()
    return Provenance(
        memzoo_version=memzoo.__version__,
        git_commit=commit,
        git_dirty=dirty,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        device=device_name(spec.device),
        threads=torch.get_num_threads(),
        config_hash=spec.config_hash,
        world_size=dist.world_size if dist is not None else 1,
        dist_backend=dist.backend if dist is not None else None,
        plugin_code=plugin_code(spec),
    )


def run_one(
    spec: RunSpec,
    config: CompareConfig,
    *,
    progress: Progress | None = None,
    log_dir: str | Path | None = None,
    dist: DistContext | None = None,
) -> RunRecord:
    """Train and evaluate one (variant, seed) and return its record. ``progress``: the
    sweep's bar, whose postfix shows this run's loss and throughput; ``log_dir``: write
    TensorBoard events to ``<log_dir>/<task>/<variant>-seed<seed>-<hash>``; ``dist``: train
    data-parallel across the ranks of a torchrun launch (every rank returns the record)."""
    task: Task = make_task(spec.task, **spec.task_options)
    if task.data_fingerprint() != spec.task_data:  # e.g. the corpus file was edited, or differs on this worker's node
        raise MemzooError(
            f"task {spec.task!r}: its data is not the data this run was planned with ({task.data_fingerprint()} here, "
            f"{spec.task_data} planned); rerun the comparison to plan it with the current data"
        )
    start = time.perf_counter()
    device = dist.device(spec.device) if dist is not None else spec.device
    with _INIT_LOCK:  # the global RNG: two comparisons in one process must not interleave their inits
        torch.manual_seed(spec.seed)  # initial weights: the same seed gives the same init for a variant
        model = memzoo.build_model(
            spec.variant, vocab_size=task.vocab_size, backend=spec.backend, **spec.model, **spec.variant_options
        ).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    writer = _tensorboard(log_dir, spec) if log_dir is not None else None
    log = None
    if writer is not None:
        def log(step: int, loss: float, lr: float) -> None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", lr, step)
    note = None if progress is None else _Postfix(progress, f"{spec.variant} seed {spec.seed}")
    diverged: Divergence | None = None
    evals = {}
    with ops.record_backends() as record:
        report = train(model, task, config.train, seed=spec.seed, progress=note, dist=dist, log=log)
        if report.diverged is not None:
            d = report.diverged
            diverged = Divergence(step=d.step, last_finite_loss=d.last_finite_loss, reason=d.reason)
        else:
            for n in spec.eval_lengths:
                evals[n] = evaluate(model, task, n, config.eval, chunk_len=config.eval_chunk, seed=spec.seed)
                bad = [f"{m} ({s})" for m, by in evals[n].scores.items() for s, v in by.items() if not math.isfinite(v)]
                if bad:
                    last = next((x for x in reversed(report.losses) if math.isfinite(x)), None)
                    diverged = Divergence(
                        step=config.train.steps, last_finite_loss=last,
                        reason=f"evaluation at length {n} gave non-finite {', '.join(bad)}",
                    )
                    evals = {}
                    break
    wall = time.perf_counter() - start
    if writer is not None:
        for n, ev in evals.items():
            for metric, by_slice in ev.scores.items():
                writer.add_scalar(f"eval/{metric}", by_slice["all"], n)
        writer.close()
    provenance = provenance_of(spec, dist)
    rows = [
        ResultRow(
            variant=spec.variant,
            task=spec.task,
            train_length=config.train_length,
            eval_length=n,
            seed=spec.seed,
            metric=metric,
            slice=slice_,
            value=value,
            higher_is_better=task.metric_higher_is_better(metric),
            backend="+".join(sorted(record.names)) or "none",
            parameters=parameters,
            state_bytes=ev.state_bytes,
            tokens_per_s=report.tokens_per_s,
            compile_s=report.compile_s,
            eval_tokens_per_s=ev.tokens_per_s,
            wall_s=wall,
            provenance=provenance,
        )
        for n, ev in evals.items()
        for metric, by_slice in ev.scores.items()
        for slice_, value in by_slice.items()
    ]
    return RunRecord(
        spec=spec,
        config_hash=spec.config_hash,
        status="finished" if diverged is None else "diverged",
        divergence=diverged,
        losses=[x if math.isfinite(x) else None for x in report.losses],  # every step's
        log_every=1,
        carried_steps=report.carried_steps,
        provenance=provenance,
        rows=rows,
    ).sealed()


def failed_record(spec: RunSpec, error: str) -> RunRecord:
    """The record of a run that kept failing: no rows, shown as failed, never cached."""
    return RunRecord(
        spec=spec, config_hash=spec.config_hash, status="failed", error=error, losses=[], log_every=1, carried_steps=0,
        provenance=provenance_of(spec), rows=[],
    ).sealed()


class _Postfix:
    """A run's training steps shown as the sweep bar's postfix (the bar counts runs)."""

    def __init__(self, bar: Progress, label: str) -> None:
        self.bar, self.label = bar, label

    def update(self, n: int = 1, note: str = "") -> None:
        self.bar.update(0, f"{self.label}: {note}")


def _tensorboard(log_dir: str | Path, spec: RunSpec):  # type: ignore[no-untyped-def]
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is optional
        raise MemzooError(f"--log-dir needs TensorBoard: pip install 'memzoo[tensorboard]' ({exc})") from exc
    return SummaryWriter(str(Path(log_dir) / spec.task / f"{spec.variant}-seed{spec.seed}-{spec.config_hash}"))


def check_record(record: RunRecord, spec: RunSpec) -> list[str]:
    """Why a loaded run file is not the finished run of ``spec`` (empty: it is): its
    content hash, spec and config hash, and rows that are exactly one per (eval
    length, metric, slice) of the task, for this variant, task and seed, in range."""
    problems = []
    if record.content_hash != record.computed_hash():
        problems.append("its content hash does not match its contents (edited or damaged)")
    if record.spec != spec or record.config_hash != spec.config_hash or record.spec.config_hash != record.config_hash:
        problems.append("its spec or config hash is not this run's")
    if problems:
        return problems
    if record.status == "failed":
        return ["a failed run is never kept as finished"]
    if record.status == "diverged":
        if record.divergence is None or record.rows:
            problems.append("a diverged run must have a divergence and no rows")
        return problems
    if record.divergence is not None:
        problems.append("a finished run has a divergence")
    if record.provenance.config_hash != spec.config_hash:
        problems.append("its provenance config hash is not this run's")
    task = make_task(spec.task, **spec.task_options)
    from memzoo.compare.settings import EvalSettings, TrainSettings
    from memzoo.compare.trainer import seeded

    eval_settings = EvalSettings.model_validate(spec.eval)
    train_length = TrainSettings.model_validate(spec.train).max_length  # rows are labelled with hi of a range
    kinds = dict(task.metrics)
    expected = set()
    for n in spec.eval_lengths:
        groups = draw(task, eval_settings.examples, n, seeded("eval-data", task.name, spec.seed, n), split="eval").groups
        expected |= {(n, m, s) for m in kinds for s in {"all", *groups}}
    seen: dict[tuple[int, str, str], int] = {}
    for r in record.rows:
        key = (r.eval_length, r.metric, r.slice)
        seen[key] = seen.get(key, 0) + 1
        if (r.variant, r.task, r.seed, r.train_length) != (spec.variant, spec.task, spec.seed, train_length):
            problems.append(
                f"a row is labelled variant {r.variant!r}, task {r.task!r}, seed {r.seed}, train length {r.train_length}"
            )
            break
        kind = kinds.get(r.metric)
        if kind in ("exact", "token_accuracy") and not 0.0 <= r.value <= 1.0 or kind == "bits" and r.value < 0:
            problems.append(f"{r.metric} at length {r.eval_length} ({r.slice}) is {r.value}, out of range")
            break
        if (kind is not None and r.higher_is_better != task.metric_higher_is_better(r.metric)) or r.provenance != record.provenance:
            problems.append("a row's higher_is_better or provenance is not this run's")
            break
    missing, extra = expected - set(seen), set(seen) - expected
    doubled = sorted(k for k, c in seen.items() if c > 1)
    if missing:
        problems.append(f"rows are missing for {_keys(missing)}")
    if extra:
        problems.append(f"it has rows this run does not make: {_keys(extra)}")
    if doubled:
        problems.append(f"rows appear more than once: {_keys(doubled)}")
    return problems


def _keys(keys) -> str:  # type: ignore[no-untyped-def]
    shown = sorted(keys)[:4]
    text = ", ".join(f"length {n} {m} ({s})" for n, m, s in shown)
    return text + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def load_finished(path: Path, spec: RunSpec) -> tuple[RunRecord | None, str | None]:
    """(the verified run of ``spec`` at ``path``, None), (None, None) when there is no
    file, or (None, why) when the file does not parse or does not verify."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot be read ({exc})"
    try:
        record = RunRecord.model_validate_json(text)
    except ValidationError as exc:
        return None, f"is not a valid run file ({one_line(exc)})"
    problems = check_record(record, spec)
    if problems:
        return None, "does not verify: " + "; ".join(problems)
    return record, None


def set_aside(path: Path) -> Path | None:
    """Move a bad run file out of the way (never delete it) to
    ``<name>.rejected-<UTC time>-<pid>-<random>``: a name no one else uses, so nothing is
    overwritten, and one atomic rename, so of several processes setting the same file
    aside exactly one moves it. None if it is already gone (another process moved or replaced it)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.rejected-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def _code_changed(record: RunRecord) -> str | None:
    """Why a loaded run may be stale (made by other code than this process runs), or None."""
    commit, dirty = git_info()
    made = record.provenance
    now = plugin_code(record.spec)
    changed = sorted(k for k in set(made.plugin_code or {}) & set(now or {}) if made.plugin_code[k] != now[k])  # type: ignore[index]
    if changed:
        return f"was made by other code of {', '.join(changed)} (its source files changed since)"
    if commit is None:
        return None
    if made.git_commit != commit:
        return f"was made by commit {str(made.git_commit)[:12]}, this is {commit[:12]}"
    if made.git_dirty or dirty:
        return "was made or is loaded with uncommitted changes in memzoo/"
    return None


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"memzoo compare: {message}", file=sys.stderr, flush=True)


def compare_runs(
    config: CompareConfig,
    *,
    results_dir: str | Path | None = None,
    progress: bool | None = None,
    quiet: bool = False,
    threads: int | None = 1,
    jobs: int = 1,
    launcher: str | Launcher = "local",
    address: str | None = None,
    resources: dict[str, float] | None = None,
    retries: int = 2,
    log_dir: str | Path | None = None,
) -> list[RunRecord]:
    """Every (variant, seed) run of ``config``: loaded from ``results_dir`` when finished
    there before (and verified), otherwise computed (and then written there by this
    process).

    ``launcher``: ``"local"`` (in this process for ``jobs=1``, else ``jobs`` spawned worker
    processes), ``"ray"`` (one Ray task per run with ``resources``; a local cluster, or
    the one at ``address``), or a :class:`~memzoo.compare.launchers.Launcher`. Results do
    not depend on it. A run that raises or whose worker dies is retried up to
    ``retries`` times, then recorded as failed (``status="failed"``, no rows, never
    cached); the other runs go on. Workers are fresh interpreters, so every variant and
    task must be importable by name (built in, or registered by an entry point).

    Under ``torchrun`` every run trains data-parallel across the ranks (one run after
    another, in this process); rank 0 decides which runs are finished and alone writes."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise MemzooError(f"jobs must be an int >= 1 (1 = in this process), got {jobs!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MemzooError(f"threads must be an int >= 1 or None (leave torch's setting), got {threads!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise MemzooError(f"retries must be an int >= 0, got {retries!r}")
    dist = distributed.context(config.device)
    if dist is not None and (jobs > 1 or launcher != "local"):
        raise MemzooError("under torchrun each run trains data-parallel on every rank: use --jobs 1 and the local launcher")
    main_rank = dist is None or dist.is_main
    show = (sys.stderr.isatty() if progress is None else progress) and not quiet and main_rank
    quiet = quiet or not main_rank
    specs = [run_spec(config, v, s) for v in config.variant_names for s in config.seeds]
    records: dict[int, RunRecord] = {}
    todo: list[tuple[int, RunSpec, Path | None]] = []
    for i, spec in enumerate(specs):
        path = run_path(Path(results_dir), spec) if results_dir is not None and main_rank else None
        if path is not None:
            record, why = load_finished(path, spec)
            if record is not None:
                _log(f"[{i + 1}/{len(specs)}] {spec.variant} seed {spec.seed}: finished before, loaded {path}", quiet)
                stale = _code_changed(record)
                if stale:  # the settings match, the code may not: never silent about it
                    print(f"memzoo compare: warning: {path} {stale}; delete it to recompute", file=sys.stderr, flush=True)
                records[i] = record
                continue
            if why is not None:
                moved = set_aside(path)
                where = f"moved it to {moved.name}" if moved is not None else "it is gone now"
                print(f"memzoo compare: warning: run file {path} {why}; {where}; running it again", file=sys.stderr, flush=True)
        todo.append((i, spec, path))
    if dist is not None:
        todo = _agree_on_todo(todo, records, specs, dist)
    bar = Progress(len(todo), f"{config.task}: runs", enabled=show) if todo else None
    if dist is not None:
        for i, spec, path in todo:
            _log(f"[{i + 1}/{len(specs)}] {spec.variant} seed {spec.seed}: training on {dist.world_size} ranks", quiet)
            with torch_threads(threads):
                records[i] = run_one(spec, config, progress=bar, log_dir=log_dir if dist.is_main else None, dist=dist)
            if path is not None:
                write_atomic(path, dump(records[i]))
            if bar is not None:
                bar.update(1)
    elif todo:
        impl = launcher if not isinstance(launcher, str) else make_launcher(
            launcher, jobs=jobs, threads=threads, address=address, resources=resources, quiet=quiet
        )
        # in this process runs call run_one directly (the bar shows each step's loss, and
        # variants defined in __main__ work); workers import the registering modules first
        modules = None if isinstance(impl, InProcess) else _imports([spec for _, spec, _ in todo], config.task)
        with _terminate_on_sigterm():
            try:
                _run_all(impl, todo, config, specs=len(specs), threads=threads, retries=retries, records=records,
                         quiet=quiet, bar=bar, log_dir=log_dir, modules=modules)
            except BaseException:
                impl.close(cancel=True)  # an interrupted comparison leaves no worker behind
                raise
        impl.close()
    if bar is not None:
        bar.close()
    return [records[i] for i in range(len(specs))]


def _imports(specs: list[RunSpec], task: str) -> list[str]:
    """The modules that register the runs' variants and task; a worker imports them first."""
    from memzoo.registry import get_variant
    from memzoo.tasks import get_task

    modules = sorted({get_variant(s.variant).cls.__module__ for s in specs} | {get_task(task).__module__})
    if "__main__" in modules:
        raise MemzooError("a variant or task defined in __main__ cannot be re-created in a worker process; use jobs=1")
    return modules


def _agree_on_todo(
    todo: list[tuple[int, RunSpec, Path | None]], records: dict[int, RunRecord], specs: list[RunSpec], dist: DistContext
) -> list[tuple[int, RunSpec, Path | None]]:
    """Rank 0's view of which runs still need training, for every rank (only rank 0
    reads the results folder: it may not even exist on another node). The other ranks
    get rank 0's loaded records too, so every rank returns the same list."""
    box = [[i for i, _, _ in todo], {i: dump(r) for i, r in records.items()}]
    torch.distributed.broadcast_object_list(box, src=0)
    indices, loaded = box
    records.update({i: RunRecord.model_validate_json(text) for i, text in loaded.items()})
    mine = {i: path for i, _, path in todo}
    return [(i, specs[i], mine.get(i)) for i in indices]


def _run_all(
    impl: Launcher,
    todo: list[tuple[int, RunSpec, Path | None]],
    config: CompareConfig,
    *,
    specs: int,
    threads: int | None,
    retries: int,
    records: dict[int, RunRecord],
    quiet: bool,
    bar: Progress | None,
    log_dir: str | Path | None,
    modules: list[str] | None,
) -> None:
    """Submit every run to ``impl``, write each finished one, retry failures, record
    the runs that keep failing."""
    in_process = modules is None
    quiet_each = quiet or (bar is not None and bar.enabled)

    def submit(spec: RunSpec) -> cf.Future:
        if in_process:
            future: cf.Future = cf.Future()
            try:
                with torch_threads(threads):
                    future.set_result(dump(run_one(spec, config, progress=bar, log_dir=log_dir)))
            except Exception as exc:  # like a worker's failure: reported, retried
                future.set_exception(exc)
            return future
        payload = {"spec": spec.model_dump(mode="json"), "config": config.model_dump(mode="json"), "threads": threads,
                   "imports": modules, "log_dir": None if log_dir is None else str(log_dir)}
        return impl.submit(payload)

    _log(f"running {len(todo)} run(s) with the {impl.name} launcher", quiet or in_process)
    attempts = {i: 0 for i, _, _ in todo}
    pending: dict[cf.Future, tuple[int, RunSpec, Path | None]] = {}
    for entry in todo:
        i, spec, _ = entry
        _log(f"[{i + 1}/{specs}] {spec.variant} seed {spec.seed}: training", quiet_each)
        pending[submit(spec)] = entry
    while pending:
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        broken = False
        retry: list[tuple[int, RunSpec, Path | None]] = []
        for future in done:
            entry = pending.pop(future)
            i, spec, path = entry
            try:
                record = RunRecord.model_validate_json(future.result())
            except Exception as exc:  # the run raised, or its worker died
                broken = broken or isinstance(exc, BrokenProcessPool)
                attempts[i] += 1
                reason = f"{type(exc).__name__}: {exc}".strip()
                if attempts[i] <= retries:
                    print(f"memzoo compare: warning: {spec.variant} seed {spec.seed} failed ({reason[:300]}); "
                          f"retry {attempts[i]} of {retries}", file=sys.stderr, flush=True)
                    retry.append(entry)
                    continue
                print(f"memzoo compare: error: {spec.variant} seed {spec.seed} failed {attempts[i]} time(s), "
                      f"recorded as failed: {reason[:2000]}", file=sys.stderr, flush=True)
                records[i] = failed_record(spec, reason)
                if bar is not None:
                    bar.update(1, f"{spec.variant} seed {spec.seed} FAILED")
                continue
            records[i] = record
            if path is not None:
                write_atomic(path, dump(record))
            _log(f"[{i + 1}/{specs}] {spec.variant} seed {spec.seed}: {record.status}", quiet_each)
            if bar is not None:
                finite = [x for x in record.losses if x is not None]
                tok = record.rows[0].tokens_per_s if record.rows else 0.0
                last = finite[-1] if finite else float("nan")
                bar.update(1, f"{spec.variant} seed {spec.seed}: loss {last:.3f}, {tok:,.0f} tok/s")
        if broken:  # a dead worker breaks the whole pool: start a new one, resubmit what it lost
            impl.reset()
            retry += list(pending.values())
            pending.clear()
        for entry in retry:
            pending[submit(entry[1])] = entry


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` in the main thread while workers run, so the
    ``finally`` that kills their process groups runs (SIGINT already raises
    KeyboardInterrupt; SIGKILL cannot be caught: the workers notice their stdin close)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (None: leave the setting alone).
    Tiny models run fastest on one thread, and much faster than on several when the
    cores are shared: threads then wait on each other."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Default:
    """A parameter's default that is told apart from the same value passed explicitly."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


_TASK = _Default("passkey")


def compare(
    variants: list[str] | tuple[str, ...] | str | None = None,
    task: str | _Default = _TASK,
    *,
    results_dir: str | Path | None = None,
    progress: bool | None = None,
    quiet: bool = True,
    threads: int | None = 1,
    jobs: int = 1,
    launcher: str | Launcher = "local",
    retries: int = 2,
    preset: str | None = None,
    config: CompareConfig | None = None,
    **fields: Any,
) -> list[ResultRow]:
    """Train and evaluate ``variants`` (default None: every registered one; an empty list is
    refused, like ``--variants ""``) on ``task`` (default ``"passkey"``) under
    the same budget and seeds; return tidy :class:`ResultRow` rows. A run that diverged
    has no rows; a ``RuntimeWarning`` says which (``compare_runs`` gives its record).

    ``fields`` are :class:`CompareConfig` fields (``seeds``, ``model``, ``train``,
    ``eval``, ``task_options``, ``variant_options``, ``backend``, ``device``); nested
    ones take dicts, e.g. ``train={"steps": 50}``, and are merged over ``preset``
    (a name in :data:`~memzoo.compare.settings.PRESETS`) if given. Or pass a whole
    ``config`` (then ``variants``, ``task``, ``preset`` and ``fields`` are a TypeError). ``threads``: torch CPU threads per run (None: unchanged); ``jobs``: runs at once
    in worker processes; ``launcher``, ``retries``: as in :func:`compare_runs`. A run that
    kept failing has no rows either; a ``RuntimeWarning`` names it.
    """
    if config is not None:
        given = [name for name, value in (("variants", variants), ("preset", preset)) if value is not None]
        given += ["task"] * (task is not _TASK) + sorted(fields)
        if given:
            raise TypeError(f"pass either config=... or variants/task/preset/fields, not both (also given: {', '.join(given)})")
    else:
        task = task.value if isinstance(task, _Default) else task
        if isinstance(variants, str):
            variants = [v for v in variants.split(",") if v]
        if variants is not None and not variants:
            raise MemzooError(
                "variants is empty; valid: variant names (see memzoo.list_variants()), or leave it out (None) for every "
                "registered variant"
            )
        base = settings_preset(preset, task) if preset is not None else {"task": task}
        config = CompareConfig(**merge(base, {**fields, "variants": tuple(variants or ())}))
    records = compare_runs(
        config, results_dir=results_dir, progress=progress, quiet=quiet, threads=threads, jobs=jobs, launcher=launcher,
        retries=retries,
    )
    from memzoo.compare.leaderboard import describe_divergence

    for record in records:  # a diverged run has no rows: say so, never just leave it out
        if record.status != "finished":
            warnings.warn(f"{describe_divergence(record.summary())}: it has no rows", RuntimeWarning, stacklevel=2)
    return [row for record in records for row in record.rows]
