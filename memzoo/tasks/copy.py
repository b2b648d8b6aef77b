"""``copy``: reproduce a segment after a delay (the plainest memory-capacity probe).

``S`` random symbols, filler for the delay, a ``GO`` marker, then the ``S``
symbols again; the model's predictions of the repeated symbols are scored::

    a c b d _ _ _ _ _ _ GO a c b d        (copy)
    _ a _ _ c b _ _ d _ GO a c b d        (selective=True: symbols scattered in filler)

The delay grows with the sequence length, so evaluating beyond the training
length asks the model to hold the segment for longer. ``accuracy`` is the
fraction of copied symbols predicted right; ``exact`` counts whole segments.
"""

from __future__ import annotations

import torch
from pydantic import Field

from memzoo.tasks.base import Batch, Split, Task, TaskConfig, next_token_targets, randint
from memzoo.tasks.registry import register_task


class CopyConfig(TaskConfig):
    n_symbols: int = Field(16, ge=1, description="symbols the segment is drawn from")
    segment_len: int = Field(8, ge=1, description="S: symbols to copy")
    selective: bool = Field(False, description="scatter the symbols among filler instead of putting them first")


@register_task("copy", config=CopyConfig)
class Copy(Task):
    Config = CopyConfig
    metrics = {"accuracy": "token_accuracy", "exact": "exact"}
    config: CopyConfig

    @property
    def filler(self) -> int:
        return self.config.n_symbols

    @property
    def go(self) -> int:
        return self.config.n_symbols + 1

    @property
    def vocab_size(self) -> int:
        return self.config.n_symbols + 2

    def min_length(self, split: Split = "train") -> int:
        return 2 * self.config.segment_len + 1

    def sample(self, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
        self.check_length(length, split)
        s = self.config.segment_len
        data = randint(0, self.config.n_symbols, (batch_size, s), generator)
        head = length - s - 1  # everything before GO
        tokens = torch.full((batch_size, length), self.filler, dtype=torch.long)
        if self.config.selective:
            for b in range(batch_size):
                at = torch.randperm(head, generator=generator)[:s].sort().values
                tokens[b, at] = data[b]
        else:
            tokens[:, :s] = data
        tokens[:, head] = self.go
        tokens[:, head + 1 :] = data
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        mask[:, head : length - 1] = True  # positions whose next token is a copied symbol
        return Batch(tokens, next_token_targets(tokens), mask)
