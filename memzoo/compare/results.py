"""The results schema (pydantic, ``extra="forbid"``) and atomic file writing.

* :class:`ResultRow` — one tidy row: one (variant, task, seed, eval length, metric, slice).
* :class:`RunRecord` — one (variant, task, seed) run: its exact settings, their hash,
  a short loss log and its rows. Written once, atomically, when the run finishes.
* :class:`Leaderboard` — every row of a comparison plus the settings and the command
  that made it; the JSON file in ``leaderboards/``.

Every file is written to a temporary name in the same folder and moved into place
with :func:`os.replace`, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

RUN_SCHEMA = "memzoo.compare.run/1"
LEADERBOARD_SCHEMA = "memzoo.compare.leaderboard/1"

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provenance(_Strict):
    memzoo_version: str
    git_commit: str | None = Field(description="HEAD of the memzoo checkout, None if not a git checkout")
    git_dirty: bool | None = Field(description="memzoo/ differed from that commit (edits or new files)")
    torch_version: str
    python_version: str
    device: str = Field(description="e.g. 'cpu' or 'cuda (NVIDIA H100 80GB HBM3)'")
    threads: int = Field(description="torch CPU threads")
    config_hash: str = Field(description="hash of the run's settings (RunSpec); equal hash = same experiment")


class ResultRow(_Strict):
    variant: str
    task: str
    train_length: int
    eval_length: int
    seed: int
    metric: str
    slice: str = Field("all", description="'all', or the group of examples, e.g. 'depth=0.5' or 'pairs=8'")
    value: float
    higher_is_better: bool
    backend: str = Field(description="attention backend(s) that actually ran, '+'-joined")
    parameters: int
    state_bytes: int = Field(description="streaming state per sequence after eval_length tokens")
    tokens_per_s: float = Field(description="training throughput")
    eval_tokens_per_s: float
    wall_s: float = Field(description="the whole run: training and every evaluation")
    provenance: Provenance


class RunSpec(_Strict):
    """Everything that decides one run's numbers (hashed into ``config_hash``)."""

    variant: str
    variant_options: dict[str, Any]
    task: str
    task_options: dict[str, Any]
    seed: int
    model: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    eval_lengths: list[int]
    backend: str
    device: str

    @property
    def config_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class RunRecord(_Strict):
    schema_: Literal["memzoo.compare.run/1"] = Field(RUN_SCHEMA, alias="schema")
    spec: RunSpec
    config_hash: str
    losses: list[float] = Field(description="training loss (nats, scored positions) at log_every steps")
    log_every: int
    carried_steps: int = Field(description="steps that started from the previous step's state (RSP)")
    rows: list[ResultRow]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Leaderboard(_Strict):
    schema_: Literal["memzoo.compare.leaderboard/1"] = Field(LEADERBOARD_SCHEMA, alias="schema")
    task: str
    command: str | None = Field(None, description="the command line that produced this file")
    settings: dict[str, Any] = Field(description="the CompareConfig (variants resolved): CompareConfig.model_validate(settings)")
    eval_lengths: list[int]
    variant_options: dict[str, dict[str, Any]] = Field(description="each variant's own fields as run")
    rows: list[ResultRow]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` so that the file is either absent, the old one, or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dump(model: BaseModel) -> str:
    return json.dumps(model.model_dump(mode="json", by_alias=True), indent=1, sort_keys=False) + "\n"


def load(path: str | Path, cls: type[M]) -> M:
    """Read and validate a results file (raises ``pydantic.ValidationError`` if it is not one)."""
    return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


def load_leaderboard(path: str | Path) -> Leaderboard:
    return load(path, Leaderboard)
