"""Per-token decode cost of every registered variant against a bare PyTorch loop of the
same size and window, side by side in one run, printing JSON (issue 10).

Sizes: d_model 64, 2 layers, 4 heads, vocab 256, batch 1, one thread, block_size 64;
``bswa``/``fam`` memory_blocks 1 (fam_len 16), ``xl`` memory_len 128 (RoPE), ``rmt`` 16
memory tokens, ``brt`` 16 states, ``sinks`` 4 sinks + a 124-token window (128 keys). For each variant and each streamed length (the state is reached by
streaming that many tokens in no-grad chunks), the median time per token of:

* ``forward``: ``model(token, state)``, validated on every call (what a user loop did);
* ``decode_step``: the unvalidated fast path ``generate`` uses (validated once);
* ``generate``: the median gap between consecutive tokens of ``model.generate`` (greedy;
  it writes its own state's ring buffers in place);
* ``compiled`` (``--compile``): ``torch.compile(model.decode_step)`` (inductor);
* ``bare``: a hand-written loop of the same size (embedding, RMSNorm, fused QKV, RoPE,
  SDPA, GELU MLP, head, argmax) over a preallocated K/V ring buffer of the variant's
  key count, written in place (static shapes).

    python benchmarks/bench_decode.py                 # 1k and 100k streamed tokens (bounded variants)
    python benchmarks/bench_decode.py --quick         # 1k and 8k, fewer repeats (about a minute)
    python benchmarks/bench_decode.py --compile       # adds torch.compile'd decode steps
    python benchmarks/bench_decode.py --profile bswa  # where a decode step's time goes
    python benchmarks/bench_decode.py --size mid --quick   # d_model 512, 8 layers, 1,024-key windows

Prints JSON Lines: one line per (variant, streamed length) as it is measured, then one
line with the whole run (the sizes, every row, the largest ``decode_step_over_bare``).

``generate`` writes the full ring buffers of the state it made in place (one row per cache
and token); ``decode_step`` on a given state leaves it unchanged, so it writes a new
buffer (a copy of each cache per token): at the mid size the gap between the two is that
copy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import memzoo

D, LAYERS, HEADS, VOCAB, L = 64, 2, 4, 256, 64
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "bswa": {"memory_blocks": 1},
    "fam": {"memory_blocks": 1, "fam_len": 16},
    "xl": {"memory_len": 128, "positions": "rope"},
    "rmt": {"num_memory_tokens": 16},
    "brt": {"num_states": 16},
    "sinks": {"num_sinks": 4, "window": 124},  # 128 keys per query, bswa's window
}
#: ``--size``: the sizes above ("tiny"), or a model where the caches are large enough for
#: their copies to show ("mid": d_model 512, 8 layers, 8 heads, 1,024-key windows)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"D": 64, "LAYERS": 2, "HEADS": 4, "L": 64, "VARIANTS": dict(VARIANTS)},
    "mid": {"D": 512, "LAYERS": 8, "HEADS": 8, "L": 512, "VARIANTS": {
        "full": {},
        "bswa": {"memory_blocks": 1},
        "fam": {"memory_blocks": 1, "fam_len": 64},
        "xl": {"memory_len": 512, "positions": "rope"},
        "rmt": {"num_memory_tokens": 16},
        "brt": {"num_states": 64},
        "sinks": {"num_sinks": 4, "window": 1020},
    }},
}


def keys_seen(name: str, opts: dict[str, Any], pos: int) -> int:
    """How many keys one decode query of ``name`` attends to (per layer), at most."""
    if name == "full":
        return pos + 1
    if name == "bswa":
        return (opts["memory_blocks"] + 1) * L
    if name == "fam":
        return (opts["memory_blocks"] + 1) * L + opts["fam_len"]
    if name == "xl":
        return opts["memory_len"] + L
    if name == "rmt":
        return opts["num_memory_tokens"] + L
    if name == "brt":
        return 2 * L + opts["num_states"]  # bswa m=1 window + the recurrent layer's states
    if name == "sinks":
        return opts["num_sinks"] + opts["window"]
    return L  # a variant added later: one block


class BareDecoder(nn.Module):
    """The hand-written baseline: one token per call over a preallocated ring buffer."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window, self.dh = window, D // HEADS
        self.embed = nn.Embedding(VOCAB, D)
        self.norm1 = nn.ModuleList(nn.RMSNorm(D) for _ in range(LAYERS))
        self.qkv = nn.ModuleList(nn.Linear(D, 3 * D, bias=False) for _ in range(LAYERS))
        self.out = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(LAYERS))
        self.norm2 = nn.ModuleList(nn.RMSNorm(D) for _ in range(LAYERS))
        self.up = nn.ModuleList(nn.Linear(D, 4 * D) for _ in range(LAYERS))
        self.down = nn.ModuleList(nn.Linear(4 * D, D) for _ in range(LAYERS))
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.dh, 2, dtype=torch.float32) / self.dh))
        self.k = torch.zeros(LAYERS, 1, HEADS, window, self.dh)
        self.v = torch.zeros(LAYERS, 1, HEADS, window, self.dh)

    def rope(self, x: Tensor, pos: int) -> Tensor:
        ang = pos * self.inv_freq
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    @torch.no_grad()
    def step(self, token: Tensor, pos: int) -> Tensor:
        x = self.embed(token)  # (1, 1, D)
        slot = pos % self.window
        for i in range(LAYERS):
            q, k, v = self.qkv[i](self.norm1[i](x)).view(1, 1, 3, HEADS, self.dh).permute(2, 0, 3, 1, 4)
            self.k[i, :, :, slot] = self.rope(k, pos)[:, :, 0]
            self.v[i, :, :, slot] = v[:, :, 0]
            heads = F.scaled_dot_product_attention(self.rope(q, pos), self.k[i], self.v[i])
            x = x + self.out[i](heads.transpose(1, 2).flatten(-2))
            x = x + self.down[i](F.gelu(self.up[i](self.norm2[i](x))))
        return self.head(self.norm(x[:, -1])).argmax(-1)


