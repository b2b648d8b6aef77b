"""Where comparison runs execute. Every launcher takes one run at a time and returns a
:class:`concurrent.futures.Future` of the run's :class:`RunRecord` JSON, so the runner
(:func:`memzoo.compare.runner.compare_runs`) treats them alike: it writes the run files
and the leaderboard itself, retries failed runs a bounded number of times and records
a run that keeps failing as failed. Results do not depend on the launcher.

* :class:`InProcess` — runs in this process, one after another (``jobs=1``).
* :class:`LocalPool` — up to ``jobs`` spawned worker processes through the standard
  library's :class:`concurrent.futures.ProcessPoolExecutor` (fresh interpreters: nothing
  of the parent is forked). Workers exit by themselves when the parent dies, however it
  dies (SIGKILL included): a watchdog thread in each worker checks that its parent is
  still the one that started it.
* :class:`RayLauncher` — each run is one Ray task with declared resources (CPUs, GPUs,
  custom); a local Ray cluster is started for the sweep, or ``address`` connects to one.
  Ray is optional (``pip install 'memzoo[ray]'``).

A run is described by a JSON-able payload (spec, config, threads, the modules that
register its variant and task, an optional TensorBoard folder), so it crosses process
and machine boundaries as plain data.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import math
import multiprocessing
import os
import sys
import threading
import time
import warnings
from typing import Any, Protocol

from memzoo.errors import MemzooError
from memzoo.extras import RAY


def execute(payload: dict[str, Any]) -> str:
    """Run one comparison run described by ``payload``; return its RunRecord JSON.
    The function every launcher runs (in this process, a pool worker or a Ray worker)."""
    from memzoo.compare.results import RunSpec, dump
    from memzoo.compare.runner import run_one, torch_threads
    from memzoo.compare.settings import CompareConfig

    for module in payload["imports"]:  # what registered the variants and the task in the driver
        importlib.import_module(module)
    spec = RunSpec.model_validate(payload["spec"])
    config = CompareConfig.model_validate(payload["config"])
    with torch_threads(payload["threads"]):
        record = run_one(spec, config, progress=None, log_dir=payload.get("log_dir"))
    return dump(record)


class Launcher(Protocol):
    name: str

    def submit(self, payload: dict[str, Any]) -> "cf.Future[str]": ...

    def reset(self) -> None:
        """Recover after a worker died (a broken pool is replaced)."""

    def close(self, cancel: bool = False) -> None: ...


class InProcess:
    """Runs in the calling process, one after another; ``submit`` returns a done future."""

    name = "in-process"

    def submit(self, payload: dict[str, Any]) -> "cf.Future[str]":
        future: cf.Future[str] = cf.Future()
        try:
            future.set_result(execute(payload))
        except Exception as exc:  # reported by the runner, like a worker's failure
            future.set_exception(exc)
        return future

    def reset(self) -> None:
        pass

    def close(self, cancel: bool = False) -> None:
        pass


def _watch_parent(parent: int, announce: bool) -> None:
    """In a pool worker: exit as soon as the parent process is gone (the worker is
    re-parented then), so no worker outlives a killed comparison."""
    if announce:
        print(f"memzoo compare: pool worker started (worker {os.getpid()})", file=sys.stderr, flush=True)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.2)

    threading.Thread(target=watch, name="memzoo-parent-watchdog", daemon=True).start()


class LocalPool:
    """Up to ``jobs`` spawned worker processes (``concurrent.futures``)."""

    name = "local pool"

    def __init__(self, jobs: int, *, quiet: bool = True) -> None:
        if jobs < 1:
            raise MemzooError(f"jobs must be >= 1, got {jobs}")
        self.jobs, self.quiet = jobs, quiet
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_watch_parent, initargs=(os.getpid(), not self.quiet),
        )

    def submit(self, payload: dict[str, Any]) -> "cf.Future[str]":
        return self._pool.submit(execute, payload)

    def reset(self) -> None:
        self.close(cancel=True)
        self._pool = self._new_pool()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            # running workers are stopped too: an interrupted comparison leaves none behind
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for proc in processes:
                if proc.is_alive():
                    proc.terminate()
            for proc in processes:
                proc.join(timeout=5)
        else:
            self._pool.shutdown(wait=True)


class RayLauncher:
    """Each run is a Ray task with ``resources`` (``{"CPU": n, "GPU": m, "custom": k}``;
    CPU defaults to the run's torch threads). Without ``address`` a local Ray cluster is
    started for the sweep with ``jobs`` times one run's CPUs (so at most ``jobs`` runs at
    once) and shut down by :meth:`close`. A run asking for more than that local cluster
    has (a GPU it lacks, a custom resource) is refused before any run starts: Ray would
    wait for it forever. Against a cluster of one's own (``address``) such a request is
    only warned about: it may add nodes, and its totals are over all of its nodes."""

    name = "ray"

    def __init__(
        self, *, address: str | None = None, resources: dict[str, float] | None = None, threads: int | None = 1,
        jobs: int = 1,
    ) -> None:
        if not RAY:
            raise MemzooError(f"--launcher ray needs Ray: pip install 'memzoo[ray]' ({RAY.message})")
        import ray

        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise MemzooError(f"jobs must be an int >= 1, got {jobs!r}")
        resources = dict(resources or {})
        for key, value in resources.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise MemzooError(f"resource {key!r} must be a finite number >= 0, got {value!r}")
        cpus = resources.pop("CPU", threads or 1)
        gpus = resources.pop("GPU", 0)
        self.resources = {"CPU": cpus, "GPU": gpus, **resources}
        # ray.init(address="local") starts a new one-node cluster, as no address does
        local = address in (None, "local") and not ray.is_initialized()
        num_cpus = local_cpus(jobs, cpus) if local else None
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            ray.init(address=address, **kwargs)
        if local:  # one node, started here: what it has is all it will ever have
            try:
                check_request(self.resources, dict(ray.cluster_resources()), where="the local Ray cluster")
            except BaseException:
                self.close()
                raise
        else:  # a cluster of its own: it may add nodes (autoscaling), and its totals span nodes: say, do not refuse
            where = f"the Ray cluster at {address}" if address else "the Ray cluster this process is connected to"
            try:
                check_request(self.resources, dict(ray.cluster_resources()), where=where)
            except MemzooError as err:
                warnings.warn(f"{err} (now; runs wait until the cluster has them, e.g. by autoscaling)", RuntimeWarning, stacklevel=2)
            except BaseException:
                self.close()
                raise
        # retries are the runner's (the same for every launcher, and reported); Ray's are off
        self._task = ray.remote(execute).options(num_cpus=cpus, num_gpus=gpus, resources=resources or None, max_retries=0)

    def submit(self, payload: dict[str, Any]) -> "cf.Future[str]":
        return self._task.remote(payload).future()

    def reset(self) -> None:
        pass

    def close(self, cancel: bool = False) -> None:
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()


def local_cpus(jobs: int, cpus_per_run: float) -> int:
    """The CPUs of a local Ray cluster for ``jobs`` runs at once, each asking for
    ``cpus_per_run`` CPUs (at least 1): --jobs caps it, as it caps the local pool."""
    return max(1, math.ceil(jobs * cpus_per_run))


def check_request(request: dict[str, float], available: dict[str, float], *, where: str) -> None:
    """Refuse a per-run resource request that ``available`` (a cluster's resources) cannot
    meet: Ray would leave such a task pending forever. (A local cluster's CPUs are
    ``local_cpus``, at least one run's: its GPUs, accelerator types and custom resources
    are what Ray detects when it starts, so the request is checked once it runs.)"""
    short = {key: amount for key, amount in request.items() if amount > 0 and amount > available.get(key, 0)}
    if not short:
        return
    asked = ", ".join(f"{key}={amount:g}" for key, amount in short.items())
    has = ", ".join(f"{key}={available.get(key, 0):g}" for key in short)
    raise MemzooError(
        f"each run asks Ray for {asked}, more than {where} has ({has}): no run could ever start; "
        "valid: per-run --resources (and CPU = --threads) within the cluster's resources, or --address of a cluster "
        "that has them"
    )


LAUNCHERS = ("local", "ray")


def make_launcher(
    name: str, *, jobs: int = 1, threads: int | None = 1, address: str | None = None,
    resources: dict[str, float] | None = None, quiet: bool = True,
) -> Launcher:
    """``"local"``: in-process for ``jobs=1``, else a pool of ``jobs`` workers; ``"ray"``."""
    if name == "local":
        if address is not None or resources:
            raise MemzooError("--address and --resources are for --launcher ray")
        return InProcess() if jobs <= 1 else LocalPool(jobs, quiet=quiet)
    if name == "ray":
        return RayLauncher(address=address, resources=resources, threads=threads, jobs=jobs)
    raise MemzooError(f"unknown launcher {name!r}; valid: {', '.join(LAUNCHERS)}")
