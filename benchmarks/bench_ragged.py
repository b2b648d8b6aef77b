"""What a padded (variable-length) training batch costs, per variant (issue 11).

One training step = forward + cross-entropy over the real positions + backward (no
optimizer), one torch thread, float32, on CPU, for three feeds of the same B x T tokens:

* ``unpadded``: ``model(tokens)``, every row T tokens, no mask (the plain path);
* ``padded``: ``model(tokens, attention_mask=mask)`` with random right-padded row lengths
  such that ``--pad-fraction`` (default 10%) of the B·T positions are padding (the
  lengths are drawn from a seeded generator, then adjusted one token at a time until
  the padding is exactly ``round(fraction·B·T)`` positions);
* ``ones``: ``model(tokens, attention_mask=ones)``: every token real, through the mask
  path (its bookkeeping alone: the overhead of passing a mask);
* ``padded_stateless``: the padded batch with ``return_state=False`` — what the trainer
  runs when it does not pass the state on (``rsp_prob=0``, the last chunk): one backbone
  call over the whole batch (exact by causality; no final state).

The ragged path (:mod:`memzoo.ragged`) runs right-padded rows from a common position as
one backbone call for the common prefix plus one call per distinct tail length over the
rows still running; ``calls`` counts the backbone ``step`` calls of one forward pass.
The padded step does less attention/MLP work (10% fewer real tokens) but more calls.

Contenders are interleaved: each round times every (variant, feed) once (``--inner``
steps each, after warm-up); ``*_over_unpadded`` are medians over rounds of the ratio
within one round, so they compare numbers measured under the same load.

Sizes (``--size``):

* ``leaderboard`` (default): d_model 64, 2 layers, 4 heads, block 8, T=64, B=16, each
  variant's own fields from :func:`memzoo.compare.settings.variant_options`; every
  registered variant by default;
* ``mid``: d_model 256, 4 layers, 4 heads, block 64, T=1024, B=4, with m=1
  (``memory_blocks``), F=16 (``fam_len``), M=64 (``memory_len``), K=16
  (``num_memory_tokens``) where a variant has those fields; bswa and fam by default.

    python benchmarks/bench_ragged.py                              # leaderboard size, every variant
    python benchmarks/bench_ragged.py --size mid                   # bswa and fam at the mid size
    python benchmarks/bench_ragged.py --profile fam                # + the top ops of fam's padded step

Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import memzoo

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also when loaded by path
from bench_train import git_commit, non_negative_int, positive_int, timed  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "leaderboard": {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "block_size": 8},
        "T": 64, "B": 16, "overrides": {}, "variants": None, "inner": 5,
    },
    "mid": {
        "model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "block_size": 64},
        "T": 1024, "B": 4, "overrides": {"memory_blocks": 1, "fam_len": 16, "memory_len": 64, "num_memory_tokens": 16},
        "variants": ["bswa", "fam"], "inner": 1,
    },
}
VOCAB = 256
FEEDS = ("unpadded", "padded", "ones", "padded_stateless")
#: the issue's target: a padded step within this factor of the unpadded one
TARGET = 1.2


def padded_lengths(b: int, t: int, fraction: float, seed: int = 0) -> list[int]:
    """B row lengths in [1, T] whose padding (T - length, summed) is exactly round(fraction·B·T)."""
    want = round(fraction * b * t)
    if not 0 <= want <= b * (t - 1):
        raise ValueError(f"a padding fraction of {fraction} is {want} of the {b}x{t} positions; every row keeps at least "
                         f"one real token, so at most {b * (t - 1)} ({(t - 1) / t:.4f}) can be padding")
    g = torch.Generator().manual_seed(seed)
    # the first draw capped at T-1 (a row keeps a token): the loop below only moves within [0, T-1]
    pads = [min(p, t - 1) for p in torch.randint(0, int(2 * fraction * t) + 1, (b,), generator=g).tolist()]
    while sum(pads) != want:
        i = int(torch.randint(0, b, (), generator=g))
        if sum(pads) < want and pads[i] < t - 1:
            pads[i] += 1
        elif sum(pads) > want and pads[i] > 0:
            pads[i] -= 1
    return [t - p for p in pads]


def contenders(size: dict[str, Any], names: list[str] | None) -> dict[str, dict[str, Any]]:
    """variant -> its own fields at this size."""
    from memzoo.compare.settings import ModelSettings, variant_options
    from memzoo.registry import get_variant

    model = ModelSettings(**size["model"])
    chosen = names or size["variants"] or memzoo.list_variants()
    out = {}
    for name in chosen:
        fields = get_variant(name).config.model_fields
        out[name] = variant_options(name, model, {k: v for k, v in size["overrides"].items() if k in fields})
    return out


def make_step(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, real: torch.Tensor,
              feed: str) -> Callable[[], None]:
    """One forward + loss (mean over real positions) + backward for ``feed``."""
    kwargs = {"unpadded": {}, "padded": {"attention_mask": real}, "ones": {"attention_mask": torch.ones_like(real)},
              "padded_stateless": {"attention_mask": real, "return_state": False}}[feed]
    weight = (real if feed.startswith("padded") else torch.ones_like(real)).float()

    def step() -> None:
        logits = model(tokens, **kwargs).logits
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        ((nll * weight).sum() / weight.sum()).backward()
        model.zero_grad(set_to_none=True)

    return step


def count_calls(model: Any, fn: Callable[[], None]) -> int:
    """Backbone ``step`` calls during ``fn`` (the ragged path's waves)."""
    backbone = model.backbone
    original = backbone.step
    n = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal n
        n += 1
        return original(*args, **kwargs)

    backbone.step = counting
    try:
        fn()
    finally:
        del backbone.step  # the instance attribute; the class method shows again
    return n


def profile(step: Callable[[], None], rows: int = 15) -> list[dict[str, Any]]:
    """The ops with the most self CPU time over 3 steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "calls_per_step": e.count / 3, "self_ms_per_step": e.self_cpu_time_total / 3e3} for e in events]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="leaderboard")
    parser.add_argument("--variants", nargs="+", default=None, help="registered variants (default: per size)")
    parser.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds (each times every variant and feed)")
    parser.add_argument("--inner", type=positive_int, default=None, help="steps per timing (default: 5 leaderboard, 1 mid)")
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--pad-fraction", type=float, default=0.1)
    parser.add_argument("--profile", nargs="*", default=[], help="variants whose padded and unpadded steps to profile")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.variants or ()) - set(memzoo.list_variants()))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; registered: {', '.join(memzoo.list_variants())}")
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    inner = args.inner or size["inner"]
    b, t = size["B"], size["T"]
    try:
        lengths = padded_lengths(b, t, args.pad_fraction)
    except ValueError as err:
        parser.error(f"--pad-fraction {args.pad_fraction}: {err}")
    real = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    targets = torch.randint(0, VOCAB, (b, t), generator=g)

    steps: dict[tuple[str, str], Callable[[], None]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, options in contenders(size, args.variants).items():
        torch.manual_seed(0)
        model = memzoo.build_model(name, vocab_size=VOCAB, **size["model"], **options)
        results[name] = {"options": options, "calls": {}}
        for feed in FEEDS:
            steps[name, feed] = make_step(model, tokens, targets, real, feed)
            results[name]["calls"][feed] = count_calls(model, steps[name, feed])
            for _ in range(args.warmup):
                steps[name, feed]()
        if name in args.profile:
            results[name]["profile"] = {feed: profile(steps[name, feed]) for feed in ("unpadded", "padded")}

    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            times[key].append(timed(step, inner))
    for name, row in results.items():
        base = times[name, "unpadded"]
        for feed in FEEDS:
            row[f"{feed}_s_median"] = statistics.median(times[name, feed])
            if feed != "unpadded":
                row[f"{feed}_over_unpadded"] = statistics.median(x / y for x, y in zip(times[name, feed], base))
        row["padded_target_met"] = row["padded_over_unpadded"] <= TARGET
        row["padded_stateless_target_met"] = row["padded_stateless_over_unpadded"] <= TARGET

    report = {
        "setting": {
            "size": args.size, **size["model"], "B": b, "T": t, "vocab": VOCAB, "lengths": lengths,
            "pad_fraction": 1 - sum(lengths) / (b * t), "distinct_lengths": len(set(lengths)),
            "rounds": args.rounds, "inner": inner, "warmup": args.warmup, "threads": args.threads,
            "target_padded_over_unpadded": TARGET,
        },
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.machine(),
                    "commit": git_commit()},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
