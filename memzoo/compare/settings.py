"""What a comparison runs: one pydantic config (``extra="forbid"``, every field a
default) shared by every variant, plus each variant's own fields for small settings.

Fairness is structural: every variant gets the same :class:`ModelSettings`,
:class:`TrainSettings`, :class:`EvalSettings`, task and seeds. Only the variant's
own fields differ; they come from one declared place, :data:`SMALL_SETTING_DEFAULTS`.
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_serializer, model_validator

from memzoo.errors import MemzooError, UnknownNameError

#: an int that is an int (not a bool, not a string, not a float), also inside tuples
StrictInt = Annotated[int, Strict()]
#: a finite float (an int is accepted as a number; bools and strings are not)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    """Settings are checked strictly, like :class:`memzoo.ModelConfig`: no coercion
    (``true`` is not 1, ``"7"`` is not 7), finite floats only, unknown names refused.
    Tuples also accept a JSON list (their items are still strict)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _no_duplicates(name: str, values: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} are listed more than once: {list(values)}")
    return values


#: ModelConfig fields a comparison does not take from ``model``: the variant and its
#: options (per variant), the backend (``CompareConfig.backend``), the vocabulary (the task's)
_NOT_SHARED = ("variant", "options", "backend", "vocab_size")
#: a comparison's own defaults for some shared fields (small models); the rest keep ModelConfig's
_COMPARE_DEFAULTS: dict[str, Any] = {"d_model": 32, "n_layers": 2, "n_heads": 2, "block_size": 8}


def _model_settings() -> type[BaseModel]:
    """:class:`ModelSettings`: every shared field of :class:`memzoo.ModelConfig`, declared
    there once (bounds, strictness, descriptions), with the comparison's small defaults."""
    from pydantic import create_model
    from pydantic.fields import FieldInfo

    from memzoo.config import ModelConfig

    fields: dict[str, Any] = {}
    for name, info in ModelConfig.model_fields.items():
        if name in _NOT_SHARED:
            continue
        if name in _COMPARE_DEFAULTS:
            info = FieldInfo.merge_field_infos(info, default=_COMPARE_DEFAULTS[name])
        fields[name] = (info.annotation, info)
    return create_model(  # type: ignore[call-overload,no-any-return]
        "ModelSettings", __base__=_Strict, __module__=__name__,
        __doc__="The shared model fields every variant is built with (those of memzoo.ModelConfig).", **fields,
    )


ModelSettings = _model_settings()


#: one of AdamW's betas: a finite float in [0, 1) (torch refuses any other at the first step)
_Beta = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]


