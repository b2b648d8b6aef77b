"""What a comparison task is: a seeded generator of token sequences with the positions
that are scored, and the metrics computed on those positions.

Shapes used in this package: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.

A task makes a :class:`Batch`: ``tokens`` (B, T) are fed to the model; ``targets``
(B, T) is the token the model should predict *at* each position (the next token);
``mask`` (B, T) says which positions are scored (True = scored: loss and metrics
only look there). ``groups`` names the slice each example belongs to (e.g. the
passkey's depth), so accuracy can be reported by slice.

Metrics are computed from per-example sums that a streaming evaluator can
accumulate chunk by chunk (:class:`ExampleStats`), so evaluating a sequence much
longer than the training length never holds all its logits at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from memzoo.errors import InputError

Split = Literal["train", "eval"]

#: how a metric is computed from the scored positions of one example
#:  - "exact": 1 if every scored position is predicted right, else 0 (weight 1 per example)
#:  - "token_accuracy": fraction of scored positions predicted right (weight = their number)
#:  - "bits": mean negative log-likelihood in bits (weight = number of scored positions)
MetricKind = Literal["exact", "token_accuracy", "bits"]

#: which way a metric kind is better: a larger accuracy, fewer bits
HIGHER_IS_BETTER: dict[str, bool] = {"exact": True, "token_accuracy": True, "bits": False}


class TaskConfig(BaseModel):
    """Base class of a task's own fields. Every field must have a default. Strict, like
    every memzoo config: ``True`` is not 1 and ``"0.5"`` is not 0.5 (a tuple field also
    takes a JSON list through :func:`memzoo.tasks.make_task`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass
class Batch:
    tokens: Tensor  # (B, T) int64: the model's input
    targets: Tensor  # (B, T) int64: the token to predict at each position
    mask: Tensor  # (B, T) bool: True = scored
    groups: list[str] = field(default_factory=list)  # (B,) slice label of each example

    def __post_init__(self) -> None:
        if not self.groups:
            self.groups = ["all"] * self.tokens.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens.shape[0], self.tokens.shape[1])

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.mask.to(device), list(self.groups))


@dataclass
class ExampleStats:
    """Per-example sums over the scored positions, accumulated chunk by chunk."""

    scored: Tensor  # (B,) float64: number of scored positions
    correct: Tensor  # (B,) float64: of those, predicted right (argmax)
    nll: Tensor  # (B,) float64: summed negative log-likelihood, nats

    @classmethod
    def zeros(cls, batch_size: int) -> "ExampleStats":
        z = torch.zeros(batch_size, dtype=torch.float64)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        """Add one chunk: ``logits`` (B, t, V), ``targets`` (B, t), ``mask`` (B, t)."""
        m = mask.to(torch.float64)
        pred = logits.argmax(-1)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, t)
        self.scored += m.sum(1).cpu()
        self.correct += ((pred == targets).to(torch.float64) * m).sum(1).cpu()
        self.nll += (nll.to(torch.float64) * m).sum(1).cpu()


def metric_values(kind: MetricKind, stats: ExampleStats) -> tuple[Tensor, Tensor]:
    """(value, weight) per example for a metric kind; the reported number over a set
    of examples is ``sum(value * weight) / sum(weight)``."""
    n = stats.scored
    if bool((n <= 0).any()):
        raise InputError("every example needs at least one scored position")
    if kind == "exact":
        return (stats.correct == n).to(torch.float64), torch.ones_like(n)
    if kind == "token_accuracy":
        return stats.correct / n, n
    if kind == "bits":
        return stats.nll / n / math.log(2), n
    raise ValueError(f"unknown metric kind {kind!r}; valid: exact, token_accuracy, bits")


def aggregate(kind: MetricKind, stats: ExampleStats, groups: list[str]) -> dict[str, float]:
    """The metric over all examples (key ``"all"``) and over each group of examples."""
    values, weights = metric_values(kind, stats)
    out = {"all": float((values * weights).sum() / weights.sum())}
    for g in sorted(set(groups) - {"all"}):
        idx = torch.tensor([x == g for x in groups])
        out[g] = float((values[idx] * weights[idx]).sum() / weights[idx].sum())
    return out


