"""The fair trainer and the streaming evaluator.

Every variant gets the same optimiser (AdamW), steps, batch, learning-rate schedule
(linear warm-up, cosine decay) and data: training batches come from a generator
seeded by the run's seed alone, so two variants with the same seed see the same
sequences. The loss is the mean cross-entropy over the task's scored positions.
Weight decay applies to weight matrices only — the weights of ``nn.Linear`` and
``nn.Embedding`` modules — not to norms, biases, or the parameters a variant adds
outside such modules (FAM's prompt, RMT's memory embeddings, XL's position biases and
its relative-position projection ``w_r``); nanoGPT's rule is by shape (every parameter
of two or more dimensions), memzoo's by module (``TrainSettings.decay``).

Under ``torchrun`` (:mod:`memzoo.compare.distributed`) the model trains data-parallel:
every rank draws the same global batch and keeps its own rows; the loss is scaled so
that ``DistributedDataParallel``'s gradient average equals the single-process gradient
of the global batch.

A training sequence can be fed in consecutive chunks with the state carried
between them (``chunk_len``); ``detach_every=N`` cuts the gradient through the
state every N chunks (truncated backpropagation through time: the gradient of the
chunks so far is computed then, so memory stays bounded). Random State Passing
(``rsp_prob``) starts a step from the previous step's final state, passed through
the backbone's ``carry_state`` (FAM keeps only its memory; by default the whole
state, detached), instead of a fresh state.

**Lengths.** ``train.length`` is one int (every sequence that long) or a range
``[lo, hi]``: then each training sequence gets its own length, drawn uniformly from
``lo..hi`` with the run's seeded data generator (so every variant with the same seed
sees the same lengths and sequences; the task makes the rows of each distinct length
together, in ascending order of length: :func:`training_batch`). The batch is
right-padded to its longest row and fed with ``attention_mask``; the loss is the mean
over the real scored positions of the batch (padding is never scored, and its token
ids are never read). Rows are batched by *padding*, not packing: packing restarts rows
at document boundaries, which in memzoo's generic ragged path (:mod:`memzoo.ragged`)
costs one backbone call per boundary wave; right padding from a common position costs
one call for the common prefix plus one per distinct tail length, and no position is
wasted in attention (no backend sees a pad). With ``chunk_len`` each chunk gets its
slice of the mask and the state carried between chunks is a
:class:`~memzoo.ragged.RaggedState` once rows have ended at different positions
(Random State Passing carries it group by group, ``backbone.carry``). Under
``torchrun`` each rank keeps its rows of the mask too; a rank whose rows are all
padding in a chunk still gives every parameter a (zero) gradient, so the ranks'
gradient reductions match. Cost: docs/benchmarks.md, "Padded batches" (one call per
distinct length: cheap at long sequences, per-call overhead at tiny ones).

Evaluation always streams: each sequence is fed ``chunk_len`` tokens at a time
with the state carried, and only per-example sums are kept (see
:class:`memzoo.tasks.ExampleStats`), so memory stays bounded at any length (apart
from what a variant's own state holds, e.g. ``full``'s growing K/V cache).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed
from torch import Tensor

from memzoo import ops
from memzoo.compare.distributed import DistContext, split_rows
from memzoo.compare.progress import Progress
from memzoo.compare.settings import EvalSettings, TrainSettings
from memzoo.models import MemzooLM
from memzoo.ragged import RaggedState
from memzoo.state import State
from memzoo.tasks import Batch, ExampleStats, Task
from memzoo.tasks.base import draw

AnyState = State | RaggedState


def seeded(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (stable across processes and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over
    ``warmup_steps`` (reaching 1 at step ``warmup_steps - 1``), then a cosine from 1 toward
    ``min_lr_ratio`` over ``steps - warmup_steps`` steps; the last step is one short of
    its end (0.1001 for 200 steps, 20 of warm-up, ``min_lr_ratio`` 0.1). With
    ``warmup_steps >= steps`` the rate only ramps up and never reaches its peak."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    decay_steps = max(settings.steps - settings.warmup_steps, 1)
    progress = min((step - settings.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine


def carry_state(model: MemzooLM, state: AnyState) -> AnyState:
    """The state an unrelated next sequence starts from (Random State Passing); a ragged
    state (rows that ended at different positions) is carried group by group."""
    return model.backbone.carry(state)


def chunk_bounds(length: int, chunk_len: int | None) -> list[tuple[int, int]]:
    step = chunk_len or length
    return [(a, min(a + step, length)) for a in range(0, length, step)]


def training_batch(task: Task, settings: TrainSettings, generator: torch.Generator) -> tuple[Batch, Tensor | None]:
    """The next training batch and its attention mask (B, T) bool, None for one length.

    With a length range, the rows' lengths are drawn first, uniformly from ``lo..hi``
    (one draw of ``generator``), then the task makes the rows of each distinct length
    together, shortest first, and :func:`right_padded` lays them out."""
    if settings.length_range is None:
        return draw(task, settings.batch_size, settings.max_length, generator, split="train"), None
    lo, hi = settings.length_range
    lengths = torch.randint(lo, hi + 1, (settings.batch_size,), generator=generator)
    return right_padded(task, lengths, generator)


def right_padded(task: Task, lengths: Tensor, generator: torch.Generator, *, pad_id: int = 0) -> tuple[Batch, Tensor]:
    """Rows of ``lengths`` (B,) tokens, right-padded with ``pad_id`` to the longest: the
    batch (its mask is the task's scored positions, never a pad) and the attention mask
    (B, T) bool. The task's tokens, targets and scored positions of a row of length
    ``n`` are those it makes for length ``n``: padding is added after, never seen by it."""
    b, width = lengths.shape[0], int(lengths.max())
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), pad_id, dtype=torch.long)
    scored = torch.zeros(b, width, dtype=torch.bool)
    groups = ["all"] * b
    for n in sorted(set(lengths.tolist())):
        rows = (lengths == n).nonzero().flatten()
        part = draw(task, rows.numel(), n, generator, split="train")
        tokens[rows, :n], targets[rows, :n], scored[rows, :n] = part.tokens, part.targets, part.mask
        for j, r in enumerate(rows.tolist()):
            groups[r] = part.groups[j]
    real = torch.arange(width)[None, :] < lengths[:, None]
    return Batch(tokens, targets, scored, groups), real


def forward_backward(
    net: torch.nn.Module,
    tokens: Tensor,
    targets: Tensor,
    scored: Tensor,
    attention: Tensor | None,
    state: AnyState | None,
    *,
    chunk_len: int | None,
    detach_every: int,
    denominator: Tensor | float,
    touch_all: list[torch.nn.Parameter] | None = None,
    used: set[int] | None = None,
    keep_state: bool = True,
) -> tuple[Tensor, AnyState | None]:
    """One training sequence batch fed in chunks, the state carried: backpropagates
    ``sum(nll at scored positions) / denominator`` (cut every ``detach_every`` chunks)
    and returns it (float64, detached) with the final state (detached).

    ``tokens``, ``targets``, ``scored`` (B, T); ``attention`` (B, T) bool or None (every
    token real). ``scored`` must be False at padding (then a pad's id, target and logit
    never reach the loss or the gradient). ``touch_all``: parameters added to every
    backward with weight 0 (see :func:`train`: DDP's reducer needs every parameter in
    every rank's backward); ``used``: with ``touch_all``, gets the ids of the parameters
    the loss itself reaches (:func:`graph_parameters`), so that those it does not reach can
    be given back no gradient (None, as without the touch). ``keep_state=False``: the
    final state is not wanted (None is returned), so the last chunk of a padded batch runs as one call (the rows' real
    tokens moved to the front; exact by causality, see :func:`memzoo.ragged.forward`)
    instead of one call per distinct row length."""
    chunks = chunk_bounds(tokens.shape[1], chunk_len)
    pending: Tensor | None = None
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    for i, (a, b) in enumerate(chunks):
        last = i == len(chunks) - 1
        if attention is None:
            logits, state = net(tokens[:, a:b], state)
        elif last and not keep_state:
            logits, state = net(tokens[:, a:b], state, attention_mask=attention[:, a:b], return_state=False)
        else:
            logits, state = net(tokens[:, a:b], state, attention_mask=attention[:, a:b])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, a:b], reduction="none")  # (B, t)
        loss = (nll * scored[:, a:b]).sum() / denominator
        pending = loss if pending is None else pending + loss
        if last or (detach_every and (i + 1) % detach_every == 0):
            if touch_all:
                if used is not None:
                    used |= graph_parameters(pending)
                pending = pending + sum((p.reshape(-1)[:1].sum() * 0.0 for p in touch_all), torch.zeros((), device=tokens.device))
            pending.backward()
            total += pending.detach().double()
            pending = None
            if state is not None:
                state = state.detach()
    return total, state


def graph_parameters(loss: Tensor) -> set[int]:
    """The ids of the leaf tensors (parameters) whose gradient ``loss.backward()`` sets:
    the ``AccumulateGrad`` nodes of its autograd graph."""
    found: set[int] = set()
    seen: set[object] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            found.add(id(variable))
        todo.extend(f for f, _ in node.next_functions)
    return found


def param_groups(model: torch.nn.Module, weight_decay: float, decay: str = "matrices") -> list[dict]:
    """AdamW groups. ``decay="matrices"``: decay for the weights of Linear and Embedding
    modules, none for everything else (norms, biases, learned prompts and memory
    embeddings); ``"all"``: every parameter (memzoo before this setting existed, e.g. the
    leaderboards of e2d9391)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    matrices = {
        id(m.weight) for m in model.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
    }
    return [
        {"params": [p for p in params if id(p) in matrices], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in matrices], "weight_decay": 0.0},
    ]


@dataclass
class Diverged:
    """Training stopped: the loss (or the gradient, or the weights) went non-finite or exploded."""

    step: int
    last_finite_loss: float | None
    reason: str


@dataclass
class TrainReport:
    losses: list[float] = field(default_factory=list)  # (steps,) mean scored loss per step, nats
    carried_steps: int = 0  # steps started from the previous step's state (RSP)
    tokens: int = 0
    wall_s: float = 0.0
    diverged: Diverged | None = None  # set when training stopped early (see TrainSettings.explode_factor)
    #: with ``TrainSettings.compile``: the first step's wall time (it compiles), kept out of
    #: ``tokens`` and ``wall_s`` so ``tokens_per_s`` is the compiled steps' throughput
    compile_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


#: the torch.compile backend of ``TrainSettings.compile`` (tests set "eager": tracing only)
COMPILE_BACKEND = "inductor"


#: ``cpp_wrapper`` on the CPU (:func:`compile_options`) only for a step this small: at most
#: this many activation elements per layer (rows x tokens x d_model) ...
CPP_WRAPPER_MAX_ELEMENTS = 1 << 20
#: ... and at most this many unrolled blocks (layers x blocks per call), the size of the
#: generated code. At the leaderboard size (16 x 64 x 64 = 65k elements, 2 layers x 8
#: blocks = 16) the C++ wrapper was 1.02-1.09x faster than inductor's Python one. At
#: bench_train's mid size (2.1M elements, 4 x 16 = 64 blocks) a step takes seconds, so the
#: wrapper's per-kernel overhead is noise, and g++ on ``fam``'s one generated wrapper file
#: (1.7 MB, the forward's 64 unrolled FAM updates) ran for more than 15 CPU minutes and was
#: stopped, where the Python wrapper compiled forward and backward in 216 s. A tiny model
#: on long sequences makes a larger graph still (2 layers x 64 blocks), hence both bounds.
CPP_WRAPPER_MAX_BLOCKS = 16


def compile_options(device: torch.device, *, rows: int, tokens: int, d_model: int, n_layers: int, block_size: int) -> dict[str, object]:
    """Inductor options of a compiled training step (``memzoo compare --compile`` and
    ``benchmarks/bench_train.py --compile``) whose compiled calls take ``rows`` x
    ``tokens`` tokens. On the CPU, for a small step (:data:`CPP_WRAPPER_MAX_ELEMENTS`,
    :data:`CPP_WRAPPER_MAX_BLOCKS`), ``cpp_wrapper``: the graph's kernels are called from
    generated C++ instead of a Python wrapper, which at small sizes is per-kernel overhead
    (docs/benchmarks.md, "Compiled training step"); otherwise, and on other devices,
    inductor's defaults."""
    sizes = {"rows": rows, "tokens": tokens, "d_model": d_model, "n_layers": n_layers, "block_size": block_size}
    bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise ValueError(f"compile_options: every size must be an int >= 1, got {bad}")
    small = rows * tokens * d_model <= CPP_WRAPPER_MAX_ELEMENTS and n_layers * -(-tokens // block_size) <= CPP_WRAPPER_MAX_BLOCKS
    return {"cpp_wrapper": True} if device.type == "cpu" and small else {}


def compile_module(net: torch.nn.Module, device: torch.device, **step: int) -> torch.nn.Module:
    """``torch.compile(net)`` with :data:`COMPILE_BACKEND` (and, for inductor,
    :func:`compile_options` for a step of the sizes ``step``)."""
    options = compile_options(device, **step) if COMPILE_BACKEND == "inductor" else {}
    return torch.compile(net, backend=COMPILE_BACKEND, **({"options": options} if options else {}))  # type: ignore[return-value]


def train(
    model: MemzooLM,
    task: Task,
    settings: TrainSettings,
    *,
    seed: int,
    progress: Progress | None = None,
    dist: DistContext | None = None,
    log: Callable[[int, float, float], None] | None = None,
) -> TrainReport:
    """Train ``model`` in place on ``task``; deterministic given ``seed`` on CPU.

    ``progress``: anything with ``update(n, note)``, shown the loss and throughput each
    step; ``dist``: train data-parallel across the ranks of a torch.distributed group
    (the global batch ``settings.batch_size`` is split evenly); ``log(step, loss, lr)``
    is called after every step (TensorBoard)."""
    device = next(model.parameters()).device
    data = seeded("train-data", task.name, seed)
    coin = seeded("rsp", seed)
    rows = split_rows(settings.batch_size, dist)
    net: torch.nn.Module = model
    if dist is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if settings.compile:
        # the model's forward is compiled (a padded batch's host-side bookkeeping stays eager: graph breaks there)
        backbone = model.backbone
        net = compile_module(
            net, device, rows=rows.stop - rows.start, tokens=min(settings.chunk_len or settings.max_length, settings.max_length),
            d_model=backbone.d_model, n_layers=backbone.n_layers, block_size=backbone.block_size,
        )
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay, settings.decay), lr=settings.lr, betas=settings.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    report = TrainReport()
    previous: AnyState | None = None
    model.train()
    start = time.perf_counter()
    limit = math.inf
    last_finite: float | None = None
    # under DDP every parameter must be in every backward, or the reducer stops at the next
    # step ("Expected to have finished reduction in the prior iteration"): a rank whose rows
    # are all padding in a chunk leaves the backbone out; a step that starts from a carried
    # state (RSP) or a backward after a detach (detach_every) leaves out the learned initial
    # state (FAM's prompt, RMT's memory embeddings, BRT's initial state) or what only the
    # state update uses, and those would leave the reducer waiting. Every parameter is touched
    # (a zero gradient); one that no rank's loss reached is then given back no gradient, as
    # in one process, so AdamW skips it there too (a zero gradient would still move it by
    # its momentum and decay it)
    touch_all = list(model.parameters()) if dist is not None else None
    for step in range(settings.steps):
        # every rank draws the same global batch (same generator) and keeps its own rows
        batch, attention = training_batch(task, settings, data)
        batch = batch.to(device)
        tokens, targets, mask = batch.tokens[rows], batch.targets[rows], batch.mask[rows]
        real = attention[rows].to(device) if attention is not None else None
        # drawn every step, so the data stream does not depend on rsp_prob
        pass_state = bool(torch.rand((), generator=coin) < settings.rsp_prob)
        state = carry_state(model, previous) if (pass_state and previous is not None) else None
        report.carried_steps += state is not None
        used: set[int] | None = set() if dist is not None else None
        # normalised by the global batch's scored positions; x world size because DDP averages gradients
        scored = batch.mask.sum().clamp(min=1) / (dist.world_size if dist is not None else 1)
        with ops.propagate_non_finite(settings.non_finite == "propagate"):
            total_t, state = forward_backward(
                net, tokens, targets, mask, real, state, chunk_len=settings.chunk_len, detach_every=settings.detach_every,
                denominator=scored, touch_all=touch_all, used=used, keep_state=settings.rsp_prob > 0,
            )
        if dist is not None and touch_all is not None and used is not None:
            # a parameter no rank's loss reached gets no gradient, as in one process
            reached = torch.tensor([float(id(p) in used) for p in touch_all], device=device)
            torch.distributed.all_reduce(reached, op=torch.distributed.ReduceOp.MAX)
            for p, r in zip(touch_all, reached.tolist()):
                if not r:
                    p.grad = None
        if dist is not None:  # the global batch's loss: the ranks' shares, averaged
            total_t /= dist.world_size
            torch.distributed.all_reduce(total_t)
        total = float(total_t)
        report.losses.append(total)
        if settings.compile and step == 0:  # the step that compiled: timed apart
            report.compile_s = time.perf_counter() - start
            start = time.perf_counter()
        else:
            report.tokens += batch.tokens.numel() if attention is None else int(attention.sum())
        if step == 0 and math.isfinite(total):
            limit = settings.explode_factor * max(total, math.log(max(task.vocab_size, 2)))
        if not math.isfinite(total) or total > limit:
            why = f"loss {total:.4g} is not finite" if not math.isfinite(total) else f"loss {total:.4g} exceeds {limit:.4g}"
            report.diverged = Diverged(step, last_finite, why)
            break
        last_finite = total
        # the norm is checked with or without clipping: unchecked, a non-finite gradient would
        # be applied and the run reported a step late, as a non-finite loss
        if settings.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip))
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            # the 2-norm over every gradient, as clip_grad_norm_ computes it (get_total_norm is torch >= 2.6)
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        if not math.isfinite(norm):
            report.diverged = Diverged(step, last_finite, f"gradient norm {norm} is not finite")
            break
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        opt.zero_grad(set_to_none=True)
        previous = state
        if log is not None:
            log(step, total, lr)
        if progress is not None:
            elapsed = time.perf_counter() - start
            progress.update(1, f"loss {total:.3f}, {report.tokens / elapsed if elapsed > 0 else 0:,.0f} tok/s")
    if report.diverged is None and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        report.diverged = Diverged(settings.steps, last_finite, "the trained weights are not finite")
    report.wall_s = time.perf_counter() - start
    return report


