"""One comparison run in its own process: ``python -m memzoo.compare.worker`` reads
``{"spec", "config", "threads", "path", "imports"}`` as JSON on stdin, runs it, writes the run
file itself (atomically, so a finished run is kept even if the parent is
interrupted) and prints the :class:`~memzoo.compare.results.RunRecord` JSON.

A fresh interpreter, not ``multiprocessing``: nothing of the parent (its
``__main__``, its threads) is re-imported or forked. The modules that define the
run's variants and task are imported first, so they must be importable by name.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> int:
    from memzoo.compare.results import RunSpec, dump, write_atomic
    from memzoo.compare.runner import run_one, torch_threads
    from memzoo.compare.settings import CompareConfig

    job = json.loads(sys.stdin.read())
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
