"""Generation for every variant through its streaming state: ``generate`` and ``stream``.

Prefill runs the prompt through the backbone in one call (or ``prefill_chunk``-token
chunks: the same result, by the state equivalence property), then decoding feeds one
token per call through the state. Inputs and the state are validated once, before the
loop; the loop itself calls :meth:`GenerationMixin.decode_step`, which skips the
per-call checks (no host-device synchronisation per token).

Shape notation: B batch, T prompt tokens, n new tokens, V vocabulary.

Sampling follows the conventions of Hugging Face ``transformers`` (so a wrapped model
gives the same tokens as ``transformers``' ``generate``): repetition penalty, then
temperature, top-k, top-p, then ``torch.multinomial`` on the softmax. ``temperature=0``
is greedy (argmax of the penalised logits).

The slow, obviously correct reference, :func:`generate_reference`, recomputes a full
forward over the growing sequence for every token; the tests hold ``generate`` equal to
it for every registered variant.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from memzoo.errors import InputError, StateError
from memzoo.state import State

if TYPE_CHECKING:
    from memzoo.models.lm import MemzooLM

_ORIGIN = "_memzoo_origin"  # attribute put on states that generate hands back


class SamplingConfig(BaseModel):
    """How the next token is chosen from the logits (B, V)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (argmax); > 0: sample from softmax(logits / temperature)")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens only")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus: the smallest set of tokens with probability >= top_p")
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="divide positive / multiply negative logits of tokens already in this call's tokens (CTRL)"
    )
    eos_token_id: int | list[int] | None = Field(None, description="a row stops after producing one of these ids")
    pad_token_id: int | None = Field(None, ge=0, description="fills rows that stopped; default: the first eos_token_id")

    @model_validator(mode="after")
    def _check(self) -> "SamplingConfig":
        eos = self.eos_ids
        if any(i < 0 for i in eos):
            raise ValueError(f"eos_token_id must be >= 0, got {self.eos_token_id!r}")
        if self.eos_token_id is not None and not eos:
            raise ValueError("eos_token_id must be an int or a non-empty list of ints")
        if self.temperature == 0 and (self.top_k is not None or self.top_p is not None):
            raise ValueError("top_k / top_p only apply when sampling: give temperature > 0 (temperature 0 is greedy)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def pad_id(self) -> int | None:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else None

    def check_vocab(self, vocab_size: int) -> None:
        bad = [i for i in [*self.eos_ids, *([self.pad_token_id] if self.pad_token_id is not None else [])] if i >= vocab_size]
        if bad:
            raise InputError(f"eos_token_id / pad_token_id must lie in [0, {vocab_size - 1}] (vocab_size={vocab_size}), got {bad}")


def sampling_config(**options: Any) -> SamplingConfig:
    """A :class:`SamplingConfig`, with pydantic's error turned into an :class:`InputError`."""
    try:
        return SamplingConfig(**options)
    except ValidationError as err:
        raise InputError(f"invalid sampling options: {err}") from err


# ------------------------------------------------------------------ logits -> token
def process_logits(scores: Tensor, seen: Tensor | None, config: SamplingConfig) -> Tensor:
    """Penalise and warp the next-token logits ``scores`` (B, V) as ``transformers``
    does. ``seen`` (B, V) bool marks the tokens the repetition penalty applies to."""
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0 and seen is not None:
        p = config.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    if config.greedy:
        return scores
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k is not None:
        k = min(config.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        # drop the least likely tokens whose cumulative probability is <= 1 - top_p; keep the top one
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - config.top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def choose(scores: Tensor, config: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """The next token per row, (B,) int64, from processed ``scores`` (B, V)."""
    if config.greedy:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class _Picker:
    """Per-row bookkeeping of one generation call: the repetition-penalty mask, the
    finished rows, padding. Pure tensor ops: no host synchronisation."""

    def __init__(self, config: SamplingConfig, tokens: Tensor, vocab_size: int, generator: torch.Generator | None) -> None:
        self.config, self.generator = config, generator
        b, device = tokens.shape[0], tokens.device
        self.seen: Tensor | None = None
        if config.repetition_penalty is not None:
            self.seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device).scatter_(1, tokens, True)
        self.eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device) if config.eos_ids else None
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax / cumulative sums in float32, as transformers does
        nxt = choose(process_logits(logits, self.seen, self.config), self.config, self.generator)
        if self.eos is not None:
            nxt = torch.where(self.finished, torch.full_like(nxt, self.config.pad_id or 0), nxt)
            self.finished = self.finished | torch.isin(nxt, self.eos)
        if self.seen is not None:
            self.seen = self.seen.scatter(1, nxt[:, None], True)
        return nxt


# ------------------------------------------------------------------ the mixin
class GenerationMixin:
    """``generate`` and ``stream`` for :class:`memzoo.MemzooLM` (any variant)."""

    # ---------------------------------------------------------------- fast path
    def decode_step(self: "MemzooLM", tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Next-token logits (B, V) after ``tokens`` (B, t), continuing ``state``, with no
        validation: for loops that validated their input and state once (``generate``).
        Only the last position goes through the LM head."""
        y, state = self.backbone.step(self.embed(tokens), state)
        return self.head(self.norm(y[:, -1])), state

    def prefill(
        self: "MemzooLM", tokens: Tensor, state: State | None = None, *, chunk: int | None = None
    ) -> tuple[Tensor, State]:
        """Validate ``tokens`` (B, T) and ``state`` once and run the prompt through:
        the next-token logits (B, V) and the state after the prompt."""
        self.check_tokens(tokens)
        state = self.checked_state(state, tokens.shape[0])
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InputError(f"prefill_chunk must be a positive int or None (one call), got {chunk!r}")
        logits = None
        for part in tokens.split(chunk or tokens.shape[1], dim=1):
            logits, state = self.decode_step(part, state)
        assert logits is not None
        return logits, state

    def checked_state(self: "MemzooLM", state: State | None, batch_size: int) -> State:
        """``state`` validated against this model (or a fresh one for ``None``)."""
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        if state is None:
            return self.init_state(batch_size, device=device, dtype=dtype)
        self.backbone.check_state(state, batch_size=batch_size, device=device, dtype=dtype)
        origin = getattr(state, _ORIGIN, None)
        if origin is not None and origin != self._generation_origin():
            raise StateError(
                f"{self.variant}: this state was handed back by generate() of another model (same config, other "
                "instance); a state only continues the model that made it. Pass state=None to start fresh."
            )
        return state

    def _generation_origin(self) -> str:
        # an id per model instance (copied with the model by deepcopy / pickle, as are its weights)
        return self.__dict__.setdefault("_memzoo_generation_id", uuid.uuid4().hex)

    # --------------------------------------------------------------- validation
    def _check_call(
        self: "MemzooLM", tokens: Tensor, max_new_tokens: int, attention_mask: Tensor | None, generator: torch.Generator | None,
        options: dict[str, Any],
    ) -> SamplingConfig:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        config = sampling_config(**options)
        config.check_vocab(self.vocab_size)
        if attention_mask is not None:
            check_attention_mask(attention_mask, tokens)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != self.embed.weight.device.type:
                raise InputError(f"generator is on {generator.device}, the model on {self.embed.weight.device}")
        return config

    # ---------------------------------------------------------------------- API
    @torch.no_grad()
    def generate(
        self: "MemzooLM",
        tokens: Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        state: State | None = None,
        return_state: bool = False,
        prefill_chunk: int | None = None,
        attention_mask: Tensor | None = None,
        streamer: Callable[[Tensor], Any] | None = None,
    ) -> Tensor | tuple[Tensor, State]:
        """``tokens`` (B, T) followed by up to ``max_new_tokens`` new tokens: (B, T + n).

        ``state``: continue a stream (``tokens`` come after the tokens the state has seen).
        With ``return_state=True`` also returns the state after *every* returned token, so
        the next call continues exactly. Rows that produced an ``eos_token_id`` are padded
        with ``pad_token_id`` (default: the first eos id); generation stops early once
        every row has finished. ``attention_mask`` is accepted only when it masks nothing
        (ragged batches need per-row positions: not supported yet). ``streamer`` is called
        with each new token (B,) as soon as it is chosen (e.g. to print as it decodes).
        """
        options = _options(temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id)
        config = self._check_call(tokens, max_new_tokens, attention_mask, generator, options)
        logits, state = self.prefill(tokens, state, chunk=prefill_chunk)
        pick = _Picker(config, tokens, self.vocab_size, generator)
        new: list[Tensor] = []
        done: list[Tensor] = []  # per step: every row finished after it
        # with eos, look for "all rows finished" every few steps (a host sync) and trim after
        check_every = 1 if return_state else 8
        for i in range(max_new_tokens):
            nxt = pick(logits)
            new.append(nxt)
            if streamer is not None:
                streamer(nxt)
            stop = False
            if pick.eos is not None:
                done.append(pick.finished.all())
                stop = (i + 1) % check_every == 0 and bool(done[-1])
            if return_state or (i + 1 < max_new_tokens and not stop):
                logits, state = self.decode_step(nxt[:, None], state)
            if stop:
                break
        if done:
            all_done = torch.stack(done)
            if bool(all_done.any()):
                new = new[: int(all_done.int().argmax()) + 1]
        out = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens.clone()
        if not return_state:
            return out
        setattr(state, _ORIGIN, self._generation_origin())
        return out, state

    def stream(
        self: "MemzooLM",
        tokens: Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        state: State | None = None,
        prefill_chunk: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield each new token (B,) as soon as it is chosen; same options and tokens as
        :meth:`generate`. Input is validated when called, before the first token."""
        options = _options(temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id)
        config = self._check_call(tokens, max_new_tokens, attention_mask, generator, options)
        self.check_tokens(tokens)
        self.checked_state(state, tokens.shape[0])
        return self._stream(tokens, max_new_tokens, config, generator, state, prefill_chunk)

    def _stream(
        self: "MemzooLM", tokens: Tensor, max_new_tokens: int, config: SamplingConfig, generator: torch.Generator | None,
        state: State | None, prefill_chunk: int | None,
    ) -> Iterator[Tensor]:
        with torch.no_grad():
            logits, state = self.prefill(tokens, state, chunk=prefill_chunk)
        pick = _Picker(config, tokens, self.vocab_size, generator)
        for i in range(max_new_tokens):
            with torch.no_grad():
                nxt = pick(logits)
            yield nxt
            if pick.eos is not None and bool(pick.finished.all()):
                return
            if i + 1 < max_new_tokens:
                with torch.no_grad():
                    logits, state = self.decode_step(nxt[:, None], state)


def _options(temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    if isinstance(eos_token_id, (tuple, range)):
        eos_token_id = list(eos_token_id)
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(temperature, int) and not isinstance(temperature, bool):
        temperature = float(temperature)
    return dict(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def check_attention_mask(mask: Tensor, tokens: Tensor) -> None:
    """Accept an attention mask only if it masks nothing: memzoo has no per-row
    positions yet, so a padded (ragged) batch would be silently wrong."""
    want = tuple(tokens.shape) if isinstance(tokens, Tensor) else None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != want:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise InputError(f"attention_mask must be a tensor of the tokens' shape (B, T) = {want}, got {got}")
    if not bool((mask != 0).all()):
        raise InputError(
            "attention_mask masks some positions: prompts of different lengths (padding) need per-row positions, "
            "which memzoo does not support yet (the variable-length issue). Generate each prompt alone, or give "
            "prompts of equal length with an all-ones mask."
        )


# ------------------------------------------------------------------ the reference
@torch.no_grad()
def generate_reference(
    model: "MemzooLM", tokens: Tensor, max_new_tokens: int, *, generator: torch.Generator | None = None, **options: Any
) -> Tensor:
    """The slow, obviously correct generation: a full forward over the whole growing
    sequence for every new token, no state carried. Same sampling as ``generate``."""
    config = sampling_config(**_options(**{**dict(
        temperature=0.0, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None, pad_token_id=None), **options}))
    seq = tokens
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(seq).logits[:, -1]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        seen = None
        if config.repetition_penalty is not None:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seq, True)
        nxt = choose(process_logits(logits, seen, config), config, generator)
        if config.eos_ids:
            nxt = torch.where(finished, torch.full_like(nxt, config.pad_id or 0), nxt)
            finished = finished | torch.isin(nxt, torch.tensor(config.eos_ids))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if config.eos_ids and bool(finished.all()):
            break
    return seq