@dataclass
class EvalReport:
    scores: dict[str, dict[str, float]]  # metric -> slice -> value
    state_bytes: int  # per sequence, at the end of the evaluated length
    tokens_per_s: float


@torch.no_grad()
def stream_stats(
    model: MemzooLM, tokens: Tensor, targets: Tensor, scored: Tensor, *, chunk_len: int,
    attention: Tensor | None = None,
) -> tuple[ExampleStats, AnyState]:
    """Per-example sums over ``tokens`` (B, T) fed ``chunk_len`` tokens at a time, the
    state carried. ``attention`` (B, T): a batch of rows of different lengths (padding
    False; ``scored`` must be False there too): each row's sums are what it gets alone."""
    stats = ExampleStats.zeros(tokens.shape[0])
    state: AnyState | None = None
    for a, b in chunk_bounds(tokens.shape[1], chunk_len):
        if attention is None:
            logits, state = model(tokens[:, a:b], state)
        else:
            logits, state = model(tokens[:, a:b], state, attention_mask=attention[:, a:b])
        stats.add(logits, targets[:, a:b], scored[:, a:b])
    assert state is not None
    return stats, state


@torch.no_grad()
def evaluate(
    model: MemzooLM,
    task: Task,
    length: int,
    settings: EvalSettings,
    *,
    chunk_len: int,
    seed: int,
) -> EvalReport:
    """Score ``settings.examples`` sequences of ``length`` tokens, streamed in chunks.

    Every batch here has one length (the eval lengths are scored one at a time), so it is
    fed without a mask; :func:`stream_stats` takes one for a batch of mixed lengths."""
    device = next(model.parameters()).device
    model.eval()
    full = draw(task, settings.examples, length, seeded("eval-data", task.name, seed, length), split="eval")
    parts: list[ExampleStats] = []
    state_bytes = 0
    start = time.perf_counter()
    for lo in range(0, settings.examples, settings.batch_size):
        hi = min(lo + settings.batch_size, settings.examples)
        tokens, targets, mask = (t[lo:hi].to(device) for t in (full.tokens, full.targets, full.mask))
        stats, state = stream_stats(model, tokens, targets, mask, chunk_len=chunk_len)
        state_bytes = max(state_bytes, state.nbytes // (hi - lo))
        parts.append(stats)
    wall = time.perf_counter() - start
    stats = ExampleStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("scored", "correct", "nll")))
    return EvalReport(task.score(stats, full.groups), state_bytes, settings.examples * length / wall if wall > 0 else 0.0)
