"""memzoo's ``xl`` and ``rmt`` against the peer libraries a user would otherwise pick,
at matched width, depth, heads, segment and memory; prints one JSON document.

* training throughput (tokens/s of forward + cross-entropy + backward over a whole
  sequence) and the process's peak RSS growth during one such step, memzoo vs peer,
  measured interleaved in one process (the CPU may be shared);
* streaming decode: per-token latency and state size after 1k and after 100k tokens
  streamed (memzoo; 100k is reached in big no-grad chunks), and the peers' own
  generation per-token latency after 1k tokens.

Peers: ``x-transformers`` (Transformer-XL recurrence: ``mems`` / ``max_mem_len``, rotary)
for ``xl``; ``recurrent-memory-transformer-pytorch`` for ``rmt`` (XL memories and hyper
connections off, rotary, plain causal mask). They are *not* memzoo dependencies: install
them in a separate virtual environment and run this script from it::

    python -m venv .venv-bench --system-site-packages
    .venv-bench/bin/pip install x-transformers==2.31.10 recurrent-memory-transformer-pytorch==0.7.0
    .venv-bench/bin/python benchmarks/bench_peers.py > bench_peers.json

Without the peers the memzoo rows are still measured and the peer rows say why not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import memzoo  # noqa: E402


# ----------------------------------------------------------------------- helpers
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux: VmHWM) so the next step's peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_step(step: Callable[[], torch.Tensor], model: nn.Module) -> float:
    """Seconds of one forward + loss + backward step."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    step().backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def probe_peak_memory(impl: str) -> dict[str, Any]:
    """Peak RSS growth (MiB) of one training step of ``impl``, in a fresh process (so
    memory the allocator kept from earlier work does not hide the peak)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--probe", impl]
    # glibc: serve every allocation above 64 KiB by mmap, so freed tensors leave the RSS at
    # once and the peak RSS follows the peak of live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def compare_training(
    name: str, steps: dict[str, tuple[Callable[[], torch.Tensor], nn.Module]], tokens: int, repeats: int
) -> dict[str, Any]:
    """Interleave the implementations' steps (one warm-up round), report medians; peak
    memory from a separate fresh process per implementation."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(repeats + 1):
        for impl, (step, model) in steps.items():
            seconds = measure_step(step, model)
            if rep:  # the first round is warm-up
                times[impl].append(seconds)
    out: dict[str, Any] = {"case": name}
    for impl in steps:
        med, best = statistics.median(times[impl]), min(times[impl])
        out[impl] = {
            "seconds_per_step_median": round(med, 4),
            "seconds_per_step_min": round(best, 4),
            "seconds_per_step_all": [round(t, 4) for t in times[impl]],
            "tokens_per_s": round(tokens / med, 1),
            "tokens_per_s_best": round(tokens / best, 1),
            "peak_rss_growth_mib": probe_peak_memory(impl).get("peak_rss_growth_mib"),
            "parameters": sum(p.numel() for p in steps[impl][1].parameters()),
        }
    impls = list(steps)
    if len(impls) == 2:
        mine, peer = impls
        out["speed_ratio_memzoo_over_peer"] = round(out[mine]["tokens_per_s"] / out[peer]["tokens_per_s"], 3)
        # the best of N steps is the least disturbed by other jobs on a shared CPU
        out["speed_ratio_memzoo_over_peer_best"] = round(out[mine]["tokens_per_s_best"] / out[peer]["tokens_per_s_best"], 3)
        mem_mine, mem_peer = out[mine]["peak_rss_growth_mib"], out[peer]["peak_rss_growth_mib"]
        if mem_mine and mem_peer:
            out["peak_memory_ratio_memzoo_over_peer"] = round(mem_mine / mem_peer, 3)
    return out


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on every position but the last (same for every implementation)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------ peers
def xtransformers_xl(cfg: dict[str, int]) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(
        num_tokens=cfg["vocab"], max_seq_len=cfg["segment"], max_mem_len=cfg["memory"], use_abs_pos_emb=False,
        attn_layers=Decoder(
            dim=cfg["d_model"], depth=cfg["n_layers"], heads=cfg["n_heads"], attn_dim_head=cfg["d_model"] // cfg["n_heads"],
            rotary_pos_emb=True, use_rmsnorm=True, attn_flash=True,
        ),
    )


def xtransformers_xl_logits(net: nn.Module, tokens: torch.Tensor, segment: int) -> torch.Tensor:
    """The XL training recurrence as x-transformers' XLAutoregressiveWrapper runs it:
    segment by segment, the detached hidden states of the last max_mem_len positions as mems."""
    mems, outs = None, []
    for seg in tokens.split(segment, dim=1):
        logits, mems = net(seg, mems=mems, return_mems=True)
        outs.append(logits)
    return torch.cat(outs, dim=1)