def interleaved(fns: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn ``repeats`` times (after a warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return times


def stream_to(model, pos: int, chunk: int = 2048):
    state = None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        done = 0
        while done < pos:
            n = min(chunk, pos - done)
            _, state = model.prefill(torch.randint(0, VOCAB, (1, n), generator=gen), state)
            done += n
    return state


def bench_variant(name: str, opts: dict[str, Any], pos: int, repeats: int, compile_: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = memzoo.build_model(name, vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, block_size=L, **opts).eval()
    state = stream_to(model, pos)
    token = torch.tensor([[1]])
    row: dict[str, Any] = {"variant": name, "options": opts, "streamed": pos, "state_bytes": state.nbytes}

    # every timing restarts from the same state (a state is immutable: steps return new ones)
    def fwd():
        with torch.no_grad():
            model(token, state)

    def fast():
        with torch.no_grad():
            model.decode_step(token, state)[0].argmax(-1)

    window = keys_seen(name, opts, pos)
    bare = BareDecoder(window).eval()
    row["bare_keys"] = window
    n = 32
    fns = {"forward_ms": fwd, "decode_step_ms": fast, "bare_ms": lambda: bare.step(token, pos)}
    if compile_:
        # decode_step's code is every variant's: without a reset, later variants hit the
        # recompile limit and run the earlier ones' guards, then eagerly
        torch._dynamo.reset()
        step = torch.compile(model.decode_step, dynamic=True)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                step(token, state)
        except Exception as err:  # report, and time the rest
            row["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        else:
            row["compile_s"] = round(time.perf_counter() - t0, 1)

            def compiled():
                with torch.no_grad():
                    step(token, state)[0].argmax(-1)

            fns["compiled_ms"] = compiled
    # interleaved, so machine noise hits every contender alike
    times = interleaved(fns, repeats)
    row.update({k: statistics.median(v) * 1e3 for k, v in times.items()})
    # generate: the median gap between consecutive tokens (its streamer's timestamps)
    stamps: list[float] = []
    gaps: list[float] = []
    for _ in range(max(1, repeats // n)):
        stamps.clear()
        model.generate(token, n, state=state, streamer=lambda t: stamps.append(time.perf_counter()))
        gaps += [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    row["generate_ms_per_token"] = statistics.median(gaps) * 1e3
    row["decode_step_over_bare"] = round(row["decode_step_ms"] / row["bare_ms"], 2)
    row["generate_over_bare"] = round(row["generate_ms_per_token"] / row["bare_ms"], 2)
    if "compiled_ms" in row:
        row["compiled_over_bare"] = round(row["compiled_ms"] / row["bare_ms"], 2)
    for key in ("forward_ms", "decode_step_ms", "generate_ms_per_token", "compiled_ms", "bare_ms"):
        if key in row:
            row[key] = round(row[key], 3)
    return row


def profile(name: str, steps: int = 500) -> None:
    """Where one decode step's time goes: share of the step spent under each function."""
    import cProfile
    import pstats

    torch.manual_seed(0)
    opts = VARIANTS.get(name, {})  # a variant without sizes here runs with its defaults, as in the timings
    model = memzoo.build_model(name, vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, block_size=L, **opts).eval()
    state = stream_to(model, 1024 + 30)
    token = torch.tensor([[1]])

    def run() -> None:
        with torch.no_grad():
            for _ in range(steps):
                model.decode_step(token, state)

    run()
    prof = cProfile.Profile()
    prof.runcall(run)
    stats = pstats.Stats(prof).stats  # (file, line, fn) -> (calls, ncalls, tottime, cumtime, callers)
    total = max(v[3] for k, v in stats.items() if k[2] == "decode_step")
    watch = {"attend": "memzoo.ops.attend (dispatch + backend)", "_rotate": "RoPE", "<built-in method torch.cat>": "torch.cat",
             "resolve_backend": "backend resolution", "feed_forward": "MLP", "project": "norm + QKV + RoPE"}
    shares = {}
    for (file, _, fn), v in stats.items():
        if fn in watch and (fn.startswith("<") or "memzoo" in file):
            shares[watch[fn]] = shares.get(watch[fn], 0.0) + v[3] / total
    print(json.dumps({"variant": name, "ms_per_step_under_profile": round(total / steps * 1e3, 3),
                      "share_of_step": {k: round(v, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1k and 8k streamed tokens, fewer repeats")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd decode steps (inductor)")
    parser.add_argument("--variants", default=None, help="comma-separated (default: every registered one we have sizes for)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model size (default tiny: d_model 64, 2 layers)")
    parser.add_argument("--profile", default=None, metavar="VARIANT", help="profile 500 decode steps of VARIANT at 1k (cProfile) and stop")
    args = parser.parse_args(argv)
    names = args.variants.split(",") if args.variants else memzoo.list_variants()  # a new variant runs with its defaults
    unknown = sorted(set(names) - set(memzoo.list_variants()))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; registered: {', '.join(memzoo.list_variants())}")
    if args.profile and args.profile not in memzoo.list_variants():
        parser.error(f"--profile: unknown variant {args.profile}; registered: {', '.join(memzoo.list_variants())}")
    torch.set_num_threads(args.threads)
    globals().update(SIZES[args.size])  # the sizes every function below reads
    if args.profile:
        profile(args.profile)
        return
    lengths = [1024, 8192] if args.quick else [1024, 102400]
    repeats = 50 if args.quick else 200
    rows = []
    for name in names:
        for pos in lengths:
            if name == "full" and pos > 8192:
                continue  # unbounded state: streaming 100k tokens through full attention is the O(T^2) it avoids
            rows.append(bench_variant(name, VARIANTS.get(name, {}), pos, repeats, args.compile))
            rows[-1]["size"] = args.size
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "benchmark": "decode", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "sizes": {"d_model": D, "n_layers": LAYERS, "n_heads": HEADS,
        "vocab": VOCAB, "block_size": L, "batch": 1, "name": args.size}, "rows": rows,
        "max_decode_step_over_bare": max((r["decode_step_over_bare"] for r in rows), default=None),
    }))  # one line, like the rows above: stdout is JSON Lines (the last line the whole run)


if __name__ == "__main__":
    main()
