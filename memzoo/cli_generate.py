"""``memzoo generate``: decode text from a model folder (or a .gguf file) with any
variant, printing the text as it decodes.

    memzoo generate --model DIR --variant fam --prompt "The capital of France is" --max-new-tokens 64
    memzoo generate --model DIR --prompt "..." --temperature 0.8 --top-p 0.95 --seed 0 --stats

The tokenizer is the one found with the model: ``DIR/tokenizer.json`` (read with
``tokenizers``), or the GGUF file's own (read with ``transformers``' GGUF loading);
``--tokenizer`` gives another (a ``tokenizer.json``, a folder holding one, or a ``.gguf``
file). The device, the sampling options and both paths are checked before anything loads.
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
    g.add_argument(
        "--tokenizer", default=None,
        help="the tokenizer, when the model has none: a tokenizer.json, a folder holding one, or a .gguf file (default: the model's)",
    )
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--eos-token-id", type=int, action="append", default=None, help="stop token, repeatable (default: the model's / tokenizer's, every id of a list; -1: none)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (torch.Generator)")
    g.add_argument("--prefill-chunk", type=int, default=None, help="prefill the prompt in chunks of N tokens")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    g.add_argument("--stats", action="store_true", help="print prefill time, decode tokens/s and the state's bytes (stderr)")


# ------------------------------------------------------------------ tokenizers
class Codec:
    """Text <-> token ids, from whichever tokenizer was found."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], eos: list[int] | None) -> None:
        self.encode, self.decode, self.eos_token_ids = encode, decode, eos


def find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def load_tokenizer(path: str | Path) -> Codec:
    """The tokenizer at ``path``: a folder's ``tokenizer.json``, a ``.json`` tokenizer file,
    or a GGUF file's own (a ``.gguf`` file, or the one ``.gguf`` file of a folder)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.suffix == ".json":
        tokenizer_file: Path | None = path
    elif path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer_file = path / "tokenizer.json"
    else:
        tokenizer_file = None
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        return Codec(lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids), _config_eos(folder))
    gguf = find_gguf(path)
    if gguf is not None:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        return Codec(
            lambda s: hf_tok(s).input_ids,  # with its special tokens (a Llama GGUF: BOS), like tokenizer.json
            lambda ids: hf_tok.decode(ids, skip_special_tokens=True),
            None if hf_tok.eos_token_id is None else [hf_tok.eos_token_id],
        )
    raise InputError(
        f"no tokenizer found at {path}: expected {path / 'tokenizer.json' if path.is_dir() else 'a tokenizer .json file'} "
        "or a .gguf file; give one with --tokenizer"
    )


def _config_eos(folder: Path) -> list[int] | None:
    """The folder's stop token ids (``eos_token_id``: one id, or a list of them, as
    Llama 3's ``[128001, 128008, 128009]``), from its generation config, else its config."""
    for name in ("generation_config.json", "config.json"):
        f = folder / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids = eos if isinstance(eos, list) else [eos]
            ids = [e for e in ids if isinstance(e, int) and not isinstance(e, bool) and e >= 0]
            if ids:
                return ids
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
        flag = {"variant": "--variant", "dtype": "--dtype", "source": "--model"}.get(key)
        if flag is not None:  # from_pretrained's own arguments, not a model field
            raise InputError(f"{key} is chosen with {flag}, not --option {key}=...")
        if key in fields:
            raise InputError(f"--option {key}=... is given twice; give each field once")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    return fields


# ------------------------------------------------------------------ the command
def _eos_ids(given: list[int] | None, default: list[int] | None) -> list[int] | None:
    """``--eos-token-id`` values (-1: none), else the tokenizer's / model's; None: no stop token."""
    if given is None:
        return default
    bad = [e for e in given if e < -1]
    if bad:
        raise InputError(f"--eos-token-id takes token ids >= 0, or -1 for none; got {bad}")
    return [e for e in given if e >= 0] or None


def run(args: argparse.Namespace) -> int:
    from memzoo.compare.settings import check_device
    from memzoo.generation import sampling_config

    check_device(args.device)
    sampling_config(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if value is not None and not Path(value).exists():
            raise InputError(f"{flag} {value}: no such file or folder (give a model folder or a .gguf file)")
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise InputError(f"--prefill-chunk must be >= 1 (tokens per prefill call), got {args.prefill_chunk}")
    codec = load_tokenizer(args.tokenizer or args.model)
    default_eos = codec.eos_token_ids
    if args.tokenizer is not None and Path(args.model).is_dir():  # a tokenizer from elsewhere: the model's eos first
        own = _config_eos(Path(args.model))
        default_eos = default_eos if own is None else own
    eos = _eos_ids(args.eos_token_id, default_eos)
    ids = codec.encode(args.prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens; give a non-empty --prompt")
    model = load_model(args.model, args.variant, _parse_fields(args.options))
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    # ids only the model knows the range of: checked here, before the prompt is printed
    sampling_config(eos_token_id=eos).check_vocab(model.vocab_size)
    outside = sorted({i for i in ids if i >= model.vocab_size})
    if outside:
        raise InputError(f"the prompt has token ids {outside[:5]} outside the model's vocabulary (vocab_size={model.vocab_size}): is --tokenizer the model's?")
    tokens = torch.tensor([ids], dtype=torch.long, device=args.device)

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
