"""``text``: character-level language modelling on long text, in bits per character.

Default corpus: the ~465k characters of English that ship with CPython
(``pydoc_data.topics``, the topics of ``help()``), joined in sorted topic order,
so nothing is downloaded. ``path`` points the task at any UTF-8 text file.

The last ``eval_fraction`` of the corpus is held out: training windows come from
the rest, evaluation windows from it. The vocabulary is the set of characters of
the whole corpus (sorted), so every character has an id. Every position but the
last is scored (the next character); ``bpc`` is the mean negative
log-likelihood in bits.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from memzoo.errors import InputError
from memzoo.tasks.base import Batch, Split, Task, TaskConfig, next_token_targets, randint
from memzoo.tasks.registry import register_task


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


class TextConfig(TaskConfig):
    path: str | None = Field(None, description="a UTF-8 text file; None = Python's own pydoc_data.topics")
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="the held-out tail of the corpus")


@register_task("text", config=TextConfig)
class Text(Task):
    Config = TextConfig
    metrics = {"bpc": "bits"}
    higher_is_better = False
    config: TextConfig

    @cached_property
    def corpus(self) -> str:
        if self.config.path is None:
            return default_corpus()
        path = Path(self.config.path)
        if not path.is_file():
            raise InputError(f"text task: corpus file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if len(text) < 4:
            raise InputError(f"text task: corpus {str(path)!r} has {len(text)} characters; it needs at least 4")
        return text

    def data_fingerprint(self) -> dict[str, str]:
        """The corpus's sha256 (of its UTF-8 text): a changed file, or another Python's
        ``pydoc_data``, is other data, so a comparison does not reuse runs made on the old one."""
        return {"corpus_sha256": hashlib.sha256(self.corpus.encode("utf-8")).hexdigest()}

    @cached_property
    def chars(self) -> list[str]:
        return sorted(set(self.corpus))

    @cached_property
    def ids(self) -> Tensor:  # (N,) int64: the corpus as character ids
        index = {ch: i for i, ch in enumerate(self.chars)}
        return torch.tensor([index[ch] for ch in self.corpus], dtype=torch.long)

    @property
    def split_at(self) -> int:
        return int(len(self.corpus) * (1 - self.config.eval_fraction))

    def encode(self, text: str) -> Tensor:
        index = {ch: i for i, ch in enumerate(self.chars)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise InputError(f"characters not in the corpus vocabulary: {unknown[:10]}")
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def min_length(self, split: Split = "train") -> int:
        return 2

    def sample(self, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
        self.check_length(length, split)
        lo, hi = (0, self.split_at) if split == "train" else (self.split_at, len(self.corpus))
        if hi - lo < length:
            raise InputError(
                f"text task: the {split} part of the corpus has {hi - lo} characters, fewer than length={length}; "
                "use a shorter length, a longer corpus or another eval_fraction"
            )
        starts = randint(lo, hi - length + 1, (batch_size,), generator)
        tokens = torch.stack([self.ids[s : s + length] for s in starts.tolist()])
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        mask[:, -1] = False
        return Batch(tokens, next_token_targets(tokens), mask)
