"""``mqar``: multi-query associative recall (Arora et al. 2023, "Zoology").

``N`` key-value pairs, then each key asked for once, in a random order, at random
places in the rest of the sequence (the gaps are a filler token)::

    k3 v3 k1 v1 k7 v7 | _ _ k1 v1 _ _ _ k7 v7 _ k3 v3 _ _
    \\__ N pairs ____/  \\___ queries; the value after each query key is scored

Keys are distinct within a sequence; values may repeat. ``accuracy`` is the
fraction of queried values predicted right. At evaluation, examples cycle
through ``eval_pairs`` (example ``i`` has ``eval_pairs[i % len]`` pairs) and
accuracy is also reported per number of pairs; training uses ``num_pairs``.
A sequence of ``T`` tokens holds at most ``T // 4`` pairs.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from memzoo.tasks.base import Batch, Split, Task, TaskConfig, next_token_targets, randint
from memzoo.tasks.registry import register_task


class MQARConfig(TaskConfig):
    n_keys: int = Field(64, ge=1, description="size of the key vocabulary")
    n_values: int = Field(64, ge=1, description="size of the value vocabulary")
    num_pairs: int = Field(8, ge=1, description="key-value pairs per training sequence")
    eval_pairs: tuple[int, ...] = Field((), description="pairs per evaluation sequence, in turn; () = (num_pairs,)")

    @model_validator(mode="after")
    def _check(self) -> "MQARConfig":
        for n in (self.num_pairs, *self.eval_pairs):
            if not 1 <= n <= self.n_keys:
                raise ValueError(f"pairs per sequence must be in [1, n_keys={self.n_keys}] (keys are distinct); got {n}")
        return self

    @property
    def pairs_for_eval(self) -> tuple[int, ...]:
        return self.eval_pairs or (self.num_pairs,)


@register_task("mqar", config=MQARConfig)
class MQAR(Task):
    Config = MQARConfig
    metrics = {"accuracy": "token_accuracy"}
    config: MQARConfig

    @property
    def filler(self) -> int:
        return self.config.n_keys + self.config.n_values

    @property
    def vocab_size(self) -> int:
        return self.config.n_keys + self.config.n_values + 1

    def min_length(self, split: Split = "train") -> int:
        pairs = self.config.num_pairs if split == "train" else max(self.config.pairs_for_eval)
        return 4 * pairs

    def sample(self, batch_size: int, length: int, generator: torch.Generator, *, split: Split = "train") -> Batch:
        self.check_length(length, split)
        c = self.config
        if split == "eval":
            pairs = [c.pairs_for_eval[i % len(c.pairs_for_eval)] for i in range(batch_size)]
            groups = [f"pairs={n}" for n in pairs]
        else:
            pairs, groups = [c.num_pairs] * batch_size, []
        tokens = torch.full((batch_size, length), self.filler, dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        for b, n in enumerate(pairs):
            keys = torch.randperm(c.n_keys, generator=generator)[:n]
            values = randint(c.n_keys, c.n_keys + c.n_values, (n,), generator)
            tokens[b, 0 : 2 * n : 2] = keys
            tokens[b, 1 : 2 * n : 2] = values
            # queries sit in 2-token slots of the remaining region, one slot per key
            n_slots = (length - 2 * n) // 2
            slots = torch.randperm(n_slots, generator=generator)[:n].sort().values
            at = 2 * n + 2 * slots  # positions of the query keys
            order = torch.randperm(n, generator=generator)
            tokens[b, at] = keys[order]
            tokens[b, at + 1] = values[order]
            mask[b, at] = True
        return Batch(tokens, next_token_targets(tokens), mask, groups)
