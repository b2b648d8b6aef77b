"""The results schema (pydantic, ``extra="forbid"``) and atomic file writing.

* :class:`ResultRow` — one tidy row: one (variant, task, seed, eval length, metric, slice).
* :class:`RunRecord` — one (variant, task, seed) run: its exact settings, their hash,
  a short loss log, its status (``finished``, or ``diverged`` with the step and the
  last finite loss: then it has no rows) and its rows. Written once, atomically, when
  the run finishes, with ``content_hash``: a hash of everything else in the file
  (spec and config hash included), checked whenever the file is loaded again.
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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from memzoo.errors import MemzooError, one_line

RUN_SCHEMA = "memzoo.compare.run/2"
LEADERBOARD_SCHEMA = "memzoo.compare.leaderboard/1"

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Provenance(_Strict):
    memzoo_version: str
    git_commit: str | None = Field(description="HEAD of the memzoo checkout, None if not a git checkout")
    git_dirty: bool | None = Field(description="memzoo/ differed from that commit (edits or new files)")
    torch_version: str
    python_version: str
    device: str = Field(description="e.g. 'cpu' or 'cuda (NVIDIA H100 80GB HBM3)'")
    threads: int = Field(description="torch CPU threads")
    config_hash: str = Field(description="hash of the run's settings (RunSpec); equal hash = same experiment")
    world_size: int = Field(1, ge=1, description="processes the run trained on (torchrun data parallel); 1 = one")
    dist_backend: str | None = Field(None, description="torch.distributed backend (gloo, nccl) when world_size > 1")
    plugin_code: dict[str, str] | None = Field(
        None,
        description="per package outside memzoo that registered the run's variant or task: sha256 of its source "
        "files (git_commit covers memzoo's own code only); None when both are memzoo's",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and self.plugin_code is None:
            out.pop("plugin_code", None)  # runs of memzoo's own variants and tasks keep the files they had
        return out


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
    tokens_per_s: float = Field(description="training throughput (compiled runs: without the first step, which compiles)")
    compile_s: float | None = Field(None, description="train.compile: wall time of the first step, which compiles; else None")
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
    task_data: dict[str, str] | None = Field(
        None, description="what the task's data depends on beyond its options (Task.data_fingerprint: e.g. the text "
        "corpus's sha256); left out of the file and the hash when None"
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and self.task_data is None:
            out.pop("task_data", None)  # runs of tasks without one keep the hashes they had
        return out

    @property
    def config_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Divergence(_Strict):
    """Why a run's numbers are not published: its training loss went non-finite or
    exploded (or its weights or scores did)."""

    step: int = Field(ge=0, description="the training step (0-based) at which it was detected")
    last_finite_loss: float | None = Field(description="the last finite training loss before it, None if none")
    reason: str


#: finished: it has its rows; diverged: training blew up (no rows, cached: it is a result);
#: failed: it kept raising or its worker kept dying (no rows, never cached: a rerun tries again)
Status = Literal["finished", "diverged", "failed"]


class RunSummary(_Strict):
    """One run's status and training curve in a leaderboard (a diverged or failed run has no rows)."""

    variant: str
    seed: int
    status: Status
    divergence: Divergence | None = None
    error: str | None = Field(None, description="why a failed run failed (its last attempt)")
    losses: list[float | None] = Field(default_factory=list, description="training loss at log_every steps")
    log_every: int = 1