class Task:
    """Base class of a task. Subclasses set ``name``/``Config``/``metrics`` and
    implement :meth:`vocab_size`, :meth:`min_length` and :meth:`sample`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    #: metric name -> how it is computed; the first one is the headline (plots, tables)
    metrics: ClassVar[dict[str, MetricKind]] = {}
    #: whether a larger headline metric is better (accuracy) or worse (bits); it must agree
    #: with the headline's kind (checked at registration). Every other metric's direction
    #: is its own kind's (:meth:`metric_higher_is_better`)
    higher_is_better: ClassVar[bool] = True

    def __init__(self, config: TaskConfig | None = None, **fields: object) -> None:
        if config is not None and fields:
            raise TypeError("pass either a config or fields, not both")
        if config is None:
            from memzoo.config import validate_options

            config = validate_options(self.Config, fields)
        elif not isinstance(config, self.Config):
            raise TypeError(f"task {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def headline(self) -> str:
        return next(iter(self.metrics))

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def min_length(self, split: Split = "train") -> int:
        """The shortest sequence this task's config can fill."""
        raise NotImplementedError

    def check_length(self, length: int, split: Split) -> None:
        if not isinstance(length, int) or length < self.min_length(split):
            raise InputError(
                f"task {self.name!r} with {self.config!r} needs sequences of at least "
                f"{self.min_length(split)} tokens for split {split!r}; got length={length!r}"
            )

    def sample(self, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
        """``batch_size`` sequences of ``length`` tokens drawn with ``generator``."""
        raise NotImplementedError

    def data_fingerprint(self) -> dict[str, str] | None:
        """What this task's data depends on beyond its config (e.g. a file's content, as a
        hash), or None when the config says it all. A comparison run's identity (its
        ``RunSpec`` and config hash) includes it, so changed data never reuses old results."""
        return None

    def metric_higher_is_better(self, metric: str) -> bool:
        """Whether a larger value of ``metric`` is better: from its kind (accuracy: yes,
        bits: no), so a task with a bits headline and an accuracy metric gets both right."""
        return HIGHER_IS_BETTER[self.metrics[metric]]

    def score(self, stats: ExampleStats, groups: list[str]) -> dict[str, dict[str, float]]:
        """metric -> {"all": value, group: value, ...}."""
        return {name: aggregate(kind, stats, groups) for name, kind in self.metrics.items()}


def draw(task: Task, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
    """``task.sample(...)`` held to the contract a comparison relies on: a :class:`Batch`
    whose ``tokens`` and ``targets`` are int64 (batch_size, length), ``mask`` bool of that
    shape, one group per example, token ids and scored targets in ``[0, vocab_size)``.
    A task that returns anything else (one token short, fewer rows) is refused with what
    it returned, instead of being trained and scored under the length and number of
    examples it was asked for."""
    batch = task.sample(batch_size, length, generator, split=split)
    where = f"task {task.name!r}: sample({batch_size}, {length}, split={split!r})"
    if not isinstance(batch, Batch):
        raise InputError(f"{where} returned a {type(batch).__name__}, not a memzoo.tasks.Batch")
    want = (batch_size, length)
    for name, dtype in (("tokens", torch.long), ("targets", torch.long), ("mask", torch.bool)):
        t = getattr(batch, name)
        if not isinstance(t, Tensor) or tuple(t.shape) != want or t.dtype != dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{where}: {name} must be a {dtype} tensor of shape {want} (batch_size, length); got {got}")
    if len(batch.groups) != batch_size:
        raise InputError(f"{where}: groups has {len(batch.groups)} labels for {batch_size} examples")
    if split == "eval" and bool((batch.mask.sum(1) == 0).any()):
        raise InputError(f"{where}: every evaluation example needs at least one scored position (mask)")
    v = task.vocab_size
    scored = batch.targets[batch.mask]
    for name, ids in (("token ids", batch.tokens), ("scored targets", scored)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise InputError(f"{where}: {name} must lie in [0, {v - 1}] (vocab_size={v}); got min {int(ids.min())}, max {int(ids.max())}")
    return batch


def randint(low: int, high: int, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Integers in [low, high) on CPU (generators are CPU generators, so data never
    depends on the device)."""
    return torch.randint(low, high, size, generator=generator)


def next_token_targets(tokens: Tensor) -> Tensor:
    """targets[:, t] = tokens[:, t+1]; the last position gets 0 (never scored)."""
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return targets
