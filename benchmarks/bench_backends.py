"""Attention backends x registered variants x sequence lengths, printing JSON (issue 5).

For every registered variant, every backend that can run on the device, and every T:

* ``train_tokens_per_s``: forward+backward of a whole sequence (batch 1), the median of
  ``--repeats`` (``--long-repeats`` above T=4096) timed steps after two untimed full-size
  ones (the first measures the memory); for a backend that is inference-only on the device
  (flex on CPU) ``forward_tokens_per_s`` instead; on CPU also ``step_cpu_s``, the median
  of the process's CPU time per step: with ``--threads 1`` it leaves out the time the
  process waited for a core, which on a shared CPU moves the wall time by tens of percent;
* ``decode_tokens_per_s``: streaming decode, one token per call, after a prefill of T
  tokens streamed in chunks (the state then holds what T tokens leave behind);
* ``state_bytes`` after the prefill;
* ``peak_memory_mb``: CPU: growth of the process's peak RSS (``resource.getrusage``
  ``ru_maxrss``) over its level just before the first full-size forward+backward, in a fresh
  subprocess per cell (tracemalloc does not see torch's allocations); CUDA:
  ``torch.cuda.max_memory_allocated`` after a reset;
* ``attention``: the variant's largest attention call at that T (captured from the
  forward pass), replayed alone through the backend: seconds, *useful* FLOPs (only the
  query-key pairs the layout lets a query see: 4·D per pair forward, x3.5 with the
  backward; a call's relative-position keys, xl's default, are replayed but get no
  credit, as in ``bench_train.py``), achieved FLOP/s, and the same run's dense square matmul of similar FLOPs
  on the same device, so ``fraction_of_matmul`` reads as a share of what the machine
  can do;
* ``cost_growth``: time(T_hi)/time(T_lo) per variant and backend (linear = T_hi/T_lo,
  i.e. 8 for 16k/2k), of the wall time (``time_ratio``) and, on CPU, of the CPU time
  (``cpu_time_ratio``); and the same ratio of a *position-wise* model timed in the same
  run (:data:`POSITION_WISE`: the same embedding, norms, value/output projections, MLPs
  and head, each token attending only to itself, so its cost is linear in T by
  construction), and ``over_position_wise``, a variant's ratio over that one (for
  training steps; an inference-only cell has none). On a CPU whose caches hold T_lo's
  activations but not T_hi's, every op slows per element as T grows (the position-wise
  model grew 9.98x for 16k/2k in its first run on the project's CPU), so
  ``over_position_wise`` is what says whether a variant's cost per token is bounded.

Each cell reports ``minor_faults_per_step`` (``ru_minflt`` over the timed steps): the
pages the kernel faulted in, and zeroed, for fresh allocations. ``--huge-pages on`` runs
every cell with torch's ``THP_MEM_ALLOC_ENABLE=1`` (its CPU allocator then asks the kernel
for transparent huge pages for buffers of 2 MB and more); ``both`` runs every cell without
it and then with it, side by side, and reports the growth of each setting apart (on the
project's CPU it did not make the T=16k steps faster by more than a few percent: see
docs/benchmarks.md).

Every cell runs in its own subprocess (clean memory peak, no cross-talk); a cell that
cannot run says why in the JSON (``skipped``): the dense reference and uncompiled CPU
flex materialise (T, T) scores, so they stop at ``--max-dense-t`` on CPU.

    python benchmarks/bench_backends.py                    # T in 1k, 2k, 4k, 16k (CPU: minutes)
    python benchmarks/bench_backends.py --quick            # T in 256, 512, 1024, 2048 (a smoke run)
    python benchmarks/bench_backends.py --threads 1        # on a shared CPU: thread contention costs 10-30x
    python benchmarks/bench_backends.py --device cuda --dtype bfloat16 --lengths 1024 4096 16384 32768
    python benchmarks/bench_backends.py --variants bswa fam --backends sdpa flex --lengths 1024 4096
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

#: overrides of :func:`memzoo.compare.settings.variant_options` at benchmark scale (every
#: other field of a variant that it sets follows the block size, e.g. ``sinks``' window of
#: 2 blocks, the most keys ``bswa`` with one memory block sees; a variant's remaining fields
#: keep its own defaults, so new variants are benchmarked too)
BENCH_OVERRIDES: dict[str, Any] = {"memory_blocks": 1, "fam_len": 16, "memory_len": 128, "num_memory_tokens": 16}


def bench_options(name: str, args) -> dict[str, Any]:
    """Variant ``name``'s own fields for this run (the ones the benchmark sets)."""
    from memzoo.compare.settings import ModelSettings, variant_options
    from memzoo.registry import get_variant

    model = ModelSettings(d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, block_size=args.block_size)
    fields = get_variant(name).config.model_fields
    return variant_options(name, model, {k: v for k, v in BENCH_OVERRIDES.items() if k in fields})