class RunRecord(_Strict):
    schema_: Literal["memzoo.compare.run/2"] = Field(RUN_SCHEMA, alias="schema")
    spec: RunSpec
    config_hash: str
    status: Status = "finished"
    divergence: Divergence | None = Field(None, description="set when status is 'diverged'")
    error: str | None = Field(None, description="set when status is 'failed': why its last attempt failed")
    losses: list[float | None] = Field(
        description="training loss (nats, scored positions) at log_every steps; None where it was not finite"
    )
    log_every: int
    carried_steps: int = Field(description="steps that started from the previous step's state (RSP)")
    provenance: Provenance = Field(description="what made the run (also in every row; here for a diverged run too)")
    rows: list[ResultRow]
    content_hash: str = Field("", description="hash of the rest of the file (see content_hash()); checked on load")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)

    def computed_hash(self) -> str:
        """sha256 of the file's canonical JSON without ``content_hash``: it covers the
        spec, the config hash, the status, the losses and every row."""
        body = self.model_dump(mode="json", by_alias=True, exclude={"content_hash"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sealed(self) -> "RunRecord":
        """This record with its ``content_hash`` filled in (what is written to disk)."""
        return self.model_copy(update={"content_hash": self.computed_hash()})

    def summary(self) -> RunSummary:
        return RunSummary(
            variant=self.spec.variant, seed=self.spec.seed, status=self.status, divergence=self.divergence,
            error=self.error, losses=self.losses, log_every=self.log_every,
        )


class Leaderboard(_Strict):
    schema_: Literal["memzoo.compare.leaderboard/1"] = Field(LEADERBOARD_SCHEMA, alias="schema")
    task: str
    command: str | None = Field(None, description="the command line that produced this file")
    settings: dict[str, Any] = Field(description="the CompareConfig (variants resolved): CompareConfig.model_validate(settings)")
    eval_lengths: list[int]
    variant_options: dict[str, dict[str, Any]] = Field(description="each variant's own fields as run")
    runs: list[RunSummary] = Field(
        default_factory=list, description="every run's status; a diverged run is listed here and has no rows"
    )
    rows: list[ResultRow]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _runs_match_rows(self) -> "Leaderboard":
        """The rows are this board's and the run list and the rows tell one story. Always:
        every row is of this board's task, training length, evaluation lengths, variants and
        seeds (those its settings name), and no (variant, seed, metric, slice, length) has two
        rows. With a run list: one entry per (variant, seed); rows only of finished runs;
        every finished run with an overall (``slice="all"``) row for each metric and length
        any run has (which slices occur may depend on the examples); without one, every
        (variant, seed) with rows has those. So an edited or truncated file is refused instead
        of averaged over other rows or fewer seeds than its note says."""
        self._rows_are_this_boards()
        status: dict[tuple[str, int], str] = {}
        for run in self.runs:
            if (run.variant, run.seed) in status:
                raise ValueError(f"runs: {run.variant} seed {run.seed} is listed twice")
            status[(run.variant, run.seed)] = run.status
        keys: dict[tuple[str, int], set[tuple[str, str, int]]] = {}
        for row in self.rows:
            run = (row.variant, row.seed)
            if self.runs and status.get(run) != "finished":
                why = "has no entry in runs" if run not in status else f"is {status[run]} (such a run has no rows)"
                raise ValueError(f"rows: a row of {row.variant} seed {row.seed} ({row.metric}), but that run {why}")
            key = (row.metric, row.slice, row.eval_length)
            if key in keys.setdefault(run, set()):
                raise ValueError(f"rows: {row.variant} seed {row.seed} has two rows for {row.metric} {row.slice} at length {row.eval_length}")
            keys[run].add(key)
        overall = {run: {(m, n) for m, s_, n in found if s_ == "all"} for run, found in keys.items()}
        finished = [run for run, st in status.items() if st == "finished"] if self.runs else list(keys)
        expected = set().union(*overall.values()) if overall else set()
        for run in finished:
            missing = expected - overall.get(run, set())
            if missing:
                metric, length = sorted(missing)[0]
                raise ValueError(
                    f"rows: finished run {run[0]} seed {run[1]} lacks {len(missing)} of the {len(expected)} overall scores "
                    f"the other runs have (e.g. {metric} at length {length}); a finished run has every one"
                )
        return self

    def _rows_are_this_boards(self) -> None:
        """Every row is labelled with this board's task, training length (``hi`` of a range),
        one of its evaluation lengths, and a variant and seed its settings name (where they
        name them: an old or hand-made board may lack some settings)."""
        train = self.settings.get("train")
        length = train.get("length") if isinstance(train, dict) else None
        if isinstance(length, list) and len(length) == 2:
            length = length[1]
        train_length = length if isinstance(length, int) and not isinstance(length, bool) else None
        variants, seeds = self.settings.get("variants"), self.settings.get("seeds")
        for row in self.rows:
            label = f"a row of {row.variant} seed {row.seed} ({row.metric} at length {row.eval_length})"
            if row.task != self.task:
                raise ValueError(f"rows: {label} is of task {row.task!r}, but this is the {self.task!r} board")
            if train_length is not None and row.train_length != train_length:
                raise ValueError(
                    f"rows: {label} has train length {row.train_length}, but this board trained at {train_length}"
                )
            if row.eval_length not in self.eval_lengths:
                raise ValueError(f"rows: {label} is at a length this board does not evaluate (eval_lengths {self.eval_lengths})")
            if isinstance(variants, list) and row.variant not in variants:
                raise ValueError(f"rows: {label} is of a variant this board does not run (variants {variants})")
            if isinstance(seeds, list) and row.seed not in seeds:
                raise ValueError(f"rows: {label} is of a seed this board does not run (seeds {seeds})")


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


class ResultsFileError(MemzooError):
    """A results file that cannot be read or is not a valid one (the message names it)."""


def load_leaderboard(path: str | Path) -> Leaderboard:
    """Read a leaderboard file; a missing, unreadable or invalid file raises
    :class:`ResultsFileError` naming it and saying what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsFileError(f"cannot read leaderboard {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    try:
        return Leaderboard.model_validate_json(text)
    except ValidationError as exc:
        raise ResultsFileError(f"{path} is not a valid leaderboard file: {one_line(exc)}") from None
