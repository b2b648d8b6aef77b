"""Generation for every variant through its streaming state: ``generate`` and ``stream``.

Prefill runs the prompt through the backbone in one call (or ``prefill_chunk``-token
chunks: the same result, by the state equivalence property), then decoding feeds one
token per call through the state. Inputs and the state are validated once, before the
loop; the loop itself calls :meth:`GenerationMixin.decode_step`, which skips the
per-call checks (no host-device synchronisation per token).

Prompts of different lengths come padded with an ``attention_mask`` (B, T), 1 = real
token, 0 = padding (left padding, the Hugging Face convention for decoder-only models,
or right padding): the prompt is prefilled through the ragged path
(:mod:`memzoo.ragged`), each row's next-token logits are those at its *last real*
token, and decoding goes on from a :class:`~memzoo.ragged.RaggedState` whose rows stand
at their own positions. Each row gets exactly what it gets alone.

Shape notation: B batch, T prompt tokens, n new tokens, V vocabulary, D model width.

Sampling follows the conventions of Hugging Face ``transformers`` (so a wrapped model
gives the same tokens as ``transformers``' ``generate``): repetition penalty, then
temperature, top-k, top-p, then ``torch.multinomial`` on the softmax. ``temperature=0``
is greedy (argmax of the penalised logits).

The slow, obviously correct reference, :func:`generate_reference`, recomputes a full
forward over the growing sequence for every token; the tests hold ``generate`` equal to
it for every registered variant.
"""

from __future__ import annotations

import functools
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from memzoo.errors import InputError, StateError, one_line
from memzoo.ragged import RaggedState, check_mask
from memzoo.state import ORIGIN, State
from memzoo.variants import ring

AnyState = State | RaggedState

if TYPE_CHECKING:
    from memzoo.models.lm import MemzooLM


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
        raise InputError(f"invalid sampling options: {one_line(err)}") from err


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

    def __init__(
        self, config: SamplingConfig, tokens: Tensor, vocab_size: int, generator: torch.Generator | None,
        real: Tensor | None = None,
    ) -> None:
        self.config, self.generator = config, generator
        b, device = tokens.shape[0], tokens.device
        self.seen: Tensor | None = None
        if config.repetition_penalty is not None:
            self.seen = seen_tokens(tokens, vocab_size, real)
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


def seen_tokens(tokens: Tensor, vocab_size: int, real: Tensor | None = None) -> Tensor:
    """(B, V) bool: the ids among each row's real ``tokens`` (B, T); ``real`` (B, T) bool
    marks them (None: all). Padding goes to a spare column that is dropped, so a pad id
    is penalised only where it is also a real token of the row."""
    if real is None:
        return torch.zeros(tokens.shape[0], vocab_size, dtype=torch.bool, device=tokens.device).scatter_(1, tokens, True)
    index = tokens.masked_fill(~real, vocab_size)
    seen = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, index, True)[:, :vocab_size]


@functools.lru_cache(maxsize=256)
def _index(rows: tuple[int, ...], device: torch.device) -> Tensor:
    # made once per set of rows and device: a host-to-device copy per decode step would synchronise
    return torch.tensor(rows, dtype=torch.long, device=device)


def ragged_step(backbone: Any, x: Tensor, state: RaggedState) -> tuple[Tensor, RaggedState]:
    """``x`` (B, t, D), every row's next ``t`` tokens (no padding), continuing a
    :class:`~memzoo.ragged.RaggedState`: one unvalidated ``backbone.step`` per group of
    rows. Every row moves on by ``t``, so the groups (rows at one position) stay as
    they are; the outputs (B, t, D) come back in row order."""
    groups = state.groups
    backbone.expect_streams(len(groups))
    ys, new = [], []
    for rows, part in groups:
        y, part = backbone.step(x.index_select(0, _index(rows, x.device)), part)
        ys.append(y)
        new.append((rows, part))
    order = tuple(r for rows, _ in groups for r in rows)
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    return torch.cat(ys).index_select(0, _index(inverse, x.device)), RaggedState(tuple(new), state.documents)