#: the cell name of the position-wise baseline (see ``cost_growth`` above)
POSITION_WISE = "(position-wise)"


def position_wise_step(model, tokens):
    """The loss of ``model`` (a memzoo LM) with each token attending only to itself: per
    layer ``h + O(V(Norm1(h)))`` then the layer's feed-forward; the same head and loss as
    the variants' steps. Linear in T by construction."""
    h = model.embed(tokens)
    for layer in model.backbone.layers:
        attn = layer.self_attn
        rows = layer.input_layernorm(h).flatten(0, -2)
        assert layer.n_kv_heads == layer.n_heads, "the position-wise step takes one value head per query head"
        h = h + attn.o_proj(attn.v_proj(rows)).view(h.shape)
        h = layer.feed_forward(h)
    return model.head(model.norm(h)).float().square().mean()


# ------------------------------------------------------------------------ one cell
def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """Everything for one (variant, backend, T), in this (fresh) process."""
    import torch

    import memzoo
    from memzoo import ops

    if cell["threads"]:
        torch.set_num_threads(cell["threads"])
    torch.manual_seed(0)
    device = torch.device(cell["device"])
    dtype = getattr(torch, cell["dtype"])
    name, backend, t = cell["variant"], cell["backend"], cell["T"]
    baseline = name == POSITION_WISE
    fields = dict(vocab_size=256, d_model=cell["d_model"], n_heads=cell["n_heads"], n_layers=cell["n_layers"],
                  block_size=cell["block_size"], backend="sdpa" if baseline else backend, **cell["options"])
    model = memzoo.build_model("bswa" if baseline else name, **fields).to(device=device, dtype=dtype)
    trains = baseline or not ops.get_backend(backend).not_supported_reasons(
        ops.AttentionCall(device.type, dtype, ops.BlockLayout(cell["block_size"], cell["block_size"]), True, False, False,
                          cell["d_model"] // cell["n_heads"], cell["d_model"] // cell["n_heads"])
    )
    tokens = torch.randint(0, 256, (1, t), device=device)
    out: dict[str, Any] = {"mode": "forward+backward" if trains else "forward (inference-only backend here)",
                           "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        if baseline:
            position_wise_step(model, tokens).backward()
        elif trains:
            logits, _ = model(tokens)
            logits.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(tokens)

    # warm-up on a short prefix (lazy initialisation, kernel selection, flex block masks)
    with torch.no_grad():
        model(tokens[:, : min(t, 2 * cell["block_size"])])

    # the first full-size step: peak memory, the backends used, and the largest attend call
    # (captured for replay); it also pays for the allocator's growth, so it is not timed
    captured: dict[str, Any] = {}
    real_attend = ops.attend

    def spy(q, k, v, **kw):
        size = q.shape[2] * k.shape[2]
        if size > captured.get("size", -1):
            captured.update(size=size, q=q.shape, k=k.shape, v=v.shape, layout=kw["layout"], q_start=kw["q_start"],
                            k_mem=kw.get("k_mem") is not None,
                            extra=None if kw.get("extra_k") is None else tuple(kw["extra_k"].shape),
                            # relative-position keys (xl's default positions): replayed too, or the
                            # replay would time a cheaper call than the variant makes
                            rel=None if kw.get("rel_q") is None else (tuple(kw["rel_q"].shape), tuple(kw["rel_k"].shape)))
        return real_attend(q, k, v, **kw)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ops.attend = spy
    try:
        with ops.record_backends() as rec:
            step()
            sync()
    finally:
        ops.attend = real_attend
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        out["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        out["peak_memory_how"] = "torch.cuda.max_memory_allocated over the allocation before the step"
    else:
        out["peak_memory_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        out["peak_memory_how"] = "growth of ru_maxrss (peak RSS) during the step, fresh subprocess"
    # The steady state a training loop runs in: one more untimed step (glibc's malloc settles
    # only after the second one: at T=16k bswa's first three steps took 77k, 35k and 11k minor
    # page faults), then the timed repeats.
    step()
    model.zero_grad(set_to_none=True)
    times, cpu_times = [], []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cell["repeats"]):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    out["minor_faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / cell["repeats"]
    out["step_s"] = statistics.median(times)
    out["step_s_each"] = times
    if device.type == "cpu":
        out["step_cpu_s"] = statistics.median(cpu_times)
    out["train_tokens_per_s" if trains else "forward_tokens_per_s"] = t / out["step_s"]
    out["backends_used"] = rec.names
    if baseline:
        return out

    # streaming: prefill in chunks, then one token per call
    chunk = cell["prefill_chunk"]
    state = None
    with torch.no_grad():
        for a in range(0, t, chunk):
            _, state = model(tokens[:, a : a + chunk], state=state)
        out["state_bytes"] = state.nbytes
        tok = tokens[:, :1]
        _, s = model(tok, state=state)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(cell["decode_tokens"]):
            _, s = model(tok, state=s)
        sync()
        out["decode_tokens_per_s"] = cell["decode_tokens"] / (time.perf_counter() - t0)

    if captured:
        out["attention"] = replay_attention(captured, backend, device, dtype, trains)
    return out


def useful_pairs(layout, q_start: int, tq: int, tk: int, extra_rows: int) -> int:
    """Query-key pairs the layout lets queries see (extra rows included), counted in chunks."""
    import torch

    end = q_start + tq
    k_pos = torch.arange(end - tk, end)
    total = 0
    for a in range(0, tq, 1024):
        q_pos = torch.arange(q_start + a, min(q_start + a + 1024, end))
        total += int(layout.visible(q_pos[:, None], k_pos[None, :]).sum())
    return total + extra_rows * tq


def replay_attention(c: dict[str, Any], backend: str, device, dtype, trains: bool) -> dict[str, Any]:
    import torch

    from memzoo import ops

    b, h, tq, d = c["q"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(trains)

    ins = {"q": rnd(c["q"]), "k": rnd(c["k"]), "v": rnd(c["v"])}
    if c["k_mem"]:
        ins["k_mem"], ins["v_mem"] = rnd(c["k"]), rnd(c["v"])
    if c["extra"]:
        ins["extra_k"], ins["extra_v"] = rnd(c["extra"]), rnd((*c["extra"][:-1], c["v"][-1]))
    if c.get("rel"):
        ins["rel_q"], ins["rel_k"] = rnd(c["rel"][0]), rnd(c["rel"][1])
    kwargs = dict(layout=c["layout"], q_start=c["q_start"], scale=d**-0.5, backend=backend)

    def go():
        if trains:
            ops.attend(**ins, **kwargs).float().sum().backward()
        else:
            with torch.no_grad():
                ops.attend(**ins, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    go()  # warm-up
    t0 = time.perf_counter()
    go()
    seconds = time.perf_counter() - t0
    pairs = b * h * useful_pairs(c["layout"], c["q_start"], tq, c["k"][2], c["extra"][3] if c["extra"] else 0)
    flops = 4 * d * pairs * (3.5 if trains else 1.0)
    # a square matmul of about the same FLOPs (capped), same device and dtype, same run
    n = int(min(4096, max(128, round((flops / 2) ** (1 / 3)))))
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    x @ y
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.2:
        x @ y
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    mm_flops_s = 2 * n**3 * reps / (time.perf_counter() - t0)
    return {
        "call": {"q": list(c["q"]), "k": list(c["k"]), "layout": repr(c["layout"]), "q_start": c["q_start"],
                 "memory_tensors": c["k_mem"], "extra": list(c["extra"]) if c["extra"] else None,
                 "relative_keys": {"rel_q": list(c["rel"][0]), "rel_k": list(c["rel"][1])} if c.get("rel") else None},
        "seconds": seconds,
        "useful_flops": flops,
        "flops_per_s": flops / seconds,
        "matmul": {"n": n, "flops_per_s": mm_flops_s},
        "fraction_of_matmul": flops / seconds / mm_flops_s,
    }


# --------------------------------------------------------------------- the driver
def environment(args) -> dict[str, Any]:
    import torch

    import memzoo
    from memzoo import ops

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "memzoo": memzoo.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads or torch.get_num_threads(),
        "machine": platform.machine(),
        "backend_versions": {n: ops.get_backend(n).versions() for n in ops.list_backends()},
    }
    try:
        with open("/proc/cpuinfo") as fh:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        env["cpu"] = platform.processor()
    env["cpu_count"] = os.cpu_count()
    env["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")  # what --huge-pages inherit passes on
    env["huge_pages"] = args.huge_pages
    env["kernel_transparent_hugepage"] = kernel_transparent_hugepage()
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def plan_cells(
    args, variant_options: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, list[str]]]]:
    """The cells of the run: every variant of ``variant_options`` (name -> its fields) on
    every backend that can run here, at every length; then the position-wise baseline."""
    import torch

    from memzoo import ops

    dtype = getattr(torch, args.dtype)
    backends = args.backends or ops.list_backends()
    head_dim = args.d_model // args.n_heads
    cells, skipped, unavailable = [], [], {}
    for backend in backends:
        call = ops.AttentionCall(args.device, dtype, ops.BlockLayout(args.block_size, args.block_size), False, False, False,
                                 head_dim, head_dim)
        reasons = ops.get_backend(backend).not_supported_reasons(call)
        if reasons:
            unavailable[backend] = reasons
            continue
        for name, options in variant_options.items():
            for t in args.lengths:
                cell = dict(variant=name, backend=backend, T=t, device=args.device, dtype=args.dtype,
                            d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                            block_size=args.block_size, options=options,
                            repeats=args.repeats if t <= 4096 else args.long_repeats, decode_tokens=args.decode_tokens,
                            prefill_chunk=args.prefill_chunk, threads=args.threads)
                dense = backend == "reference" or (backend == "flex" and args.device == "cpu")
                if dense and t > args.max_dense_t:
                    why = ("the dense reference" if backend == "reference" else "uncompiled CPU flex") + (
                        f" materialises (T, T) scores: at T={t} that is {t * t * 4 * args.n_heads / 2**30:.1f} GiB per "
                        f"layer call and minutes on this device; raise --max-dense-t to run it")
                    skipped.append({**{k: cell[k] for k in ("variant", "backend", "T")}, "skipped": why})
                    continue
                cells.append(cell)
    base = dict(variant=POSITION_WISE, backend="none", device=args.device, dtype=args.dtype, d_model=args.d_model,
                n_heads=args.n_heads, n_layers=args.n_layers, block_size=args.block_size, options={}, decode_tokens=0,
                prefill_chunk=args.prefill_chunk, threads=args.threads)
    # first, so that a slow drift of the machine over the run does not favour the variants
    cells[:0] = [{**base, "T": t, "repeats": args.repeats if t <= 4096 else args.long_repeats} for t in args.growth]
    return cells, skipped, unavailable


def growth(results: list[dict[str, Any]], lo: int, hi: int) -> list[dict[str, Any]]:
    """time(T_hi) / time(T_lo) per (variant, backend) and huge-pages setting (a result's
    ``huge_pages``: absent or None = the environment's, False = off, True = on); each
    setting's variants are divided by that setting's position-wise baseline."""
    rows = []
    by_key = {(r["variant"], r["backend"], r.get("huge_pages"), r["T"]): r for r in results if "step_s" in r}
    for (name, backend, pages, t), r in sorted(by_key.items(), key=lambda kv: tuple(map(str, kv[0]))):
        low = by_key.get((name, backend, pages, lo))
        if t != hi or low is None:
            continue
        rows.append({
            "variant": name, "backend": backend, **({} if pages is None else {"huge_pages": pages}),
            "T_lo": lo, "T_hi": hi,
            "time_ratio": r["step_s"] / low["step_s"],
            **({"cpu_time_ratio": r["step_cpu_s"] / low["step_cpu_s"]} if "step_cpu_s" in r else {}),
            "linear_would_be": hi / lo,
            "mode": r["mode"],
        })
    bases = {row.get("huge_pages"): row for row in rows if row["variant"] == POSITION_WISE}
    for row in rows:
        base = bases.get(row.get("huge_pages"))
        # the baseline trains: only a growth of training steps is divided by it
        if base is not None and row["variant"] != POSITION_WISE and row["mode"] == base["mode"]:
            row["over_position_wise"] = row["time_ratio"] / base["time_ratio"]
    return rows


#: ``--huge-pages``: the settings every cell runs under (None: the environment's as it is)
HUGE_PAGES: dict[str, tuple[bool | None, ...]] = {"inherit": (None,), "on": (True,), "both": (False, True)}


def cell_environment(huge_pages: bool | None) -> dict[str, str]:
    """The environment of a cell's subprocess: this one's, with torch's CPU allocator told
    to use transparent huge pages (``THP_MEM_ALLOC_ENABLE``) or not when ``huge_pages`` is set."""
    env = dict(os.environ)
    if huge_pages is not None:
        env["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    return env


def kernel_transparent_hugepage() -> str | None:
    """The kernel's transparent huge page mode (the bracketed word of
    ``/sys/kernel/mm/transparent_hugepage/enabled``): torch's ``THP_MEM_ALLOC_ENABLE`` asks
    for huge pages with ``madvise``, which works under ``always`` and ``madvise``, not ``never``."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            text = fh.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in 256..2048, 8 decode tokens: a smoke run in a few minutes")
    p.add_argument("--variants", nargs="*", help="default: every registered variant")
    p.add_argument("--backends", nargs="*", help="default: every registered backend that can run here")
    p.add_argument("--lengths", nargs="*", type=int, help="default: 1024 2048 4096 16384")
    p.add_argument("--growth", nargs=2, type=int, metavar=("T_LO", "T_HI"), help="default: 2048 16384 (quick: 256 2048)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per cell (0: torch's default); use 1 on a shared CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats for T <= 4096 (the median is reported)")
    p.add_argument("--long-repeats", type=int, default=3, help="timed repeats for T > 4096 (the median is reported)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--max-dense-t", type=int, default=None, help="largest T for the dense reference and CPU flex (default: 4096 on CPU, no limit on CUDA)")
    p.add_argument("--cell-timeout", type=int, default=900, help="seconds per (variant, backend, T) subprocess")
    p.add_argument("--huge-pages", choices=sorted(HUGE_PAGES), default="inherit",
                   help="torch's CPU allocator with transparent huge pages (THP_MEM_ALLOC_ENABLE) in every cell: as the "
                        "environment says (inherit), on, or both (each cell off then on, side by side)")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return
    if args.quick:
        args.lengths = args.lengths or [256, 512, 1024, 2048]
        args.growth = args.growth or [256, 2048]
        args.decode_tokens = min(args.decode_tokens, 8)
        args.repeats = min(args.repeats, 2)
    args.lengths = args.lengths or [1024, 2048, 4096, 16384]
    args.growth = args.growth or [2048, 16384]
    missing = sorted(set(args.growth) - set(args.lengths))
    if missing:
        p.error(f"--growth {args.growth[0]} {args.growth[1]}: length(s) {missing} are not in --lengths {args.lengths}; "
                "the growth compares cells at both lengths (add them to --lengths)")
    if args.max_dense_t is None:
        args.max_dense_t = 4096 if args.device == "cpu" else 1 << 30

    import memzoo

    variant_options = {name: bench_options(name, args) for name in args.variants or memzoo.list_variants()}
    cells, skipped, unavailable = plan_cells(args, variant_options)
    settings = HUGE_PAGES[args.huge_pages]
    if settings != (None,) and args.device == "cpu" and kernel_transparent_hugepage() == "never":
        print("[bench_backends] the kernel's transparent huge pages are off ('never'): --huge-pages on changes nothing here",
              file=sys.stderr)
    results = []
    for cell, pages in ((cell, pages) for cell in cells for pages in settings):
        key = {k: cell[k] for k in ("variant", "backend", "T")} | ({} if pages is None else {"huge_pages": pages})
        print(f"[bench_backends] {key}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True, text=True,
                                  timeout=args.cell_timeout, env=cell_environment(pages))
        except subprocess.TimeoutExpired:
            results.append({**key, "skipped": f"timed out after {args.cell_timeout} s (--cell-timeout)"})
            continue
        if proc.returncode != 0:
            results.append({**key, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"})
            continue
        results.append({**key, **json.loads(proc.stdout.strip().splitlines()[-1])})
    print(json.dumps({
        "benchmark": "backends",
        "command": "python benchmarks/bench_backends.py " + " ".join(sys.argv[1:]),
        "environment": environment(args),
        "settings": {"batch": 1, "d_model": args.d_model, "n_heads": args.n_heads, "n_layers": args.n_layers,
                     "block_size": args.block_size, "variant_options": variant_options, "decode_tokens": args.decode_tokens,
                     "repeats": args.repeats, "long_repeats": args.long_repeats,
                     "prefill_chunk": args.prefill_chunk, "lengths": args.lengths},
        "unavailable_backends": unavailable,
        "results": results + skipped,
        "cost_growth": growth(results, *args.growth),
    }, indent=2))


if __name__ == "__main__":
    main()
