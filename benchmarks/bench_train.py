"""Training-step cost of every registered variant, side by side in one process (issue 13).

For every variant in the registry (plus ``xl`` with ``positions="rope"``), one training
step = forward + cross-entropy loss + backward (no optimizer), one torch thread,
float32, on CPU (or, with ``--device cuda``, on one GPU: float32 without TF32, each
timing closed by ``torch.cuda.synchronize``). The contenders are interleaved: each round times every contender once
(``--inner`` steps each, after warm-up), and a square fp32 matmul is timed in the same
rounds, so every ratio and fraction compares numbers measured under the same load.

Printed per contender (JSON on stdout):

* ``step_s_median`` / ``step_s_min``: seconds per step over the rounds;
* ``vs_bswa_median`` / ``vs_bswa_min``: the median (and the min) over rounds of this
  contender's step time over ``bswa``'s in the same round;
* ``vs_xl_rope_median`` / ``vs_xl_rope_min`` (``xl`` with relative positions): the same
  against ``xl`` with RoPE;
* ``tokens_per_s``: B·T / median step time;
* ``model_flops_per_step``, ``model_flops_per_s`` and ``fraction_of_matmul``;
* ``executed_flops_per_step`` and ``executed_fraction_of_matmul``: the FLOPs the step
  actually runs (:func:`executed_flops`), over the same matmul rate.

Model FLOPs, counted the same way for every variant::

    model_flops = 6 · N · B · T  +  3 · 2 · (Dh + Dh) · H · P

where ``N`` is the number of parameters of the model's ``nn.Linear`` modules (the
embedding lookup is not a matmul; a tied LM head is an ``nn.Linear`` and counts),
``Dh = d_model / n_heads`` the model's nominal head width (a variant whose kernels
widen q/k, as xl's relative positions do, gets no credit for it), ``H`` the query heads
and ``P`` the query-key pairs the attention calls of one forward pass let a query see,
summed over batch rows, layers and calls: for a layout call the pairs its
``BlockLayout.visible`` allows among the keys the call has, plus the extra rows (FAM's
memory) each query sees; for a dense call Tq·Tk. ``2·(Dh+Dh)`` is the forward's
multiply-adds for QKᵀ and PV per pair, ``3·`` forward + backward. ``P`` is counted once, in
an untimed forward pass, by wrapping the backends' ``attend``/``dense``.
``fraction_of_matmul`` = model FLOP/s over the median FLOP/s of an ``--matmul-n`` square
fp32 matmul timed in the same rounds.

Two conventions meet in that count: the linear term counts the B·T text tokens only,
while ``P`` counts every query an attention call runs, memory rows included (rmt's
memory tokens, FAM's updates, brt's states). So the linear work of those extra rows is
not credited (rmt's step runs 1.85× the linear term at the leaderboard size). The
``executed_*`` fields count what the step runs instead, every row: they say how close the
implementation is to the matmul rate; the model FLOPs say what the model's outputs need.

Sizes (``--size``):

* ``leaderboard`` (default): d_model 64, 2 layers, 4 heads, block 8, T=64, B=16, each
  variant's own fields from :func:`memzoo.compare.settings.variant_options` (the small
  settings the leaderboards use);
* ``mid``: d_model 256, 4 layers, 4 heads, block 256, T=4096, B=2, with m=1
  (``memory_blocks``), F=16 (``fam_len``), M=256 (``memory_len``), K=16
  (``num_memory_tokens``) for the variants that have those fields, the rest from
  ``variant_options``. Minutes on a shared 2-core CPU.

    python benchmarks/bench_train.py                         # leaderboard size
    python benchmarks/bench_train.py --size mid --rounds 3   # the mid size (slow)
    python benchmarks/bench_train.py --variants bswa fam xl  # a subset (bswa always runs: it is the unit)
    python benchmarks/bench_train.py --compile               # + each step with the loss torch.compile'd (inductor)
    python benchmarks/bench_train.py --count-ops             # + each step's forward aten ops and backward nodes
    python benchmarks/bench_train.py --compile --non-finite propagate   # every step without the NaN/inf isolation
    python benchmarks/bench_train.py --compile --non-finite both        # + each compiled step without it, same rounds
    python benchmarks/bench_train.py --clock thread          # CPU time of the thread (a shared machine)
    python benchmarks/bench_train.py --device cuda --size mid --matmul-n 4096   # on a GPU

With ``--compile`` a contender ``name+compiled`` is timed in the same rounds (its
``eager_over_compiled_median`` is the speed-up over its own eager step, round by round,
``vs_bswa_compiled_median`` its time over compiled ``bswa``'s); the compile time (first
call, forward and backward) is ``compile_s``, apart. The loss is compiled with
``fullgraph=True`` and the inductor options of
:func:`memzoo.compare.trainer.compile_options` (what ``memzoo compare --compile`` uses);
``--compile-defaults-too`` adds ``name+compiled(defaults)``, inductor's own defaults, in
the same rounds. ``--non-finite both`` (with ``--compile``) adds ``name+compiled(propagate)``,
the compiled step under :func:`memzoo.ops.propagate_non_finite`, in the same rounds: its
``isolating_over_propagating_median`` is the compiled step's time over it, round by round
(what the isolation costs a compiled step, measured side by side).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import memzoo
from memzoo import ops

SIZES: dict[str, dict[str, Any]] = {
    "leaderboard": {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "block_size": 8},
        "T": 64, "B": 16, "overrides": {},
    },
    "mid": {
        "model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "block_size": 256},
        "T": 4096, "B": 2,
        "overrides": {"memory_blocks": 1, "fam_len": 16, "memory_len": 256, "num_memory_tokens": 16},
    },
}
VOCAB = 256


def contenders(size: dict[str, Any], names: list[str] | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (variant, its own fields): every registered variant, and xl with RoPE."""
    from memzoo.compare.settings import ModelSettings, variant_options
    from memzoo.registry import get_variant

    model = ModelSettings(**size["model"])
    chosen = memzoo.list_variants() if names is None else sorted(set(names) | {"bswa"})
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in chosen:
        fields = get_variant(name).config.model_fields
        overrides = {k: v for k, v in size["overrides"].items() if k in fields}
        options = variant_options(name, model, overrides)
        out[name] = (name, options)
        if name == "xl":
            out["xl(rope)"] = (name, {**options, "positions": "rope"})
    return out


