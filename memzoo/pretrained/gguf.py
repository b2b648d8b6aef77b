"""A ``.gguf`` file as an ordinary Hugging Face folder, converted once and cached.

transformers' GGUF loader (it needs ``transformers`` and ``gguf``) dequantises the
weights to float32 and undoes llama.cpp's interleaved q/k row order; the result is
written as ``config.json`` + ``model.safetensors`` (+ the tokenizer, when
``tokenizers`` can rebuild it from the file) under the cache folder, outside any
repository: ``$MEMZOO_CACHE``, else ``$XDG_CACHE_HOME/memzoo``, else ``~/.cache/memzoo``.
The cache entry (``gguf/<key>``) is keyed by the file's content (its SHA-256, read on
every load: about 0.1 s for SmolLM2's 98 MB) and the transformers version that converted
it, so copies of one file (another virtual environment, clone, file name or reinstalled
package) share one entry; it is
written atomically (a temporary folder renamed into place) under a file lock, so
concurrent first loads convert once. Entries are never removed by memzoo: each is a
plain folder (float32 weights, about 5x the size of a 4-bit file) that can be deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

from memzoo.pretrained.families import PretrainedError, PretrainedWarning
from memzoo.pretrained.save import CONFIG_NAME, WEIGHTS_NAME


def cache_root() -> Path:
    if os.environ.get("MEMZOO_CACHE"):
        return Path(os.environ["MEMZOO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "memzoo"


def gguf_folder(path: Path) -> Path:
    """The cached Hugging Face folder of the GGUF file ``path`` (converted on first use)."""
    from memzoo.extras import GGUF, TRANSFORMERS

    for need in (TRANSFORMERS, GGUF):
        if not need:
            raise PretrainedError(f"loading {path.name} needs transformers and gguf: pip install 'memzoo[hf]' ({need.message})")
    import transformers

    path = path.resolve()
    folder = cache_root() / "gguf" / cache_key(path, transformers.__version__)
    if _converted(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.parent / f".{folder.name}.lock"):  # one conversion at a time (e.g. parallel test workers)
        if not _converted(folder):
            _convert(path, folder)
    return folder


def cache_key(path: Path, converter_version: str) -> str:
    """The cache key of the GGUF file ``path``: its content and the converting
    transformers version (not its path or modification time: a copy of the same file
    reuses the entry)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return hashlib.sha256(f"{digest.hexdigest()}|{converter_version}".encode()).hexdigest()[:16]


def _converted(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(path: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)  # a note of the GGUF file: the saved weights are dequantised
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # the same tensor as the embedding (safetensors stores it once)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))
        except (ImportError, ValueError, OSError) as err:  # the weights do not need it: say so, go on
            warnings.warn(f"{path.name}: no tokenizer saved with the converted weights ({err!r})", PretrainedWarning, stacklevel=2)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it first (the folder exists): use that one
            if not (folder / CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