class _Prompt:
    """A validated prompt: ``tokens`` (B, T) as given, ``ids`` (B, T) with padding set to
    id 0 (the model never reads it), ``real`` (B, T) bool or None when nothing is padded,
    and ``last`` (B,) each row's last real column (on the host)."""

    def __init__(self, tokens: Tensor, attention_mask: Tensor | None) -> None:
        self.tokens, self.ids, self.real, self.last = tokens, tokens, None, None
        if attention_mask is None:
            return
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise InputError(
                f"tokens must be a torch.LongTensor of shape (B, T), got "
                f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}"
            )
        real = check_mask(attention_mask, tuple(tokens.shape), tokens.device)
        host = real.cpu()  # one synchronisation per call, here
        counts = host.sum(dim=1)
        if bool((counts == 0).any()):
            r = int((counts == 0).int().argmax())
            raise InputError(
                f"attention_mask row {r} has no real token: a row needs at least one (its next token follows its last "
                "real one)"
            )
        if bool(host.all()):
            return  # nothing padded: the plain path
        self.real, self.host = real, host
        self.last = host.int().argmax(dim=1) + counts - 1
        self.ids = tokens.masked_fill(~real, 0)


# ------------------------------------------------------------------ the mixin
class GenerationMixin:
    """``generate`` and ``stream`` for :class:`memzoo.MemzooLM` (any variant)."""

    # ---------------------------------------------------------------- fast path
    def decode_step(self: "MemzooLM", tokens: Tensor, state: AnyState) -> tuple[Tensor, AnyState]:
        """Next-token logits (B, V) after ``tokens`` (B, t), continuing ``state``, with no
        validation: for loops that validated their input and state once (``generate``).
        Only the last position goes through the LM head. A :class:`~memzoo.ragged.RaggedState`
        (rows at different positions, after a padded prompt) steps each group of rows."""
        x = self.embed(tokens)
        if isinstance(state, RaggedState):
            y, state = ragged_step(self.backbone, x, state)
        else:
            y, state = self.backbone.step(x, state)
        return self.head(self.norm(y[:, -1])), state

    def prefill(
        self: "MemzooLM", tokens: Tensor, state: AnyState | None = None, *, chunk: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, AnyState]:
        """Validate ``tokens`` (B, T) and ``state`` once and run the prompt through:
        the next-token logits (B, V) and the state after the prompt. With a padding
        ``attention_mask`` (B, T) each row's logits are those at its last real token and
        the state is ragged (rows at their own positions)."""
        return self._prefill(_Prompt(tokens, attention_mask), state, chunk)

    def _prefill(self: "MemzooLM", prompt: _Prompt, state: AnyState | None, chunk: int | None) -> tuple[Tensor, AnyState]:
        # the state passed in is the caller's: never written in place, even inside a
        # caller's ring.written_in_place() block
        with ring.written_in_place(False):
            return self._prefill_copied(prompt, state, chunk)

    def _prefill_copied(self: "MemzooLM", prompt: _Prompt, state: AnyState | None, chunk: int | None) -> tuple[Tensor, AnyState]:
        tokens = prompt.ids
        self.check_tokens(tokens)
        state = self.checked_state(state, tokens.shape[0])
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise InputError(f"prefill_chunk must be a positive int or None (one call), got {chunk!r}")
        size = chunk or tokens.shape[1]
        if prompt.real is None:
            logits = None
            for part in tokens.split(size, dim=1):
                logits, state = self.decode_step(part, state)
            assert logits is not None
            return logits, state
        # padded: the ragged path, chunk by chunk (the mask sliced with it); keep each row's
        # output at its last real token, which may lie in any chunk
        assert prompt.last is not None
        last = prompt.last.tolist()
        hidden = None
        for start in range(0, tokens.shape[1], size):
            end = min(start + size, tokens.shape[1])
            host = prompt.host[:, start:end]
            mask = None if bool(host.all()) else prompt.real[:, start:end]
            y, state = self.backbone(self.embed(tokens[:, start:end]), state, attention_mask=mask)
            if hidden is None:
                hidden = y.new_zeros(y.shape[0], y.shape[-1])
            rows = [i for i, c in enumerate(last) if start <= c < end]
            if rows:
                index = torch.tensor(rows, device=y.device)
                cols = torch.tensor([last[i] - start for i in rows], device=y.device)
                hidden = hidden.index_put((index,), y[index, cols])
        assert hidden is not None and state is not None
        return self.head(self.norm(hidden)), state

    def checked_state(self: "MemzooLM", state: AnyState | None, batch_size: int) -> AnyState:
        """``state`` validated against this model (or a fresh one for ``None``)."""
        device, dtype = self.embed.weight.device, self.embed.weight.dtype
        if state is None:
            return self.init_state(batch_size, device=device, dtype=dtype)
        self.backbone.check_state(state, batch_size=batch_size, device=device, dtype=dtype)
        origin = getattr(state, ORIGIN, None)
        if origin is not None and origin != self._generation_origin():
            raise StateError(
                f"{self.variant}: this state was handed back by generate() of another model (same config, other "
                "instance); a state only continues the model that made it. Pass state=None to start fresh."
            )
        return state

    def _generation_origin(self) -> str:
        # an id per model instance (copied with the model by deepcopy / pickle, as are its weights;
        # made in MemzooLM.__init__, so a copy shares it whenever it was made)
        return self.__dict__.setdefault("_memzoo_generation_id", uuid.uuid4().hex)

    # --------------------------------------------------------------- validation
    def _check_call(
        self: "MemzooLM", tokens: Tensor, max_new_tokens: int, attention_mask: Tensor | None, generator: torch.Generator | None,
        options: dict[str, Any],
    ) -> tuple[SamplingConfig, _Prompt]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        config = sampling_config(**options)
        config.check_vocab(self.vocab_size)
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            if generator.device.type != self.embed.weight.device.type:
                raise InputError(f"generator is on {generator.device}, the model on {self.embed.weight.device}")
        return config, _Prompt(tokens, attention_mask)

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
        state: AnyState | None = None,
        return_state: bool = False,
        prefill_chunk: int | None = None,
        attention_mask: Tensor | None = None,
        streamer: Callable[[Tensor], Any] | None = None,
    ) -> Tensor | tuple[Tensor, AnyState]:
        """``tokens`` (B, T) followed by up to ``max_new_tokens`` new tokens: (B, T + n).

        ``state``: continue a stream (``tokens`` come after the tokens the state has seen).
        With ``return_state=True`` also returns the state after *every* returned token, so
        the next call continues exactly. Rows that produced an ``eos_token_id`` are padded
        with ``pad_token_id`` (default: the first eos id); generation stops early once
        every row has finished. ``streamer`` is called with each new token (B,) as soon as
        it is chosen (e.g. to print as it decodes).

        ``attention_mask`` (B, T), 1 = real token, 0 = padding: prompts of different
        lengths, padded on the left (the Hugging Face convention) or the right. Each row
        gets exactly the tokens it gets alone: its new tokens continue its real tokens, the
        ids at padding are never read (nor penalised by ``repetition_penalty``). The output
        is still ``torch.cat([tokens, new], 1)``, as in transformers, so a right-padded row
        reads ``real tokens, padding, new tokens``. The state handed back is then a
        :class:`~memzoo.ragged.RaggedState` (rows at their own positions); continue it with
        ``state=`` (not by feeding the output back with a mask).
        """
        options = _options(temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id)
        config, prompt = self._check_call(tokens, max_new_tokens, attention_mask, generator, options)
        logits, state = self._prefill(prompt, state, prefill_chunk)
        pick = _Picker(config, prompt.ids, self.vocab_size, generator, prompt.real)
        new: list[Tensor] = []
        done: list[Tensor] = []  # per step: every row finished after it
        # with eos, look for "all rows finished" every few steps (a host sync) and trim after;
        # every step when a state or a streamer must see exactly the tokens returned
        check_every = 1 if return_state or streamer is not None else 8
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
                with ring.written_in_place():  # the state is this loop's own (made by the prompt)
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
        setattr(state, ORIGIN, self._generation_origin())
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
        state: AnyState | None = None,
        prefill_chunk: int | None = None,
        attention_mask: Tensor | None = None,
    ) -> Iterator[Tensor]:
        """Yield each new token (B,) as soon as it is chosen; same options and tokens as
        :meth:`generate`. Input is validated when called, before the first token."""
        options = _options(temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id)
        config, prompt = self._check_call(tokens, max_new_tokens, attention_mask, generator, options)
        self.check_tokens(prompt.ids)
        self.checked_state(state, prompt.ids.shape[0])
        return self._stream(prompt, max_new_tokens, config, generator, state, prefill_chunk)

    def _stream(
        self: "MemzooLM", prompt: _Prompt, max_new_tokens: int, config: SamplingConfig, generator: torch.Generator | None,
        state: AnyState | None, prefill_chunk: int | None,
    ) -> Iterator[Tensor]:
        with torch.no_grad():
            logits, state = self._prefill(prompt, state, prefill_chunk)
        pick = _Picker(config, prompt.ids, self.vocab_size, generator, prompt.real)
        for i in range(max_new_tokens):
            with torch.no_grad():
                nxt = pick(logits)
            yield nxt
            if pick.eos is not None and bool(pick.finished.all()):
                return
            if i + 1 < max_new_tokens:
                with torch.no_grad(), ring.written_in_place():  # this loop's own state (not across a yield)
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