def peer_rmt(cfg: dict[str, int]) -> nn.Module:
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

    net = RecurrentMemoryTransformer(
        cfg["d_model"], num_tokens=cfg["vocab"], depth=cfg["n_layers"], num_memory_tokens=cfg["memory_tokens"],
        seq_len=cfg["segment"], heads=cfg["n_heads"], dim_head=cfg["d_model"] // cfg["n_heads"], use_flash_attn=True,
        abs_pos_emb=False, rotary_pos_emb=True, use_xl_memories=False, num_residual_streams=1, memory_not_causal=False,
    )
    return RecurrentMemoryTransformerWrapper(net)


# ------------------------------------------------------------------------ decode
def memzoo_decode(model: memzoo.MemzooLM, points: list[int], window: int, chunk: int, vocab: int) -> list[dict[str, Any]]:
    """Stream to each of ``points`` tokens in no-grad chunks, then time ``window`` single-token calls."""
    gen = torch.Generator().manual_seed(0)
    rows, state, pos = [], None, 0
    with torch.no_grad():
        for target in points:
            while pos < target:
                n = min(chunk, target - pos)
                _, state = model(torch.randint(0, vocab, (1, n), generator=gen), state=state)
                pos += n
            times, sizes = [], []
            for _ in range(window):
                tok = torch.randint(0, vocab, (1, 1), generator=gen)
                t0 = time.perf_counter()
                _, state = model(tok, state=state)
                times.append(time.perf_counter() - t0)
                sizes.append(state.nbytes)
            pos += window
            rows.append({
                "tokens_streamed_before": target,
                "per_token_ms_mean": round(1e3 * statistics.fmean(times), 3),
                "per_token_ms_median": round(1e3 * statistics.median(times), 3),
                "state_bytes_max": max(sizes),
                "state_bytes_end": sizes[-1],
            })
    return rows


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------ implementations
IMPLS = ("memzoo_xl_rope", "x-transformers_xl_rotary", "memzoo_xl_relative", "memzoo_rmt", "recurrent-memory-transformer-pytorch")


def build(impl: str, args: argparse.Namespace, tokens: torch.Tensor) -> tuple[Callable[[], torch.Tensor], nn.Module]:
    """The model of ``impl`` at the benchmark's settings and its training step (returns the loss)."""
    cfg = dict(
        vocab=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, segment=args.segment,
        memory=args.memory, memory_tokens=args.memory_tokens,
    )
    shared = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, block_size=args.segment)
    torch.manual_seed(0)
    if impl.startswith("memzoo_xl"):
        positions = "rope" if impl == "memzoo_xl_rope" else "relative"
        model = memzoo.build_model("xl", **shared, memory_len=args.memory, positions=positions).train()
        return (lambda: lm_loss(model(tokens).logits, tokens)), model
    if impl == "memzoo_rmt":
        model = memzoo.build_model("rmt", **shared, num_memory_tokens=args.memory_tokens).train()
        return (lambda: lm_loss(model(tokens).logits, tokens)), model
    if impl == "x-transformers_xl_rotary":
        net = xtransformers_xl(cfg).train()
        return (lambda: lm_loss(xtransformers_xl_logits(net, tokens, args.segment), tokens)), net
    if impl == "recurrent-memory-transformer-pytorch":
        wrapper = peer_rmt(cfg).train()
        return (lambda: lm_loss(wrapper(tokens)[0], tokens)), wrapper
    raise ValueError(f"unknown implementation {impl!r}; valid: {', '.join(IMPLS)}")


