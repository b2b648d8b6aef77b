"""``memzoo generate``: decode text from a model folder (or a .gguf file) with any
variant, printing the text as it decodes.

    memzoo generate --model DIR --variant fam --prompt "The capital of France is" --max-new-tokens 64
    memzoo generate --model DIR --prompt "..." --temperature 0.8 --top-p 0.95 --seed 0 --stats

The tokenizer is the one found with the model: ``DIR/tokenizer.json`` (read with
``tokenizers``), or the GGUF file's own (read with ``transformers``' GGUF loading).
The model comes from ``memzoo.from_pretrained``: a Hugging Face Llama-family folder,
memzoo's own folder format, or a ``.gguf`` file, run as any variant.
``--stats`` prints prefill time, decode tokens/s and the state's bytes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from memzoo.cli import Command, register_command
from memzoo.errors import InputError


def add_arguments(g: argparse.ArgumentParser) -> None:
    """The ``generate`` subcommand's arguments."""
    g.add_argument("--model", required=True, help="a model folder (config.json + model.safetensors [+ tokenizer.json]) or a .gguf file")
    g.add_argument("--variant", default=None, help="memory variant to run the weights with (default: the folder's own)")
    g.add_argument(
        "--option", dest="options", action="append", default=[], metavar="FIELD=VALUE",
        help="a field of the model config, value as JSON, e.g. memory_blocks=4 or block_size=128 (repeatable)",
    )
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--eos-token-id", type=int, action="append", default=None, help="stop token (default: the model's / tokenizer's; -1: none)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (torch.Generator)")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    g.add_argument("--stats", action="store_true", help="print prefill time, decode tokens/s and the state's bytes (stderr)")


# ------------------------------------------------------------------ tokenizers
class Codec:
    """Text <-> token ids, from whichever tokenizer was found."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], eos: int | None) -> None:
        self.encode, self.decode, self.eos_token_id = encode, decode, eos


def find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def load_tokenizer(path: str | Path) -> Codec:
    """The tokenizer found with the model: ``tokenizer.json`` or the GGUF's own."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if (folder / "tokenizer.json").is_file() and not (path.is_file() and path.suffix == ".gguf"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return Codec(lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids), _config_eos(folder))
    gguf = find_gguf(path)
    if gguf is not None:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return Codec(
            lambda s: hf_tok(s, add_special_tokens=False).input_ids,
            lambda ids: hf_tok.decode(ids, skip_special_tokens=True),
            hf_tok.eos_token_id,
        )
    raise InputError(f"no tokenizer found with the model {path}: expected {folder / 'tokenizer.json'} or a .gguf file")


def _config_eos(folder: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            if isinstance(eos, int):
                return eos
    return None


# ------------------------------------------------------------------ models
def load_model(path: str | Path, variant: str | None, fields: dict[str, Any]) -> Any:
    """A :class:`memzoo.MemzooLM` from ``path`` (any source ``memzoo.from_pretrained``
    reads) run as ``variant`` (None: the checkpoint's own)."""
    import memzoo

    return memzoo.from_pretrained(str(path), variant, **fields)


def _parse_fields(items: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option takes FIELD=VALUE, got {item!r}")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    return fields


# ------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    codec = load_tokenizer(args.model)
    model = load_model(args.model, args.variant, _parse_fields(args.options))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    ids = codec.encode(args.prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens; give a non-empty --prompt")
    tokens = torch.tensor([ids], dtype=torch.long, device=args.device)
    eos = args.eos_token_id if args.eos_token_id is not None else ([codec.eos_token_id] if codec.eos_token_id is not None else [])
    eos = [e for e in eos if e >= 0] or None

    out = sys.stdout
    new: list[int] = []
    printed = ""
    times: list[float] = []
    start = time.perf_counter()

    base = codec.decode(ids)

    def continuation() -> str:
        # decode with the prompt so the tokenizer places spaces between prompt and new text
        whole = codec.decode(ids + new)
        return whole[len(base):] if whole.startswith(base) else codec.decode(new)

    def show(token: torch.Tensor) -> None:
        nonlocal printed
        times.append(time.perf_counter())
        new.append(int(token[0]))
        text = continuation()
        if text.startswith(printed):  # a token may complete a multi-byte character only later
            out.write(text[len(printed):])
            out.flush()
            printed = text

    out.write(args.prompt)
    out.flush()
    _, state = model.generate(
        tokens, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, eos_token_id=eos, generator=torch.Generator(args.device).manual_seed(args.seed),
        prefill_chunk=args.prefill_chunk, return_state=True, streamer=show,
    )
    final = continuation()
    if final.startswith(printed) and final != printed:
        out.write(final[len(printed):])
    out.write("\n")
    out.flush()
    if args.stats:
        n = len(times)
        decode_s = times[-1] - times[0] if n > 1 else 0.0
        rate = (n - 1) / decode_s if decode_s > 0 else float("nan")
        print(
            f"memzoo generate: variant {model.variant}, prompt {tokens.shape[1]} tokens, {n} new; "
            f"prefill + first token {times[0] - start if times else 0.0:.3f} s; decode {rate:.1f} tokens/s; "
            f"state {state.nbytes} bytes at position {state.pos}",
            file=sys.stderr,
        )
    return 0


def _run(args: argparse.Namespace, argv: Any = ()) -> int:
    return run(args)


register_command(Command(
    name="generate", help="generate text with a model folder / .gguf and any variant, printed as it decodes",
    add_arguments=add_arguments, run=_run, description=__doc__,
))