class TrainSettings(_Strict):
    """The training budget: identical for every variant."""

    steps: int = Field(200, ge=0)
    batch_size: int = Field(16, ge=1)
    length: StrictInt | Annotated[tuple[StrictInt, StrictInt], Strict(False)] = Field(
        64,
        description="training sequence length: an int, or a range [lo, hi] (2 <= lo <= hi): each training sequence then "
        "gets its own length, drawn uniformly from lo..hi, and the batch is right-padded (see memzoo.compare.trainer)",
    )
    chunk_len: int | None = Field(
        None, ge=1, description="feed each training sequence in chunks of this many tokens, carrying the state; None = one call"
    )
    detach_every: int = Field(
        0, ge=0, description="cut the gradient through the state every N chunks (truncated BPTT; needs chunk_len); 0 = never"
    )
    rsp_prob: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Random State Passing: probability that a step starts from the previous step's final state "
        "(through the backbone's carry_state) instead of a fresh one",
    )
    lr: float = Field(3e-3, gt=0.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0.0)
    decay: Literal["matrices", "all"] = Field(
        "matrices", description="what AdamW decays: the weight matrices of Linear/Embedding modules (by module; "
        "nanoGPT's rule is every parameter of 2+ dimensions, which would also take XL's w_r and the learned states), "
        "or every parameter (norms, biases, prompts too; memzoo before this setting existed)",
    )
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.95), strict=False, description="AdamW's betas, each in [0, 1)")
    warmup_steps: int = Field(
        20, ge=0, description="linear warm-up, then cosine decay toward min_lr_ratio * lr (reached one step after the last; "
        "a run no longer than its warm-up never reaches lr)",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0.0, description="clip the gradient norm; None = no clipping")
    explode_factor: float = Field(
        10.0, gt=1.0,
        description="the run has diverged (and is reported as such, with no scores) when a step's loss is not finite "
        "or exceeds explode_factor * max(first step's loss, ln(vocab size))",
    )
    compile: bool = Field(
        False,
        description="train through torch.compile(model) (inductor); the first step, which compiles, is timed apart "
        "(compile_s) and left out of tokens_per_s. Left out of the settings dump (and the run hash) when False, so "
        "eager runs keep the hashes they had before the field existed",
    )
    non_finite: Literal["isolate", "propagate"] = Field(
        "isolate",
        description="the training steps' attention calls: 'isolate' keeps a NaN/inf key or value away from the queries "
        "that may not see it (memzoo.ops' default); 'propagate' does not (memzoo.ops.propagate_non_finite): the same "
        "losses while everything is finite; a NaN/inf key or value may then reach positions that may not see it, so "
        "one anywhere in a batch can make the loss NaN (reported as divergence). Faster where the isolation runs on "
        "every call: compiled steps, GPUs. Evaluation always isolates. Left out of the settings dump (and the run "
        "hash) when 'isolate'",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and not self.compile:
            out.pop("compile", None)
        if isinstance(out, dict) and self.non_finite == "isolate":
            out.pop("non_finite", None)
        return out

    @model_validator(mode="after")
    def _detach_needs_chunks(self) -> "TrainSettings":
        if self.detach_every and self.chunk_len is None:
            raise ValueError(
                f"train.detach_every={self.detach_every} cuts the gradient between chunks, but train.chunk_len is not set "
                "(each sequence is one call: there is nothing to cut); valid: set train.chunk_len too, or detach_every=0"
            )
        return self

    @field_validator("length", mode="before")
    @classmethod
    def _length(cls, v: Any) -> Any:
        """One clear message for every bad length (pydantic's union errors name both arms)."""
        valid = "an int >= 2, or a range [lo, hi] of two ints with 2 <= lo <= hi"
        if _is_int(v):
            if v < 2:
                raise ValueError(f"train.length must be >= 2, got {v}; valid: {valid}")
            return v
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_int, v)):
            lo, hi = v
            if lo < 2:
                raise ValueError(f"train.length range [{lo}, {hi}]: lo must be >= 2; valid: {valid}")
            if lo > hi:
                raise ValueError(f"train.length range [{lo}, {hi}]: lo must be <= hi; valid: {valid}")
            return (lo, hi)
        raise ValueError(f"train.length must be {valid}; got {v!r}")

    @property
    def length_range(self) -> tuple[int, int] | None:
        """(lo, hi) when the training length is a range, None when it is one int."""
        return None if isinstance(self.length, int) else self.length

    @property
    def min_length(self) -> int:
        return self.length if isinstance(self.length, int) else self.length[0]

    @property
    def max_length(self) -> int:
        """The longest training sequence (the padded batch's width at most)."""
        return self.length if isinstance(self.length, int) else self.length[1]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class EvalSettings(_Strict):
    """Evaluation, through the streaming path (chunks carrying the state)."""

    lengths: tuple[StrictInt, ...] = Field(
        (), strict=False, description="sequence lengths to evaluate at; () = the train length (hi of a range), 2x and 4x"
    )
    examples: int = Field(64, ge=1, description="sequences per length")
    batch_size: int = Field(32, ge=1)
    chunk_len: int | None = Field(None, ge=1, description="streaming chunk; None = the training length")

    @field_validator("lengths")
    @classmethod
    def _distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return _no_duplicates("eval lengths", v)


