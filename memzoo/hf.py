"""A thin ``transformers`` wrapper: any memzoo model, any variant, driven by
``transformers``' ``generate``, ``pipeline("text-generation")`` and the tools built on
them (e.g. lm-evaluation-harness's HF model). Needs ``transformers`` (optional).

* :class:`MemzooConfig` (``model_type="memzoo"``): a ``PreTrainedConfig`` holding the
  memzoo :class:`~memzoo.ModelConfig` dump under ``"memzoo"``;
* :class:`MemzooForCausalLM`: a ``PreTrainedModel`` + ``GenerationMixin`` whose
  ``self.model`` is the :class:`~memzoo.MemzooLM` (so its state-dict keys are
  ``model.<MemzooLM key>``, and a folder whose ``model.safetensors`` holds bare MemzooLM
  keys loads too) and whose generation cache is the memzoo state;
* :func:`register` makes ``AutoConfig`` / ``AutoModelForCausalLM`` know them (importing
  this module calls it).

What transformers 5 needs from such a model (``../shared/design/pretrained.md``):
no default ``DynamicCache`` (:meth:`MemzooForCausalLM._supports_default_dynamic_cache`
is False, as for Mamba), the cache passed as ``cache=``, and non-persistent buffers
(RoPE frequencies) recomputed after meta-device loading (:meth:`_init_weights`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("memzoo.hf needs the optional dependency `transformers` (pip install transformers)") from err

from memzoo.config import ModelConfig
from memzoo.errors import InputError
from memzoo.models.builder import build_model
from memzoo.models.lm import MemzooLM
from memzoo.ragged import RaggedState, check_mask
from memzoo.state import State


class MemzooConfig(PreTrainedConfig):
    """``memzoo``: the memzoo ``ModelConfig`` dump; the usual HF size fields mirror it."""

    model_type = "memzoo"

    memzoo: dict | None = None
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    tie_word_embeddings: bool = False
    #: special token ids (``generate`` stops at ``eos_token_id``: an id or a list of them)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.memzoo is not None:
            cfg = ModelConfig.model_validate(self.memzoo)  # refuses unknown or ill-typed fields
            self.memzoo = cfg.model_dump()
            self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.d_model
            self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
            self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_memzoo(cls, config: ModelConfig, **kwargs: Any) -> "MemzooConfig":
        return cls(memzoo=config.model_dump(), **kwargs)

    @property
    def model_config(self) -> ModelConfig:
        if self.memzoo is None:
            raise InputError("this MemzooConfig holds no memzoo model config (its 'memzoo' field is empty)")
        return ModelConfig.model_validate(self.memzoo)


class MemzooForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemzooConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # the cache is a recurrent state: no beam reordering, no assisted decoding

    def __init__(self, config: MemzooConfig) -> None:
        super().__init__(config)
        self.model: MemzooLM = build_model(config.model_config)
        if config.model_config.tie_embeddings:
            self._tied_weights_keys = {"model.head.weight": "model.embed.weight"}
        self.post_init()

    @classmethod
    def from_memzoo(cls, model: MemzooLM, **config_kwargs: Any) -> "MemzooForCausalLM":
        """Wrap an existing :class:`~memzoo.MemzooLM` (shares its weights). The special
        token ids ``from_pretrained`` read with it (``model.token_ids``) go into the config
        and the generation config, so ``generate`` stops at the checkpoint's eos;
        ``config_kwargs`` override them."""
        wrapper = cls(MemzooConfig.from_memzoo(model.config, **{**getattr(model, "token_ids", {}), **config_kwargs}))
        wrapper.model = model
        return wrapper

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the memzoo state, made by forward

    def _init_weights(self, module: torch.nn.Module) -> None:
        """memzoo initialises its own parameters when it builds a model; nothing to do
        (what meta-device loading leaves missing is restored by :meth:`from_pretrained`)."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "MemzooForCausalLM":  # type: ignore[override]
        model = super().from_pretrained(*args, **kwargs)
        model.restore_computed_tensors()
        return model

    def restore_computed_tensors(self) -> None:
        """transformers builds the model on the meta device and loads only saved
        tensors; what memzoo computes at construction (RoPE frequencies: plain tensor
        attributes or non-persistent buffers) stays on meta. Copy those from a fresh model
        of the same config built on the CPU, and drop per-device caches of them."""
        with torch.device("cpu"):
            fresh = build_model(self.config.model_config)
        for name, module in self.model.named_modules():
            source = fresh.get_submodule(name)
            for leaf in module._non_persistent_buffers_set:
                buf, value = getattr(module, leaf), getattr(source, leaf)
                if buf is not None:
                    dtype = buf.dtype if buf.is_floating_point() else value.dtype
                    module.register_buffer(leaf, value.to(device=self.device, dtype=dtype), persistent=False)
            for attr, value in list(vars(module).items()):
                if attr in ("_parameters", "_buffers", "_modules"):
                    continue
                if isinstance(value, Tensor) and value.is_meta:
                    setattr(module, attr, getattr(source, attr))
                elif isinstance(value, dict) and any(isinstance(v, Tensor) for v in value.values()):
                    setattr(module, attr, type(value)(getattr(source, attr)))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    def resize_token_embeddings(  # type: ignore[override]
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> torch.nn.Embedding:
        """transformers' resize (new rows initialised as it does), then memzoo's own
        vocabulary follows: the model's token-id check and the memzoo config that saving
        writes and loading rebuilds from."""
        embeds = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n = embeds.num_embeddings
        self.model.vocab_size = n
        if isinstance(getattr(self.model, "config", None), ModelConfig):  # the LM's own record of its config
            self.model.config = ModelConfig.model_validate({**self.model.config.model_dump(), "vocab_size": n})
        assert self.config.memzoo is not None
        self.config.memzoo = ModelConfig.model_validate({**self.config.memzoo, "vocab_size": n}).model_dump()
        self.config.vocab_size = n
        return embeds

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """transformers' ``generate`` from the prompt; continuing a state through it is
        refused (its cache protocol is a per-token key/value cache that a memzoo state is
        not): continue one with memzoo's own ``self.model.generate(tokens, state=...)``."""
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise InputError(
                    f"generate({name}=...): continuing a memzoo state through transformers' generate is not supported; "
                    "give the whole sequence without a cache, or continue the state with memzoo's own generate: "
                    "wrapper.model.generate(new_tokens, max_new_tokens, state=state) (docs/generation.md)"
                )
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(  # type: ignore[override]
        self,
        input_ids: Tensor,
        cache: State | RaggedState | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if inputs_embeds is not None:
            raise InputError("memzoo models take input_ids, not inputs_embeds")
        first = bool(is_first_iteration) or cache is None
        # first call: the whole prompt (after the state, if one was given); then one new token per call.
        # The state knows where each row stands, so only the new tokens' columns of the growing mask matter.
        ids = input_ids if first else input_ids[:, -1:]
        if attention_mask is not None:
            attention_mask = attention_mask[:, -ids.shape[1] :]
        return {
            "input_ids": ids,
            "cache": cache,
            "attention_mask": attention_mask,
            "logits_to_keep": kwargs.get("logits_to_keep") or 0,
            "use_cache": True,
        }

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: State | RaggedState | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: State | RaggedState | None = None,
        position_ids: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``input_ids`` (B, T) continuing ``cache`` (a memzoo state, or None to start).

        ``attention_mask`` (B, T), 1 = real token, 0 = padding, covers ``input_ids`` only
        (the state knows what came before; in ``generate``,
        :meth:`prepare_inputs_for_generation` passes the growing mask's new columns): padded rows run through memzoo's ragged path, each row on its own real tokens.
        The logits at padding that *follows* a row's real tokens repeat those of its last
        real token, so the last column holds every row's next-token logits whether it was
        padded on the left or the right (``transformers``' ``generate`` reads that
        column); at padding before a row's first real token they are 0.

        ``past_key_values`` is another name of ``cache``. ``position_ids``, where given,
        must be the positions memzoo uses (each row's count of real tokens, after its
        state): memzoo takes positions from the state and the mask. ``num_items_in_batch``
        (transformers' ``Trainer`` with gradient accumulation): the loss is the sum over
        the labelled tokens divided by it. Any other argument that is not None is refused
        (``output_attentions``, ``output_hidden_states``, ``inputs_embeds``, ...)."""
        segments = kwargs.pop("token_type_ids", None)  # a tokenizer's; one segment says nothing (Llama ignores it)
        if isinstance(segments, Tensor) and segments.numel() and bool((segments != segments.flatten()[0]).any()):
            kwargs["token_type_ids"] = segments  # several segments: memzoo has no segment embeddings
        given = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if given:
            raise InputError(
                f"MemzooForCausalLM.forward does not take {', '.join(given)}; it takes input_ids, attention_mask, "
                "cache (or past_key_values), labels, use_cache, logits_to_keep, position_ids (memzoo's own), "
                "num_items_in_batch, return_dict"
            )
        if input_ids is None:
            raise InputError("MemzooForCausalLM.forward needs input_ids (B, T) token ids (inputs_embeds is not taken)")
        if past_key_values is not None:
            if cache is not None:
                raise InputError("give the state once: cache= or past_key_values= (the same argument), not both")
            cache = past_key_values
        real = None
        if attention_mask is not None:
            real = check_mask(attention_mask, tuple(input_ids.shape), input_ids.device)
            if bool(real.all()):
                real = None  # nothing padded: the plain path
        if position_ids is not None:
            _check_positions(position_ids, input_ids, real, cache)
        ids = input_ids if real is None else input_ids.masked_fill(~real, 0)
        self.model.check_tokens(ids)
        y, state = self.model.backbone(self.model.embed(ids), cache, attention_mask=real)
        if real is not None:
            y = _carry_last_real(y, real)
        if logits_to_keep:
            y = y[:, -logits_to_keep:]
        logits = self.model.head(self.model.norm(y))
        loss = None
        if labels is not None:
            pairs = (logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
            if num_items_in_batch is None:
                loss = F.cross_entropy(*pairs, ignore_index=-100)
            else:
                loss = F.cross_entropy(*pairs, ignore_index=-100, reduction="sum") / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=state if use_cache is not False else None)


def _check_positions(position_ids: Tensor, input_ids: Tensor, real: Tensor | None, cache: State | RaggedState | None) -> None:
    """Refuse ``position_ids`` that differ, at a real token, from the positions memzoo
    gives it: the row's position in its state plus its count of real tokens before it."""
    b, t = input_ids.shape
    if (
        not isinstance(position_ids, Tensor) or position_ids.dim() not in (1, 2) or position_ids.shape[-1] != t
        or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, b))
    ):
        got = tuple(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
        raise InputError(f"position_ids must be a tensor (B, T) or (T,) for input_ids of shape {(b, t)}, got {got}")
    if cache is None:
        start = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    elif isinstance(cache, RaggedState):
        start = cache.positions.to(input_ids.device)
    else:
        start = torch.full((b,), cache.pos, dtype=torch.long, device=input_ids.device)
    seen = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real
    expected = start[:, None] + seen.long().cumsum(1) - 1
    given = position_ids.to(input_ids.device).expand(b, t)
    if bool(((given != expected) & seen).any()):
        raise InputError(
            "position_ids differ from the positions memzoo uses (each row's position in its state plus its count of real "
            f"tokens; here {expected.masked_fill(~seen, -1).tolist()}, -1 at padding): memzoo takes positions from "
            "the state and attention_mask; leave position_ids out"
        )


def _carry_last_real(y: Tensor, real: Tensor) -> Tensor:
    """``y`` (B, T, D) with each padded column after a row's real tokens set to the
    row's output at its last real token before it (columns before its first stay 0)."""
    cols = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last = torch.where(real, cols, torch.full_like(cols, -1)).cummax(dim=1).values  # (B, T)
    filled = y.gather(1, last.clamp(min=0)[..., None].expand_as(y))
    return filled.masked_fill((last < 0)[..., None], 0.0)


def register() -> None:
    """Make ``AutoConfig`` and ``AutoModelForCausalLM`` know ``model_type="memzoo"`` (idempotent)."""
    try:
        AutoConfig.register("memzoo", MemzooConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MemzooConfig, MemzooForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["MemzooConfig", "MemzooForCausalLM", "register"]
