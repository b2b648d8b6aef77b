"""``passkey``: a key of a few digits hidden in filler, asked for at the end.

The token-level form of the Landmark Attention / TransformerFAM passkey test::

    filler ... filler KEY d1 d2 d3 filler ... filler QUERY d1 d2 d3
                      \\_ key at depth p/F _/               \\_ scored _/

``F`` = filler tokens = ``T - 2 (n_digits + 1)``; the key segment is inserted
after ``p`` of them (depth ``p / F``: 0 = at the start, 1 = right before the
query). The model reads the whole sequence; only its predictions of the answer
digits after ``QUERY`` are scored. ``accuracy`` counts an example right only if
every digit is right; ``digit_accuracy`` counts digits.

Filler ``"repeat"`` cycles through the filler tokens in order, like Landmark's
repeated sentences ("The grass is green. The sky is blue. ..."): it carries no
information, so the key is the only thing worth remembering. ``"random"`` draws
each filler token independently.

At evaluation, examples are spread over ``eval_depths`` in turn (example ``i`` at
depth ``eval_depths[i % len]``) and accuracy is also reported by depth; during
training the depth is uniform.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from memzoo.tasks.base import Batch, Split, Task, TaskConfig, next_token_targets, randint
from memzoo.tasks.registry import register_task

N_DIGIT_TOKENS = 10
KEY, QUERY = 10, 11
FIRST_FILLER = 12


class PasskeyConfig(TaskConfig):
    n_digits: int = Field(5, ge=1, le=32, description="digits in the key")
    n_filler: int = Field(8, ge=1, le=4096, description="distinct filler tokens")
    filler: Literal["repeat", "random"] = Field("repeat", description="filler pattern: a fixed cycle, or i.i.d. tokens")
    eval_depths: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0), min_length=1, description="depths (0 = start, 1 = end) evaluation spreads the key over"
    )

    @field_validator("eval_depths")
    @classmethod
    def _depths_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [d for d in v if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"eval_depths must lie in [0, 1]; got {bad}")
        return v


@register_task("passkey", config=PasskeyConfig)
class Passkey(Task):
    Config = PasskeyConfig
    metrics = {"accuracy": "exact", "digit_accuracy": "token_accuracy"}
    config: PasskeyConfig

    @property
    def vocab_size(self) -> int:
        return FIRST_FILLER + self.config.n_filler

    def min_length(self, split: Split = "train") -> int:
        return 2 * (self.config.n_digits + 1)

    def sample(self, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
        self.check_length(length, split)
        c = self.config
        k = c.n_digits
        n_filler_pos = length - 2 * (k + 1)
        digits = randint(0, N_DIGIT_TOKENS, (batch_size, k), generator)
        if split == "eval":
            depths = [c.eval_depths[i % len(c.eval_depths)] for i in range(batch_size)]
            where = torch.tensor([round(d * n_filler_pos) for d in depths])
            groups = [f"depth={d:g}" for d in depths]
        else:
            where = randint(0, n_filler_pos + 1, (batch_size,), generator)
            groups = []
        if c.filler == "repeat":
            filler = (torch.arange(n_filler_pos) % c.n_filler + FIRST_FILLER).expand(batch_size, -1)
        else:
            filler = randint(FIRST_FILLER, FIRST_FILLER + c.n_filler, (batch_size, n_filler_pos), generator)
        tokens = torch.empty(batch_size, length, dtype=torch.long)
        for b in range(batch_size):
            p = int(where[b])
            key = torch.cat([torch.tensor([KEY]), digits[b]])
            tokens[b] = torch.cat([filler[b, :p], key, filler[b, p:], torch.tensor([QUERY]), digits[b]])
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        mask[:, length - k - 1 : length - 1] = True  # positions whose next token is an answer digit
        return Batch(tokens, next_token_targets(tokens), mask, groups)