# ------------------------------------------------------------------ the reference
@torch.no_grad()
def generate_reference(
    model: "MemzooLM", tokens: Tensor, max_new_tokens: int, *, generator: torch.Generator | None = None,
    attention_mask: Tensor | None = None, **options: Any
) -> Tensor:
    """The slow, obviously correct generation: a full forward over the whole growing
    sequence for every new token, no state carried. Same sampling as ``generate``.

    With an ``attention_mask`` (B, T) each row's sequence is its real tokens alone
    (padding cut out) followed by its new tokens, and every row's full forward runs on
    its own (batch 1); the logits are then stacked (B, V) and processed and sampled
    together, so a generator draws in the same order as a batched call. The output is
    ``torch.cat([tokens, new], 1)``, as ``generate`` gives."""
    config = sampling_config(**_options(**{**dict(
        temperature=0.0, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None, pad_token_id=None), **options}))
    real = torch.ones(tokens.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = [tokens[i][real[i]][None] for i in range(tokens.shape[0])]  # each (1, T_i)
    new: list[Tensor] = []
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        if attention_mask is None:
            logits = model(torch.cat(rows)).logits[:, -1]
        else:
            logits = torch.cat([model(row).logits[:, -1] for row in rows])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        seen = None
        if config.repetition_penalty is not None:
            seen = torch.cat([torch.zeros(1, logits.shape[-1], dtype=torch.bool).scatter_(1, row, True) for row in rows])
        nxt = choose(process_logits(logits, seen, config), config, generator)
        if config.eos_ids:
            nxt = torch.where(finished, torch.full_like(nxt, config.pad_id or 0), nxt)
            finished = finished | torch.isin(nxt, torch.tensor(config.eos_ids))
        new.append(nxt)
        rows = [torch.cat([row, nxt[i].view(1, 1)], dim=1) for i, row in enumerate(rows)]
        if config.eos_ids and bool(finished.all()):
            break
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens.clone()
