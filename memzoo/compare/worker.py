"""One comparison run in its own process: ``python -m memzoo.compare.worker`` reads
``{"spec", "config", "threads", "path", "imports"}`` as one line of JSON on stdin, runs
it, writes the run file itself (atomically, so a finished run is kept even if the
parent is interrupted) and prints the :class:`~memzoo.compare.results.RunRecord` JSON.

The parent keeps the worker's stdin open while it lives. The worker watches it: EOF
means the parent is gone (even killed with SIGKILL, which it cannot trap), and the
worker then kills its own process group (the parent starts each worker as a new
session), so no orphan keeps computing.

A fresh interpreter, not ``multiprocessing``: nothing of the parent (its
``__main__``, its threads) is re-imported or forked. The modules that define the
run's variants and task are imported first, so they must be importable by name.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import threading
from pathlib import Path


def _exit_when_parent_is_gone() -> None:
    """Block until stdin reaches EOF (the parent closed it or died), then kill this process group."""
    try:
        while os.read(0, 1 << 16):  # the raw fd: no buffered-reader lock held at interpreter exit
            pass
    except OSError:
        pass
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL) if os.getpgrp() == os.getpid() else os._exit(1)
    finally:
        os._exit(1)


def main() -> int:
    line = b""
    while not line.endswith(b"\n"):
        part = os.read(0, 1 << 16)
        if not part:
            return 1  # the parent is gone before sending the whole job
        line += part
    threading.Thread(target=_exit_when_parent_is_gone, name="parent-watch", daemon=True).start()
    job = json.loads(line)

    from memzoo.compare.results import RunSpec, dump, write_atomic
    from memzoo.compare.runner import run_one, torch_threads
    from memzoo.compare.settings import CompareConfig

    for module in job["imports"]:  # what registered the variants and the task in the parent
        importlib.import_module(module)
    spec = RunSpec.model_validate(job["spec"])
    config = CompareConfig.model_validate(job["config"])
    with torch_threads(job["threads"]):
        record = run_one(spec, config, progress=False)
    text = dump(record)
    if job["path"] is not None:
        write_atomic(Path(job["path"]), text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
