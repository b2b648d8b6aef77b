"""The language model wrapper: token embedding -> backbone -> final norm -> LM head."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from memzoo.errors import InputError
from memzoo.generation import GenerationMixin
from memzoo.ragged import RaggedState, check_mask
from memzoo.state import State
from memzoo.variants.base import Backbone


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    state: State


class MemzooLM(GenerationMixin, nn.Module):
    def __init__(self, backbone: Backbone, vocab_size: int, tie_embeddings: bool = False) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.backbone = backbone
        self.embed = nn.Embedding(vocab_size, backbone.d_model)
        self.norm = nn.RMSNorm(backbone.d_model, eps=backbone.norm_eps)
        self.head = nn.Linear(backbone.d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        #: the checkpoint folder ``memzoo.from_pretrained`` read (a ``.gguf`` file's converted
        #: folder included), or None; ``save_pretrained`` copies its tokenizer files
        self.pretrained_folder: Path | None = None
        #: the checkpoint's special token ids (``bos_token_id``, ``eos_token_id``: an id or a
        #: list, ``pad_token_id``) as ``from_pretrained`` read them; ``save_pretrained`` and
        #: the transformers wrapper (:meth:`memzoo.hf.MemzooForCausalLM.from_memzoo`) carry them
        self.token_ids: dict[str, Any] = {}
        self._generation_origin()  # made now, so a copy (deepcopy, pickle) made before any generate() shares it

    @property
    def variant(self) -> str:
        return self.backbone.variant

    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype)

    def check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise InputError(f"tokens must be a torch.LongTensor of shape (B, T), got {type(tokens).__name__}")
        if tokens.dtype != torch.long:
            raise InputError(f"tokens must have dtype torch.int64 (long), got {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise InputError(f"tokens must have shape (B, T) with B, T >= 1, got {tuple(tokens.shape)}")
        if tokens.device != self.embed.weight.device:
            raise InputError(f"tokens are on {tokens.device}, the model is on {self.embed.weight.device}")
        if torch.compiler.is_compiling():
            # no host sync in a compiled graph: the check runs on the device, as an assert
            torch._assert_async(
                ((tokens >= 0) & (tokens < self.vocab_size)).all(),
                f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size})",
            )
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(f"token ids must lie in [0, {self.vocab_size - 1}] (vocab_size={self.vocab_size}); got min {lo}, max {hi}")

    def forward(
        self, tokens: Tensor, state: "State | RaggedState | None" = None, *, attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None, return_state: bool = True,
    ) -> ModelOutput:
        """Logits (B, T, V) and the state after ``tokens`` (B, T).

        ``attention_mask`` (B, T): 1 = real token, 0 = padding (left and/or right; the
        ids at padding are not read, and their logits are 0). ``document_ids`` (B, T): a
        new id in a row starts a new document from the fresh state. Each row gets what
        it gets alone (see :mod:`memzoo.ragged`). ``return_state=False``: the state is
        None, and a padded batch whose rows start at one position runs as one call (a
        training step that does not pass its state on)."""
        extra: dict[str, Any] = {} if document_ids is None else {"document_ids": document_ids}
        if return_state is not True:
            extra["return_state"] = return_state
        if attention_mask is None:
            self.check_tokens(tokens)
            y, new_state = self.backbone(self.embed(tokens), state, **extra)
            return ModelOutput(self.head(self.norm(y)), new_state)
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            self.check_tokens(tokens)
        real = check_mask(attention_mask, tuple(tokens.shape), tokens.device)
        tokens = tokens.masked_fill(~real, 0)
        self.check_tokens(tokens)
        y, new_state = self.backbone(self.embed(tokens), state, attention_mask=real, **extra)
        return ModelOutput(self.head(self.norm(y)).masked_fill(~real[..., None], 0.0), new_state)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json + model.safetensors to the folder ``path``;
        ``memzoo.from_pretrained(path)`` gives this model back (see docs/pretrained.md).
        A model loaded with ``from_pretrained`` takes its checkpoint's tokenizer files
        and token ids along, so ``memzoo generate --model path`` finds them."""
        from memzoo.pretrained.save import save_pretrained

        return save_pretrained(self, path)