class CompareConfig(_Strict):
    """Everything a comparison runs; ``compare(**fields)`` and the CLI build one."""

    task: str = "passkey"
    task_options: dict[str, Any] = Field(default_factory=dict, description="the task's own fields")
    variants: tuple[str, ...] = Field((), strict=False, description="variant names; () = every registered variant")
    seeds: tuple[Annotated[int, Strict(), Field(ge=0, lt=2**63)], ...] = Field((0,), min_length=1, strict=False)
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    variant_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-variant overrides of its own fields, e.g. {'fam': {'fam_len': 4}}"
    )
    backend: str = Field("auto", description="attention backend name, or 'auto'")
    device: str = "cpu"

    @field_validator("task_options", "variant_options")
    @classmethod
    def _as_json(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Options are JSON values, kept in their JSON form (a tuple is a list), so a
        config equals itself read back from a leaderboard file."""
        try:
            return json.loads(json.dumps(v, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options must be JSON values (finite numbers, strings, lists, objects): {exc}") from None

    @model_validator(mode="after")
    def _check(self) -> "CompareConfig":
        from memzoo.ops import check_backend_name
        from memzoo.registry import get_variant
        from memzoo.tasks import make_task

        task = make_task(self.task, **self.task_options)  # refuses unknown tasks and fields
        strict_task_options(self.task, self.task_options)
        for name in (*self.variants, *self.variant_options):
            get_variant(name)
        _no_duplicates("variants", self.variants)
        _no_duplicates("seeds", self.seeds)
        check_backend_name(self.backend)
        check_device(self.device)
        check_backend_runs(self.backend, self.device, self.model, training=self.train.steps > 0)
        running = self.variant_names
        idle = sorted(set(self.variant_options) - set(running))
        if idle:
            raise ValueError(
                f"variant_options for variant(s) {idle} that this comparison does not run (variants: {', '.join(running)})"
            )
        for name in running:  # every variant's whole config, before the first run starts
            check_model(name, self.model, self.variant_options.get(name), vocab_size=task.vocab_size, backend=self.backend)
        bad = [n for n in self.eval.lengths if n < 2]
        if bad:
            raise ValueError(f"eval lengths must be >= 2, got {bad}")
        try:  # fail now, not after training
            task.check_length(self.train.min_length, "train")
        except MemzooError as exc:
            if self.train.length_range is None:
                raise
            raise ValueError(f"{exc} (the shortest of train.length range {list(self.train.length_range)})") from None
        for n in self.eval_lengths:
            task.check_length(n, "eval")
        # a task's batches fit its contract (shapes, dtypes, ids in its vocabulary): a
        # plug-in task that breaks it fails here, not in every run after its training
        import torch

        from memzoo.tasks.base import draw

        checks = [("train", self.train.min_length), ("train", self.train.max_length), *(("eval", n) for n in self.eval_lengths)]
        for split, n in dict.fromkeys(checks):
            draw(task, 2, n, torch.Generator().manual_seed(0), split=split)  # type: ignore[arg-type]
        return self

    @property
    def variant_names(self) -> list[str]:
        from memzoo.registry import list_variants

        return list(self.variants) or list_variants()

    @property
    def train_length(self) -> int:
        """The training length results are labelled with: the longest (``hi`` of a range)."""
        return self.train.max_length

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        n = self.train_length
        return self.eval.lengths or (n, 2 * n, 4 * n)

    @property
    def eval_chunk(self) -> int:
        return self.eval.chunk_len or self.train_length


def strict_task_options(task: str, options: dict[str, Any]) -> None:
    """Refuse task options a strict check refuses (``true`` for an int, ``"7"``, NaN):
    the task's config is validated from the options' JSON form in strict mode."""
    from memzoo.tasks import get_task

    try:
        text = json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"task_options must be JSON values (finite numbers, strings, lists): {exc}") from None
    try:
        get_task(task).Config.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ValueError(f"task_options for {task!r}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    from memzoo.errors import one_line

    return one_line(exc)


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse or that this build or machine lacks, before any run."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch build or machine has no CUDA (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {device!r}: MPS is not available here")
        return
    raise ValueError(f"device {device!r} is not supported by memzoo (valid: cpu, cuda[:N], mps)")


def check_backend_runs(backend: str, device: str, model: "ModelSettings", *, training: bool) -> None:
    """Refuse, before any run, a named backend that cannot run this comparison's
    attention calls on ``device`` (e.g. ``flex`` training on CPU); the reasons come
    from the backend's declaration."""
    if backend == "auto":
        return
    import torch

    from memzoo.ops import BackendUnavailable, resolve_backend_name
    from memzoo.ops.layout import BlockLayout

    try:
        resolve_backend_name(
            backend, device=device, dtype=torch.float32, training=training,
            layout=BlockLayout(block_size=model.block_size, window=model.block_size),
            head_dim=model.d_model // model.n_heads if model.d_model % model.n_heads == 0 else None,
        )
    except BackendUnavailable as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(" ".join(lines[:2])) from None


def check_model(
    name: str, model: "ModelSettings", overrides: dict[str, Any] | None, *, vocab_size: int, backend: str
) -> None:
    """Validate variant ``name``'s whole model config (shared settings + its own
    fields) as :func:`memzoo.build_model` will, without building it."""
    from memzoo.config import ModelConfig

    options = variant_options(name, model, overrides)
    try:
        ModelConfig(variant=name, vocab_size=vocab_size, backend=backend, **model.model_dump(), **options)
    except ValidationError as exc:
        raise ValueError(f"variant {name!r}: {_first_error(exc)}") from None


#: Defaults for variants' own fields at small settings, keyed by *field name* and
#: derived from the shared model settings. A variant gets the entries whose names are
#: fields of its config; any other field keeps the variant's own default, so a variant
#: registered later works unchanged (and can be tuned with ``variant_options``).
def _sink_count(m: ModelSettings) -> int:
    return max(1, m.block_size // 8)  # the paper's 4 sinks of a 1024-token cache, scaled


#: Per variant, its own fields' values at a comparison's small settings, derived from the
#: shared model settings. Keyed by variant *and* field: a plug-in's field that happens to
#: share a name with a built-in's (a ``window`` of another meaning) keeps its own default.
#: A plug-in may add its own entry when it registers.
SMALL_SETTING_DEFAULTS: dict[str, dict[str, Callable[[ModelSettings], Any]]] = {
    "bswa": {"memory_blocks": lambda m: 1},  # one previous block in full
    "fam": {
        "memory_blocks": lambda m: 1,
        "fam_len": lambda m: max(1, m.block_size // 4),  # working memory vectors (paper: 64 of 1024)
    },
    "xl": {"memory_len": lambda m: m.block_size},  # as many cached positions as one bswa memory block
    "rmt": {"num_memory_tokens": lambda m: 4},  # read/write memory tokens
    "brt": {"num_states": lambda m: m.block_size},  # as many recurrent states as tokens in a block (paper: 512 of 512)
    "sinks": {
        "num_sinks": _sink_count,
        # sinks + window = 2 blocks, the most keys bswa with one memory block sees
        "window": lambda m: 2 * m.block_size - _sink_count(m),
    },
}


def variant_options(name: str, model: ModelSettings, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The variant's own fields for a comparison: its :data:`SMALL_SETTING_DEFAULTS`
    entry (none: its config's defaults), then ``overrides`` (refused if not a field of it)."""
    from memzoo.registry import get_variant

    fields = get_variant(name).config.model_fields
    own = SMALL_SETTING_DEFAULTS.get(name, {})
    stray = set(own) - set(fields)
    if stray:  # a table entry for a field the variant does not have would be silently unused
        raise UnknownNameError(f"SMALL_SETTING_DEFAULTS[{name!r}] names {sorted(stray)}, not fields of {name!r}; valid: {', '.join(sorted(fields))}")
    chosen = {key: make(model) for key, make in own.items()}
    unknown = set(overrides or {}) - set(fields)
    if unknown:
        raise UnknownNameError(
            f"unknown option(s) {sorted(unknown)} for variant {name!r}; valid: {', '.join(sorted(fields)) or '(none)'}"
        )
    chosen.update(copy.deepcopy(overrides or {}))
    return chosen


#: Named settings. ``tiny`` is the README's main job (all variants, under a minute on
#: 2 CPU cores); ``small`` made the committed leaderboards (about 15 minutes per task
#: and two seeds on 2 shared CPU cores). Per task; ``"*"`` applies to tasks without
#: their own entry. Values are CompareConfig fields (nested dicts).
_TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "block_size": 8}
_TINY_TRAIN = {"steps": 300, "batch_size": 16, "length": 32, "lr": 3e-3, "warmup_steps": 20}
_TINY_EVAL = {"lengths": (32, 64, 128), "examples": 48, "batch_size": 48}
_SMALL_TRAIN = {"steps": 800, "batch_size": 16, "length": 64, "lr": 3e-3, "warmup_steps": 40}
_SMALL_EVAL = {"lengths": (64, 128, 256, 512), "examples": 60, "batch_size": 60}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "passkey": {
            "task_options": {"n_digits": 2, "n_filler": 4, "eval_depths": (0.0, 0.5, 1.0)},
            "model": _TINY_MODEL, "train": _TINY_TRAIN, "eval": _TINY_EVAL,
        },
        "mqar": {
            "task_options": {"n_keys": 16, "n_values": 16, "num_pairs": 4, "eval_pairs": (2, 4, 8)},
            "model": _TINY_MODEL, "train": _TINY_TRAIN, "eval": _TINY_EVAL,
        },
        "copy": {"task_options": {"n_symbols": 8, "segment_len": 4}, "model": _TINY_MODEL, "train": _TINY_TRAIN, "eval": _TINY_EVAL},
        "*": {"model": _TINY_MODEL, "train": _TINY_TRAIN, "eval": _TINY_EVAL},
    },
    "small": {
        "passkey": {
            "task_options": {"n_digits": 2, "n_filler": 4, "eval_depths": (0.0, 0.25, 0.5, 0.75, 1.0)},
            "model": _TINY_MODEL, "train": _SMALL_TRAIN, "eval": _SMALL_EVAL,
        },
        "mqar": {
            "task_options": {"n_keys": 16, "n_values": 16, "num_pairs": 4, "eval_pairs": (2, 4, 8)},
            "model": _TINY_MODEL, "train": _SMALL_TRAIN, "eval": _SMALL_EVAL,
        },
        "copy": {"task_options": {"n_symbols": 8, "segment_len": 8}, "model": _TINY_MODEL, "train": _SMALL_TRAIN, "eval": _SMALL_EVAL},
        "*": {"model": _TINY_MODEL, "train": _SMALL_TRAIN, "eval": _SMALL_EVAL},
    },
}


def preset(name: str, task: str) -> dict[str, Any]:
    """The CompareConfig fields of preset ``name`` for ``task`` (a fresh copy)."""
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    table = PRESETS[name]
    fields = copy.deepcopy(table.get(task, table.get("*", {})))
    fields["task"] = task
    return fields


#: the groups of settings: set their fields (``train.steps=5``), never the whole group
GROUPS = ("model", "train", "eval", "task_options", "variant_options")


def merge(base: dict[str, Any], override: dict[str, Any], *, _path: str = "") -> dict[str, Any]:
    """Nested dict update: ``override`` wins, sub-dicts are merged key by key. A group
    of settings (a dict, e.g. the preset's ``train``) is never replaced by a non-dict:
    that would silently drop every setting in it."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{_path}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, _path=f"{where}.")
        elif (isinstance(out.get(key), dict) or (not _path and key in GROUPS)) and not isinstance(value, dict):
            raise MemzooError(
                f"{where!r} is a group of settings, not a value: set its fields, e.g. {where}.FIELD=VALUE (got {value!r})"
            )
        else:
            out[key] = copy.deepcopy(value)
    return out