def linear_parameters(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return n


def count_attention_pairs(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Query-key pairs (times batch rows and query heads) of one forward pass's attention calls."""
    total = 0
    originals: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}

    def wrap(backend: ops.Backend) -> None:
        attend, dense = backend.attend, backend.dense

        def counting_attend(inputs: ops.AttentionInputs) -> torch.Tensor:
            nonlocal total
            q, k, layout = inputs.q, inputs.k, inputs.layout
            b, h, tq = q.shape[:3]
            end = inputs.end
            q_pos = torch.arange(inputs.q_start, end)
            k_pos = layout.key_positions(end, k.shape[2])
            pairs = int(layout.visible(q_pos[:, None], k_pos[None, :]).sum())
            if inputs.extra_k is not None:
                pairs += tq * inputs.extra_k.shape[3]
            total += b * h * pairs
            return attend(inputs)

        def counting_dense(q, k, v, *, scale):  # type: ignore[no-untyped-def]
            nonlocal total
            total += q.shape[:-2].numel() * q.shape[-2] * k.shape[-2]
            return dense(q, k, v, scale=scale)

        originals[backend.name] = (attend, dense)
        backend.attend, backend.dense = counting_attend, counting_dense  # type: ignore[method-assign]

    backends = [ops.get_backend(n) for n in ops.list_backends()]
    for backend in backends:
        wrap(backend)
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for backend in backends:
            del backend.attend, backend.dense  # the instance attributes; the class methods show again
    return total


def training_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def training_loss_inductor_defaults(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`training_loss` under another name: compiled with inductor's default options
    beside the one compiled with :func:`compile_options` (Dynamo keeps its graphs per
    function, so the two must not be the same function)."""
    return training_loss(model, tokens)


def propagating(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run under :func:`memzoo.ops.propagate_non_finite` (Dynamo guards on the
    setting, so a compiled step traces its own graph for it)."""
    def run() -> None:
        with ops.propagate_non_finite():
            step()

    return run


def executed_flops(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """FLOPs one eager training step actually runs (forward + backward), as torch's
    ``FlopCounterMode`` counts them: every matmul and attention kernel on the rows it
    gets (memory tokens, FAM updates, re-projected memory, padded or gathered blocks), in
    an untimed step."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    # torch counts sdpa's CUDA kernels but not its CPU one (the default --device): without
    # these, a CPU step's attention through sdpa counted 0 FLOPs (the reference's matmuls did)
    aten = torch.ops.aten
    cpu_sdpa = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_sdpa)
    with counter:
        training_loss(model, tokens).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def make_step(model: torch.nn.Module, tokens: torch.Tensor, loss_fn: Callable[..., torch.Tensor] = training_loss) -> Callable[[], None]:
    def step() -> None:
        loss_fn(model, tokens).backward()
        model.zero_grad(set_to_none=True)

    return step


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count of rounds, steps, threads or a matrix side)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (warm-up steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def timed(fn: Callable[[], None], n: int, clock: Callable[[], float] = time.perf_counter,
          sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = clock()
    for _ in range(n):
        fn()
    sync()  # a GPU's queued kernels belong to the timing
    return (clock() - start) / n


def count_ops(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, int]:
    """One training step's operator count: the aten ops its forward (and loss) dispatch,
    and the autograd nodes its backward runs (at small sizes a step's time is mostly a
    few microseconds per op, so these counts are what a step costs, whatever the FLOPs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Counting.n += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        loss = training_loss(model, tokens)
    nodes, seen, stack = 0, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    model.zero_grad(set_to_none=True)
    return {"forward_aten_ops": Counting.n, "backward_nodes": nodes}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="leaderboard")
    parser.add_argument("--variants", nargs="+", default=None, help="registered variants (default: all)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds (each times every contender)")
    parser.add_argument("--inner", type=positive_int, default=None, help="steps per timing (default: 5 leaderboard, 1 mid)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--matmul-n", type=positive_int, default=512, help="side of the fp32 square matmul timed alongside")
    parser.add_argument("--compile", action="store_true",
                        help="also time each contender's step with the loss compiled by torch.compile (inductor, "
                             "fullgraph, memzoo.compare.trainer.compile_options: what memzoo compare --compile uses); "
                             "compile time is reported apart")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter; thread: time.thread_time, this thread's CPU time (on a "
                             "shared machine it leaves out the time other jobs hold the core)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count each step's forward aten ops and backward autograd nodes (untimed)")
    parser.add_argument("--compile-defaults-too", action="store_true",
                        help="with --compile, also time each step compiled with inductor's default options "
                             "(contender name+compiled(defaults)), side by side")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the models and the matmul run (cuda: float32 without TF32, synchronized timings)")
    parser.add_argument("--non-finite", choices=("isolate", "propagate", "both"), default="isolate",
                        help="every contender's attention calls, eager and compiled: isolate hidden NaN/inf keys and "
                             "values (memzoo's default) or not (memzoo.ops.propagate_non_finite; the same outputs when "
                             "all is finite, and what memzoo compare's train.non_finite='propagate' trains with); "
                             "both (with --compile): isolate, and time each compiled step propagating too "
                             "(contender name+compiled(propagate)) in the same rounds")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants or ()) - set(memzoo.list_variants()))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; registered: {', '.join(memzoo.list_variants())}")
    if args.non_finite == "both" and not args.compile:
        parser.error("--non-finite both compares compiled steps with and without the isolation: add --compile")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
        if args.clock == "thread":
            parser.error("--clock thread measures this thread's CPU time, not a GPU's: use --clock wall with --device cuda")
        # float32 means float32 for the models and the matmul alike (TF32 would change both the
        # arithmetic and the unit the FLOP/s fraction is measured against)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with ops.propagate_non_finite(args.non_finite == "propagate"):
        return measure(args)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build, time and report every contender (:func:`main`'s arguments)."""
    device = torch.device(args.device)
    sync: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.set_num_threads(args.threads)
    commit = git_commit()  # the code being measured (read now: the tree may move during a long run)
    if args.compile:
        # one compiled loss function serves every contender: each model is a new guard set
        # on the same code, so let Dynamo keep a graph per contender (default limit: 8)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    size = SIZES[args.size]
    inner = args.inner or (5 if args.size == "leaderboard" else 1)
    b, t = size["B"], size["T"]
    chosen = contenders(size, args.variants)

    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    for label, (name, options) in chosen.items():
        torch.manual_seed(0)
        model = memzoo.build_model(name, vocab_size=VOCAB, **size["model"], **options).to(device)
        tokens = torch.randint(0, VOCAB, (b, t + 1)).to(device)
        n_linear = linear_parameters(model)
        pairs = count_attention_pairs(model, tokens[:, :-1])
        head_dim = size["model"]["d_model"] // size["model"]["n_heads"]
        flops = 6 * n_linear * b * t + 3 * 2 * (head_dim + head_dim) * pairs
        steps[label] = make_step(model, tokens)
        info[label] = {"variant": name, "options": options, "linear_parameters": n_linear,
                       "attention_pairs_times_heads": pairs, "model_flops_per_step": flops,
                       "executed_flops_per_step": executed_flops(model, tokens)}
        if args.count_ops:
            info[label]["ops_per_step"] = count_ops(model, tokens)
        for _ in range(args.warmup):
            steps[label]()
        kinds = []
        if args.compile:
            from memzoo.compare.trainer import compile_options  # what memzoo compare --compile uses

            kinds.append(("compiled", training_loss, compile_options(tokens.device, rows=b, tokens=t, **{k: size["model"][k] for k in ("d_model", "n_layers", "block_size")})))
        if args.compile and args.compile_defaults_too:
            kinds.append(("compiled(defaults)", training_loss_inductor_defaults, {}))
        if args.non_finite == "both":  # the first kind's graph, traced again without the isolation
            kinds.append(("compiled(propagate)", kinds[0][1], kinds[0][2]))
        for kind, loss, options in kinds:
            compiled = make_step(model, tokens, torch.compile(loss, fullgraph=True, dynamic=False, options=options))
            if kind == "compiled(propagate)":
                compiled = propagating(compiled)
            suffix = kind.removeprefix("compiled")
            start = time.perf_counter()
            try:
                compiled()  # the first call compiles forward and backward
                sync()
            except Exception as err:  # a variant that does not compile: say why, time it eagerly only
                info[label][f"compile_error{suffix}"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            else:
                info[label][f"compile_s{suffix}"] = time.perf_counter() - start
                for _ in range(args.warmup):
                    compiled()
                steps[f"{label}+{kind}"] = compiled

    n = args.matmul_n
    a, m = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul_reps = 20

    def matmul() -> None:
        for _ in range(matmul_reps):
            a @ m

    matmul()
    samples: dict[str, list[float]] = {label: [] for label in steps}
    matmul_s: list[float] = []
    for _ in range(args.rounds):
        matmul_s.append(timed(matmul, 1, CLOCKS[args.clock], sync) / matmul_reps)
        for label, step in steps.items():
            samples[label].append(timed(step, inner, CLOCKS[args.clock], sync))
    matmul_flops = 2 * n**3 / statistics.median(matmul_s)

    results: dict[str, Any] = {}
    for label, times in samples.items():
        ratios = [x / y for x, y in zip(times, samples["bswa"])]
        med = statistics.median(times)
        base = label.split("+")[0]
        flops = info[base]["model_flops_per_step"]
        extra: dict[str, Any] = {}
        if label != base:  # the compiled step against the same contender's eager step, per round
            extra = {"compiled": True, "eager_over_compiled_median": statistics.median(
                [e / c for e, c in zip(samples[base], times)])}
            unit = "bswa" + label[len(base):]  # and against bswa compiled the same way (both compiled)
            if unit in samples:
                extra["vs_bswa_compiled_median"] = statistics.median([x / y for x, y in zip(times, samples[unit])])
            if label.endswith("+compiled(propagate)"):  # the isolating compiled step over this one, per round
                isolating = samples[f"{base}+compiled"]
                extra["isolating_over_propagating_median"] = statistics.median([x / y for x, y in zip(isolating, times)])
        rope = label.replace("xl", "xl(rope)", 1) if label.startswith("xl") and "(rope)" not in label else None
        if rope in samples:  # xl's relative positions against RoPE, per round (target <= 1.3 at the mid size)
            over = [x / y for x, y in zip(times, samples[rope])]
            extra["vs_xl_rope_median"], extra["vs_xl_rope_min"] = statistics.median(over), min(over)
        results[label] = {
            **info[base], **extra,
            "step_s_median": med, "step_s_min": min(times),
            "vs_bswa_median": statistics.median(ratios), "vs_bswa_min": min(ratios),
            "tokens_per_s": b * t / med,
            "model_flops_per_s": flops / med,
            "fraction_of_matmul": flops / med / matmul_flops,
            "executed_fraction_of_matmul": info[base]["executed_flops_per_step"] / med / matmul_flops,
        }
    report = {
        "benchmark": "bench_train",
        "size": args.size, "setting": {**size["model"], "T": t, "B": b, "vocab_size": VOCAB},
        "mode": f"forward + cross-entropy + backward, float32, {device.type}",
        "threads": args.threads, "rounds": args.rounds, "inner_steps": inner, "clock": args.clock,
        "non_finite": args.non_finite,
        "matmul": {"n": n, "flops_per_s_median": matmul_flops, "seconds_min": min(matmul_s)},
        "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(),
        **({"gpu": torch.cuda.get_device_name()} if device.type == "cuda" else {}),
        "results": results,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return report


if __name__ == "__main__":
    main()
