"""Foundation benchmarks (issue 2), printing JSON.

1. Block-gathered SDPA vs the dense-mask reference on BSWA attention, forward+backward,
   B=2, H=8, T=4096, head dim 64, L=256, m=1 (the attention op alone), side by side.
2. Streaming a `bswa` model: state bytes and per-token decode time after 1k and after
   100k streamed tokens (1024 and 102400: the same offset in a block, so the partial
   block is the same size; reached in large no-grad chunks, then timed token by token).

    python benchmarks/bench_foundation.py            # full sizes
    python benchmarks/bench_foundation.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import memzoo
from memzoo import ops


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_attention(b, h, t, dh, size, m, repeats):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, dh, generator=gen).requires_grad_(True) for _ in range(3))
    layout = ops.BlockLayout(size, m * size)
    result = {"B": b, "H": h, "T": t, "head_dim": dh, "L": size, "m": m, "repeats": repeats}

    def run(backend):
        def go():
            out = ops.attend(q, k, v, layout=layout, q_start=0, scale=dh**-0.5, backend=backend)
            out.sum().backward()
        return go

    def dense_sdpa():
        # one SDPA call with the layout's dense (T, T) mask: the usual way, for context
        pos = torch.arange(t)
        mask = layout.visible(pos[:, None], pos[None, :])
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=dh**-0.5)
        out.sum().backward()

    # interleave the backends so machine noise hits all alike
    runs = {"sdpa": run("sdpa"), "reference": run("reference"), "dense_mask_sdpa": dense_sdpa}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].extend(timed(fn, 1))
    for name, ts in times.items():
        result[f"{name}_fwd_bwd_s_median"] = statistics.median(ts)
    result["speedup_sdpa_over_reference"] = result["reference_fwd_bwd_s_median"] / result["sdpa_fwd_bwd_s_median"]
    result["speedup_sdpa_over_dense_mask_sdpa"] = result["dense_mask_sdpa_fwd_bwd_s_median"] / result["sdpa_fwd_bwd_s_median"]
    with torch.no_grad():
        a = ops.attend(q, k, v, layout=layout, q_start=0, scale=dh**-0.5, backend="sdpa")
        r = ops.attend(q, k, v, layout=layout, q_start=0, scale=dh**-0.5, backend="reference")
    result["max_abs_diff"] = (a - r).abs().max().item()
    return result


def bench_streaming(points, decode_tokens, chunk):
    torch.manual_seed(0)
    model = memzoo.build_model("bswa", vocab_size=256, d_model=64, n_layers=2, n_heads=4, block_size=64, memory_blocks=1).eval()
    state, streamed, rows = None, 0, []
    with torch.no_grad():
        for target in points:
            while streamed < target:
                n = min(chunk, target - streamed)
                _, state = model(torch.randint(0, 256, (1, n)), state=state)
                streamed += n
            tok = torch.randint(0, 256, (1, 1))
            model(tok, state=state)  # warm-up
            times = []
            s = state
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                _, s = model(tok, state=s)
                times.append(time.perf_counter() - t0)
            rows.append({"streamed_tokens": streamed, "state_bytes": state.nbytes, "decode_ms_per_token_median": 1e3 * statistics.median(times)})
    return {
        "model": "bswa d_model=64 n_layers=2 n_heads=4 block_size=64 memory_blocks=1, batch 1",
        "points": rows,
        "state_bytes_equal": len({r["state_bytes"] for r in rows}) == 1,
        "decode_time_ratio_last_over_first": rows[-1]["decode_ms_per_token_median"] / rows[0]["decode_ms_per_token_median"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args()
    if args.quick:
        att = bench_attention(1, 2, 512, 32, 64, 1, repeats=2)
        stream = bench_streaming([1024, 5120], decode_tokens=20, chunk=1024)
    else:
        att = bench_attention(2, 8, 4096, 64, 256, 1, repeats=5)
        stream = bench_streaming([1024, 102_400], decode_tokens=200, chunk=4096)
    print(json.dumps({
        "benchmark": "foundation",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "memzoo": memzoo.__version__,
        "attention_bswa": att, "streaming_bswa": stream,
    }, indent=2))


if __name__ == "__main__":
    main()
