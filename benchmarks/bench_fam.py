"""TransformerFAM benchmarks (issue 3), printing JSON.

1. The fast path (:meth:`FAM.step`) vs the paper's per-block loop
   (:meth:`FAM.step_reference`), forward+backward, float32.
2. FAM vs BSWA with the same shared settings, forward+backward, float32.
   Both at: 2 layers, d_model 256, 4 heads, T=4096, L=256, m=1, fam_len=16, B=1; the
   three are run interleaved (noise hits all alike); medians and minimums are reported.
   For context the same at small blocks (L=32, fam_len 16): FAM then adds F/L = 1/2 of a
   block's tokens to every block, and the scan has 128 steps per layer.
3. Streaming decode with a FAM model (same sizes): state bytes and per-token time after
   1,024 and after 102,400 streamed tokens (both at the start of a block; reached in
   no-grad chunks of 4,096, then one whole block decoded token by token: the median
   is the per-token cost, the mean includes that block's one FAM update). BSWA decode
   at the same points is given for comparison.

    python benchmarks/bench_fam.py            # full sizes
    python benchmarks/bench_fam.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import memzoo


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_training(sizes: dict, t: int, fam_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    fam = memzoo.build_backbone("fam", fam_len=fam_len, **sizes)
    bswa = memzoo.build_backbone("bswa", **sizes)
    bswa.load_state_dict(fam.state_dict(), strict=False)
    x = torch.randn(1, t, sizes["d_model"], requires_grad=True)

    def fwd_bwd(run):
        def go():
            y, _ = run(x)
            y.sum().backward()
        return go

    times = interleaved(
        {"fam_fast": fwd_bwd(fam.forward), "fam_reference_loop": fwd_bwd(fam.forward_reference), "bswa": fwd_bwd(bswa.forward)},
        repeats,
    )
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    with torch.no_grad():
        diff = (fam(x)[0] - fam.forward_reference(x)[0]).abs().max().item()
    return {
        "settings": {**sizes, "fam_len": fam_len, "T": t, "B": 1, "dtype": "float32", "repeats": repeats},
        "fwd_bwd_s_median": med,
        "fwd_bwd_s_min": best,
        "fwd_bwd_s_all": times,
        "speedup_fast_over_reference_loop": med["fam_reference_loop"] / med["fam_fast"],
        "fam_over_bswa": med["fam_fast"] / med["bswa"],
        "speedup_fast_over_reference_loop_min": best["fam_reference_loop"] / best["fam_fast"],
        "fam_over_bswa_min": best["fam_fast"] / best["bswa"],
        "max_abs_diff_fast_vs_reference": diff,
    }


def bench_decode(sizes: dict, fam_len: int, points: list[int], chunk: int) -> dict:
    torch.manual_seed(0)
    rows: dict[str, list[dict]] = {}
    for name, extra in (("fam", {"fam_len": fam_len}), ("bswa", {})):
        model = memzoo.build_model(name, vocab_size=256, **sizes, **extra).eval()
        size = sizes["block_size"]
        state, streamed, out = None, 0, []
        with torch.no_grad():
            for target in points:
                while streamed < target:
                    n = min(chunk, target - streamed)
                    _, state = model(torch.randint(0, 256, (1, n)), state=state)
                    streamed += n
                tok = torch.randint(0, 256, (1, 1))
                model(tok, state=state)  # warm-up
                s, times = state, []
                for _ in range(size):  # one whole block: size - 1 plain steps and one FAM update
                    t0 = time.perf_counter()
                    _, s = model(tok, state=s)
                    times.append(time.perf_counter() - t0)
                out.append({
                    "streamed_tokens": streamed,
                    "state_bytes": state.nbytes,
                    "decode_ms_per_token_median": 1e3 * statistics.median(times),
                    "decode_ms_per_token_min": 1e3 * min(times),
                    "decode_ms_per_token_mean": 1e3 * statistics.fmean(times),
                })
        rows[name] = out
    fam_rows = rows["fam"]
    return {
        "settings": {**sizes, "fam_len": fam_len, "vocab_size": 256, "B": 1, "dtype": "float32", "chunk": chunk},
        "points": rows,
        "fam_state_bytes_equal": len({r["state_bytes"] for r in fam_rows}) == 1,
        "fam_decode_median_ratio_last_over_first": fam_rows[-1]["decode_ms_per_token_median"] / fam_rows[0]["decode_ms_per_token_median"],
        "fam_over_bswa_decode_median_at_last_point": fam_rows[-1]["decode_ms_per_token_median"] / rows["bswa"][-1]["decode_ms_per_token_median"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    if args.quick:
        sizes = dict(d_model=64, n_layers=2, n_heads=4, block_size=64, memory_blocks=1)
        training = bench_training(sizes, t=512, fam_len=8, repeats=2)
        small = bench_training({**sizes, "block_size": 16}, t=512, fam_len=8, repeats=2)
        decode = bench_decode(sizes, fam_len=8, points=[256, 2048], chunk=1024)
    else:
        sizes = dict(d_model=256, n_layers=2, n_heads=4, block_size=256, memory_blocks=1)
        training = bench_training(sizes, t=4096, fam_len=16, repeats=7)
        small = bench_training({**sizes, "block_size": 32}, t=4096, fam_len=16, repeats=3)
        decode = bench_decode(sizes, fam_len=16, points=[1024, 102_400], chunk=4096)
    print(json.dumps({
        "benchmark": "fam",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "memzoo": memzoo.__version__, "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "training": training, "training_small_blocks": small, "decode": decode,
    }, indent=2))


if __name__ == "__main__":
    main()
