"""The variant contract: a backbone maps hidden states and a state to hidden states
and a new state::

    y, new_state = backbone(x, state)      # x, y: (B, T, D); state: None or this variant's State

``T`` is any length >= 1. Running a sequence in one call or in consecutive chunks,
each with the state the previous chunk returned, gives the same outputs and final
state (the *state equivalence property*, checked for every registered variant by
:mod:`memzoo.testing`).

Subclasses implement :meth:`Backbone.empty_state` and :meth:`Backbone.step`; the base
class validates inputs and states so every variant refuses bad input the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from memzoo.errors import InputError, StateError
from memzoo.layers import DecoderLayer, PositionScheme, make_positions
from memzoo.state import State, describe_mismatch, fingerprint_of

if TYPE_CHECKING:
    from memzoo.ragged import RaggedState


class BackboneOutput(NamedTuple):
    y: Tensor
    state: State


class Backbone(nn.Module):
    """Base class of every variant. Register subclasses with ``@memzoo.register_variant``.

    The constructor is the same for every variant and takes keyword arguments only: the
    shared fields of :class:`memzoo.BackboneConfig` and the variant's own config fields.
    They are validated once, by those configs (unknown names and ill-typed values are
    refused with the valid ones), and become attributes (``self.d_model``,
    ``self.memory_blocks``, ...; ``None`` defaults resolved: ``n_kv_heads``, ``head_dim``,
    ``d_ff``). The validated config is ``self.config``; the state fingerprint is derived
    from it. A variant builds its layers and parameters in :meth:`build`, which the
    constructor calls last.
    """

    variant: ClassVar[str] = ""
    State: ClassVar[type[State]] = State
    #: bumped when what a variant's state tensors hold changes (part of the fingerprint
    #: when not 1), so a state saved in an older layout is refused instead of misread
    state_format: ClassVar[int] = 1

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        from memzoo.config import BackboneConfig

        if not self.variant:
            raise TypeError(f"{type(self).__name__} is not registered: decorate it with @memzoo.register_variant")
        config = BackboneConfig(variant=self.variant, **fields)
        self.config = config
        for name in BackboneConfig.model_fields:
            if name not in ("variant", "options"):
                setattr(self, name, getattr(config, name))
        self.n_kv_heads, self.head_dim, self.d_ff = config.resolved_kv_heads, config.resolved_head_dim, config.resolved_d_ff
        for name, value in config.options.items():
            setattr(self, name, value)
        #: the fields that decide what a state means (derived from the config)
        self.hparams: dict[str, Any] = config.fingerprint_fields()
        if self.state_format != 1:  # a state of another layout is refused, naming this field
            self.hparams["state_format"] = self.state_format
        self._fingerprint = fingerprint_of(self.variant, self.hparams)
        self.build()
        # the dtypes of a state's fields, read now (no hooks yet, not under torch.compile);
        # a model that cannot make a state here (built on the meta device) reads them on first use
        try:
            self._state_field_kinds()
        except Exception:  # noqa: BLE001 - only a precomputation: the first state check computes it again
            self.__dict__.pop("_memzoo_state_field_kinds", None)

    def build(self) -> None:
        """Make the layers and parameters (the fields are attributes by now)."""
        self.layers = self.make_layers()

    # ------------------------------------------------------------ building blocks
    def make_positions(self) -> PositionScheme:
        return make_positions("rope", self.head_dim, self.rope_base, self.rope_scaling)

    def make_layer(self) -> DecoderLayer:
        """One decoder layer with the shared fields (the component builder's arguments)."""
        return DecoderLayer(
            self.d_model, self.n_heads, self.d_ff, self.make_positions(), n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim, qkv_bias=self.qkv_bias, out_bias=self.out_bias, mlp=self.mlp,
            mlp_bias=self.mlp_bias, norm_eps=self.norm_eps,
        )

    def make_layers(self) -> nn.ModuleList:
        return nn.ModuleList(self.make_layer() for _ in range(self.n_layers))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def param_device(self) -> torch.device:
        return next(self.parameters()).device

    # --------------------------------------------------------------- the contract
    def init_state(
        self, batch_size: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """The state before the first token (``forward(x, None)`` starts from it)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise InputError(f"init_state: dtype must be a floating torch.dtype or None (the parameters'), got {dtype!r}")
        device = torch.device(device) if device is not None else self.param_device
        return self.empty_state(batch_size, device, dtype or self.param_dtype)

    def forward(
        self, x: Tensor, state: "State | RaggedState | None" = None, *, attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None, return_state: bool = True,
    ) -> BackboneOutput:
        """``x`` (B, T, D) continuing ``state`` -> (outputs, new state).

        ``attention_mask`` (B, T; 1 = real token, 0 = padding) and ``document_ids`` (B, T;
        a new id starts a new document from the fresh state) make a ragged call: each row
        gets what it gets alone, outputs at padding are 0, and rows may end at different
        positions (a :class:`~memzoo.ragged.RaggedState`). See :mod:`memzoo.ragged`.
        ``return_state=False``: the new state is None (a padded batch from one position
        then runs as one call)."""
        return self._dispatch(x, state, attention_mask, document_ids, self.step, return_state)

    def forward_reference(
        self, x: Tensor, state: "State | RaggedState | None" = None, *, attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> BackboneOutput:
        """:meth:`forward` through the variant's slow reference ``step_reference`` (for
        variants that keep one as a method; validation and a fresh state included)."""
        reference = getattr(self, "step_reference", None)
        if reference is None:
            raise NotImplementedError(f"{self.variant} has no step_reference method")
        return self._dispatch(x, state, attention_mask, document_ids, reference)

    def _dispatch(
        self, x: Tensor, state: Any, attention_mask: Tensor | None, document_ids: Tensor | None, step: Any,
        return_state: bool = True,
    ) -> BackboneOutput:
        from memzoo.ragged import RaggedState, forward as ragged_forward

        if not isinstance(return_state, bool):
            raise InputError(f"return_state must be a bool, got {return_state!r}")
        if attention_mask is None and document_ids is None and not isinstance(state, RaggedState):
            y, new_state = step(x, self._checked(x, state))
            return BackboneOutput(y, new_state if return_state else None)  # type: ignore[arg-type]
        self.check_input(x)
        if state is not None:
            self.check_state(state, batch_size=x.shape[0], device=x.device, dtype=x.dtype)
        y, new_state = ragged_forward(self, x, state, attention_mask, document_ids, step=step, return_state=return_state)
        return BackboneOutput(y, new_state)  # type: ignore[arg-type]

    def _checked(self, x: Tensor, state: State | None) -> State:
        """``state`` validated against the input ``x``, or a fresh one."""
        self.check_input(x)
        if state is None:
            return self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        self.check_state(state, batch_size=x.shape[0], device=x.device, dtype=x.dtype)
        return state

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        raise NotImplementedError

    def carry_state(self, state: State) -> State:
        """The state to start an unrelated *next* sequence from (Random State Passing,
        TransformerFAM §B.2.3, generalised). Default: the state itself, detached, i.e. the
        next sequence reads as a continuation. Variants whose memory is separable from
        their positional cache (FAM) override this to keep the memory only."""
        return state.detach()

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Process ``x`` (B, T, D) continuing from a validated ``state``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- validation
    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"{self.variant}: x must be a torch.Tensor of shape (B, T, {self.d_model}), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise InputError(f"{self.variant}: x must have shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise InputError(f"{self.variant}: x needs B >= 1 and T >= 1, got shape {tuple(x.shape)}")
        if x.dtype != self.param_dtype:
            raise InputError(f"{self.variant}: x has dtype {x.dtype} but the parameters are {self.param_dtype}; cast one of them")
        if x.device != self.param_device:
            raise InputError(f"{self.variant}: x is on {x.device} but the parameters are on {self.param_device}")

    def check_state(self, state: State, *, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        from memzoo.ragged import RaggedState

        if isinstance(state, RaggedState):
            if state.batch_size != batch_size:
                raise StateError(f"{self.variant}: state has batch size {state.batch_size}, input has {batch_size}")
            for rows, part in state.groups:
                self.check_state(part, batch_size=len(rows), device=device, dtype=dtype)
            return
        if not isinstance(state, State):
            raise StateError(f"{self.variant}: state must be a memzoo State or None, got {type(state).__name__}")
        if not isinstance(state, self.State):
            raise StateError(
                f"{self.variant}: got a {type(state).__name__} from variant {state.variant!r}; "
                f"this backbone takes {self.State.__name__} (or None to start fresh)"
            )
        if state.fingerprint != self.fingerprint:
            raise StateError(
                f"{self.variant}: state was built for another config ({describe_mismatch(self.fingerprint, state.fingerprint)})"
            )
        if state.batch_size != batch_size:
            raise StateError(f"{self.variant}: state has batch size {state.batch_size}, input has {batch_size}")
        if state.device != device:
            raise StateError(f"{self.variant}: state is on {state.device}, input is on {device}; use state.to(device)")
        if state.dtype is not None and state.dtype != dtype:
            if len({t.dtype for t in state.tensors() if t.is_floating_point()}) > 1:
                self._check_state_structure(state, batch_size, device, dtype)  # names the field in another dtype
            raise StateError(f"{self.variant}: state has dtype {state.dtype}, input has {dtype}; use state.to(dtype)")
        self._check_state_structure(state, batch_size, device, dtype)

    def check_state_values(self, state: State) -> None:
        """Refuse (``StateError`` naming the field) a state whose values this variant could
        never have made: ranges of flags and offsets, caches inconsistent with what they
        cache. Run on states loaded from disk (:func:`memzoo.load_state` with ``model=``),
        not on every call. Default: nothing beyond the shapes."""

    def carry(self, state: "State | RaggedState") -> "State | RaggedState":
        """:meth:`carry_state` for a plain or a ragged state (applied per group of rows)."""
        from memzoo.ragged import RaggedState

        if isinstance(state, RaggedState):
            return state.map_groups(self.carry_state)
        return self.carry_state(state)

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        """The shape of every tensor field of a valid state at position ``pos``: a tuple,
        or a list of tuples (one per layer). Variants override it so a damaged or
        hand-edited state is refused instead of silently running a smaller model."""
        return {}

    def _state_field_kinds(self) -> dict[str, torch.dtype | None] | None:
        """Per state field, the dtype of its tensors as this variant makes them: None for a
        floating field (the state's one dtype, whichever it is), else that dtype (``fam``'s
        int64 offsets). Read once from a fresh state (no declaration needed), when the
        backbone is built; None while torch.compile traces a model that could not make a
        state then (built on the meta device): the checks then hold only floating tensors
        to the call's dtype."""
        kinds = self.__dict__.get("_memzoo_state_field_kinds")
        if kinds is not None:
            return kinds
        if torch.compiler.is_compiling():
            return None
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a fresh state may draw (fam's offsets): not from the caller's stream
            fresh = self.empty_state(1, self.param_device, self.param_dtype)
        kinds = self.__dict__["_memzoo_state_field_kinds"] = _field_kinds(fresh)
        return kinds

    def _check_state_structure(self, state: State, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        where = f"{self.variant}: malformed state"
        if isinstance(state.pos, bool) or not isinstance(state.pos, int) or state.pos < 0:
            raise StateError(f"{where}: pos must be an int >= 0, got {state.pos!r}")
        fields = state.tensor_fields()
        kinds = self._state_field_kinds()  # None only while torch.compile traces before they were read
        for name, value in fields.items():
            many = isinstance(value, (list, tuple))
            for i, t in enumerate(value if many else [value]):
                label = f"{name}[{i}]" if many else name
                if not isinstance(t, Tensor):
                    raise StateError(f"{where}: {label} must be a tensor, got {type(t).__name__}")
                if t.device != device:
                    raise StateError(f"{where}: tensors on several devices ({t.device} and {device})")
                if kinds is None or name not in kinds:  # not known (a first call traced by torch.compile): floats only
                    if t.is_floating_point() and t.dtype != dtype:
                        raise StateError(f"{where}: {label} has dtype {t.dtype}, expected {dtype} (the state's floating dtype)")
                    continue
                want = dtype if kinds[name] is None else kinds[name]
                if t.dtype != want:
                    kind = "the state's floating dtype; state.to(dtype) casts" if kinds[name] is None else "as this variant makes it"
                    raise StateError(f"{where}: {label} has dtype {t.dtype}, expected {want} ({kind})")
        for name, shape in self.expected_state_shapes(state.pos, batch_size).items():
            value = fields[name]
            if isinstance(shape, list):
                if not isinstance(value, (list, tuple)) or len(value) != len(shape):
                    got = len(value) if isinstance(value, (list, tuple)) else "a single tensor"
                    raise StateError(f"{where}: field {name!r} has {got} entries, expected {len(shape)} (one per layer)")
                pairs = [(f"{name}[{i}]", t, s) for i, (t, s) in enumerate(zip(value, shape))]
            elif isinstance(value, (list, tuple)):
                raise StateError(f"{where}: field {name!r} has {len(value)} entries, expected a single tensor")
            else:
                pairs = [(name, value, shape)]
            for label, t, s in pairs:
                if tuple(t.shape) != tuple(s):
                    raise StateError(
                        f"{where}: {label} has shape {tuple(t.shape)}, expected {tuple(s)} for a state at position {state.pos}"
                    )

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        """Whether the call of ``n_tokens`` from position ``start`` is a decode step that
        reads the state's ring buffers in slot order (keys at explicit positions, see
        :mod:`memzoo.variants.ring`) rather than in position order. Default: never."""
        return False

    def expect_streams(self, n: int) -> None:
        """A hint that ``n`` states take turns in this backbone's no-grad calls (a padded
        batch decodes one state per group of rows at one position): a variant that caches
        per-state tensors on the backbone (``xl``) keeps at least ``n`` states' worth, so
        the groups do not push each other's out at every step. Default: nothing to do."""

    def token_positions(self, state: State, n: int, device: torch.device) -> Tensor:
        """Absolute positions of the next ``n`` tokens: (n,) int64."""
        return torch.arange(state.pos, state.pos + n, device=device)

    # ------------------------------------------------------------ pretrained models
    def init_from_embeddings(self, embed: Tensor, generator: torch.Generator) -> list[str]:
        """Initialise the parameters this variant adds to a pretrained decoder from the
        model's own token embeddings ``embed`` (V, D), and return their names (relative
        to the backbone). ``memzoo.from_pretrained`` calls it for a checkpoint that lacks
        them and refuses a parameter that is neither in the checkpoint nor named here.
        Default: the variant adds nothing."""
        return []

    @staticmethod
    def sample_token_embeddings(embed: Tensor, n: int, generator: torch.Generator) -> Tensor:
        """``n`` rows of ``embed`` (V, D): real tokens' embeddings, drawn uniformly without
        replacement (with replacement when ``n > V``) -> (n, D), a copy.

        The "sampled vocab" initialisation of prompt tuning (Lester et al. 2021, "The Power
        of Scale for Parameter-Efficient Prompt Tuning"), which did better than random
        vectors there: inputs the pretrained model has seen, at the scale its first layer
        expects."""
        v = embed.shape[0]
        if n <= v:
            rows = torch.randperm(v, generator=generator)[:n]
        else:
            rows = torch.randint(0, v, (n,), generator=generator)
        return embed.detach()[rows.to(embed.device)].clone()


def module_tensors(module: nn.Module, buffers: bool = False) -> list[Tensor]:
    """``list(module.parameters())`` (and its buffers with ``buffers=True``) without the
    bookkeeping of ``named_parameters`` (deduplication, names): a decode step that keys a
    cache on the weights walks a few modules per token."""
    out = [p for p in module._parameters.values() if p is not None]
    if buffers:
        out += [b for b in module._buffers.values() if b is not None]
    for child in module._modules.values():
        if child is not None:
            out += module_tensors(child, buffers)
    return out


#: attributes of a wrapped module that change what it computes without changing any of its
#: tensors: peft's adapter switches (``disable_adapter()``, ``set_adapter``), merges and scales
_MODE_ATTRIBUTES = ("_disable_adapters", "_active_adapter", "merged_adapters", "scaling")


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_frozen(v) for v in value)
    return value


def module_mode(module: nn.Module) -> tuple:
    """What decides a module's function besides its tensors (:func:`module_tensors`): per
    submodule that has them, peft's adapter attributes (enabled, active, merged, scale)
    and its forward (pre-)hooks. A cache keyed on the weights keys on this too, so that
    switching a LoRA adapter off and on is noticed like a weight update."""
    out: list[tuple] = []
    attrs = module.__dict__
    marks = tuple((a, _frozen(attrs[a])) for a in _MODE_ATTRIBUTES if a in attrs)
    if marks or module._forward_hooks or module._forward_pre_hooks:
        out.append((id(module), marks, tuple(module._forward_hooks), tuple(module._forward_pre_hooks)))
    for child in module._modules.values():
        if child is not None:
            out += module_mode(child)
    return tuple(out)


def _field_kinds(state: State) -> dict[str, torch.dtype | None]:
    """Per field of ``state``: None where its tensors are floating, else their dtype (a
    field of an empty list, or of mixed kinds, is left out: nothing to hold a state to)."""
    kinds: dict[str, torch.dtype | None] = {}
    for name, value in state.tensor_fields().items():
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        found = {None if t.is_floating_point() else t.dtype for t in items if isinstance(t, Tensor)}
        if len(found) == 1:
            kinds[name] = found.pop()
    return kinds