def probe(impl: str, args: argparse.Namespace, tokens: torch.Tensor) -> None:
    """Child process: peak RSS growth of a training step of ``impl`` (after one warm-up
    step, gradients set to None before each)."""
    step, model = build(impl, args, tokens)
    measure_step(step, model)
    if not _reset_peak():
        print(json.dumps({"peak_rss_growth_mib": None}))
        return
    before = _status_kib("VmRSS")
    step().backward()
    print(json.dumps({"peak_rss_growth_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}))


# -------------------------------------------------------------------------- main
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seq-len", type=positive_int, default=1024, help="training sequence length T")
    parser.add_argument("--d-model", type=positive_int, default=256)
    parser.add_argument("--n-layers", type=positive_int, default=4)
    parser.add_argument("--n-heads", type=positive_int, default=4)
    parser.add_argument("--segment", type=positive_int, default=128, help="block_size L (segment length)")
    parser.add_argument("--memory", type=int, default=128, help="xl memory_len M")
    parser.add_argument("--memory-tokens", type=positive_int, default=8, help="rmt num_memory_tokens K")
    parser.add_argument("--vocab", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    parser.add_argument("--decode-points", type=positive_int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--decode-chunk", type=positive_int, default=4096)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--probe", choices=IMPLS, help=argparse.SUPPRESS)  # internal: memory probe child
    args = parser.parse_args(argv)
    points = args.decode_points
    if any(b <= a for a, b in zip(points, points[1:])):
        # the stream only goes forward: a smaller point after a larger one was timed after the
        # larger one (plus a segment) and labelled with the smaller
        parser.error(f"--decode-points must increase (tokens streamed before each timing), got {' '.join(map(str, points))}")
    return args


def main() -> None:
    args = parse_args()

    torch.set_num_threads(args.threads)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    if args.probe:
        probe(args.probe, args, tokens)
        return
    n_tok = args.batch * args.seq_len
    report: dict[str, Any] = {
        "benchmark": "bench_peers",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "vocab": args.vocab, "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "segment (block_size)": args.segment, "xl memory_len": args.memory, "rmt num_memory_tokens": args.memory_tokens,
            "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats, "threads": args.threads,
        },
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "memzoo_commit": git_commit(),
            "x-transformers": version("x-transformers"),
            "recurrent-memory-transformer-pytorch": version("recurrent-memory-transformer-pytorch"),
        },
        "training": [],
        "decode": {},
        "notes": [
            "tokens_per_s: batch*seq_len / median seconds of forward + cross-entropy + backward over the whole sequence; "
            "tokens_per_s_best: the same over the fastest repeat (least disturbed on a shared CPU)",
            "peak_rss_growth_mib: peak RSS (VmHWM) during a training step minus the RSS before it, in a fresh process after one "
            "warm-up step, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the RSS at once",
            "memzoo runs a whole sequence in one call (xl: all segments in parallel); the peers loop over segments",
            "x-transformers: TransformerWrapper(max_seq_len=segment, max_mem_len=memory) + Decoder(rotary, rmsnorm, flash "
            "attention), mems carried segment by segment as its XLAutoregressiveWrapper does",
            "recurrent-memory-transformer-pytorch: use_xl_memories=False, num_residual_streams=1 (no hyper connections), "
            "rotary, memory_not_causal=False, use_flash_attn=True; its layers also add a null key and value residuals",
        ],
    }

    models: dict[str, tuple[Callable[[], torch.Tensor], nn.Module]] = {}
    for impl in IMPLS:
        try:
            models[impl] = build(impl, args, tokens)
        except Exception as err:  # a peer that is not installed: say so, keep going
            report["training"].append({"implementation": impl, "error": repr(err)})

    def case(name: str, impls: tuple[str, ...]) -> None:
        present = {k: models[k] for k in impls if k in models}
        if present:
            report["training"].append(compare_training(name, present, n_tok, args.repeats))

    case("xl, RoPE (memzoo) vs rotary (x-transformers)", ("memzoo_xl_rope", "x-transformers_xl_rotary"))
    case("xl with XL relative positions (memzoo's default; no peer has them)", ("memzoo_xl_relative",))
    case("rmt, full BPTT across segments", ("memzoo_rmt", "recurrent-memory-transformer-pytorch"))

    if not args.skip_decode:
        for impl in ("memzoo_xl_rope", "memzoo_xl_relative", "memzoo_rmt"):
            model = models[impl][1].eval()
            report["decode"][impl] = memzoo_decode(model, args.decode_points, args.segment, args.decode_chunk, args.vocab)
        prime = torch.randint(0, args.vocab, (1, args.decode_points[0]), generator=torch.Generator().manual_seed(2))
        n_new = args.segment  # a whole segment, so work at segment boundaries is averaged in
        if "x-transformers_xl_rotary" in models:
            from x_transformers import XLAutoregressiveWrapper

            wrapper = XLAutoregressiveWrapper(models["x-transformers_xl_rotary"][1]).eval()
            catch_up = timed(lambda: wrapper.generate(prime, 1))
            total = timed(lambda: wrapper.generate(prime, n_new + 1))
            report["decode"]["x-transformers_xl_rotary"] = [{
                "tokens_streamed_before": args.decode_points[0],
                "per_token_ms_mean": round(1e3 * (total - catch_up) / n_new, 3),
                "how": f"(generate(prime, {n_new + 1}) - generate(prime, 1)) / {n_new}: its kv cache + mems",
            }]
        if "recurrent-memory-transformer-pytorch" in models:
            peer_r = models["recurrent-memory-transformer-pytorch"][1].eval()
            start = args.decode_points[0]
            catch_up = timed(lambda: peer_r.generate(prime, length=start + 1))
            total = timed(lambda: peer_r.generate(prime, length=start + n_new + 1))
            report["decode"]["recurrent-memory-transformer-pytorch"] = [{
                "tokens_streamed_before": start,
                "per_token_ms_mean": round(1e3 * (total - catch_up) / n_new, 3),
                "how": f"(generate(length=prime+{n_new + 1}) - generate(length=prime+1)) / {n_new}: recomputes its segment per token",
            }]

    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
