"""``fam``: TransformerFAM, Feedback Attention Memory (Hwang et al. 2024, arXiv 2404.09173).

BSWA (see :mod:`memzoo.variants.bswa`) plus, in every layer, a working memory ``F`` of
``fam_len`` vectors that the layer feeds back to itself. Per layer ``l`` and block τ::

    block queries of τ   -> [ memory blocks τ-m..τ-1 (all) | F_{τ-1} (all) | block τ (causal) ]
    FAM queries (F_{τ-1}) -> [                               F_{τ-1} (all) | block τ (all)    ]

    A   = Attn(Norm1(F_{τ-1}) -> q; keys/values above) + r·F_{τ-1}     r = 0 on the first update
    F_τ = A + FF(Norm2(A))                                            of a fresh learned FAM, else 1

``F_τ`` is layer ``l``'s own FAM input for block τ+1 (same-layer feedback). Every weight is
shared with the token path; the only new parameter is the initial FAM (the prompt,
``F × D``; or with ``init="prefix"`` one ``F × D`` per layer). Positions: ``F_τ`` sits at
the positions of the last ``F`` tokens of block τ, the initial FAM at ``-F … -1``; every
position of a sequence is shifted by its row's random offset (training only).

Two implementations of the same function live here:

* :meth:`FAM.step` (the fast path): BSWA's K/V engine (:mod:`memzoo.variants.kv`) with
  FAM in its extra-rows hook (:meth:`FAM.extra_rows`): per layer, Q/K/V of all tokens at
  once, a sequential scan over the blocks completed in this call that updates ``F``
  (``F`` queries against ``F + L`` keys, and the feed-forward on ``F`` vectors), then one
  :func:`memzoo.ops.attend` call for all block queries with ``F_{τ-1}``'s keys/values as
  the per-block extra rows.
* :meth:`FAM.step_reference`: the paper's Algorithm 2, block by block and layer by layer,
  with queries ``[block tokens ; F]`` and keys ``[memory ; F ; block]`` under an explicit
  boolean mask and a plain softmax (any dtype). Tests hold the two equal.

Shapes: B batch, T tokens in this call, D d_model, H heads, Dh head width, L block_size,
m memory_blocks, F fam_len, nb query blocks touched by the call. Mask polarity: True =
may attend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from memzoo import ops
from memzoo.config import MAX_POSITION, MAX_TOKENS, MAX_WIDTH, NOT_IN_FINGERPRINT, BackboneConfig, VariantConfig
from memzoo.errors import StateError
from memzoo.layers import DecoderLayer
from memzoo.registry import register_variant
from memzoo.state import State
from memzoo.variants.kv import BlockWindowBackbone, KVState


class FAMConfig(VariantConfig):
    memory_blocks: int = Field(3, ge=0, le=MAX_TOKENS, description="m: previous blocks every query sees in full (paper default 3)")
    fam_len: int = Field(64, ge=0, le=MAX_WIDTH, description="F: feedback memory vectors per layer (paper 64); 0 = plain BSWA")
    stop_gradient_memory: bool = Field(
        False, description="detach the memory blocks' keys/values (BSWA ablation M1_SG); the FAM is never detached",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    position_offset_max: int = Field(
        0, ge=0, le=MAX_POSITION, description="Random Position Offset: in training, each sequence's positions shift by U[0, max), zeroed with prob. 1/2 (paper ~63000); 0 = off",
        json_schema_extra=NOT_IN_FINGERPRINT,
    )
    init: Literal["prompt", "prefix"] = Field(
        "prompt", description="initial FAM: a learned prompt passed up through the layers (paper), or a learned FAM per layer (prefix; worse in the paper)"
    )

    conformance_options = (
        {"memory_blocks": 1, "fam_len": 2},
        {"memory_blocks": 0, "fam_len": 3},
        {"memory_blocks": 2, "fam_len": 1, "stop_gradient_memory": True},
        {"memory_blocks": 1, "fam_len": 4, "init": "prefix"},
    )

    def check_shared(self, shared: BackboneConfig) -> None:
        if self.fam_len > shared.block_size:
            raise ValueError(
                f"fam_len ({self.fam_len}) must be <= block_size ({shared.block_size}): "
                "the FAM takes the positions of the last fam_len tokens of a block"
            )


@dataclass
class FAMState(KVState):
    """Everything a sequence needs to continue, per row of the batch.

    * ``k[l]``, ``v[l]``: (B, H, t, Dh) keys (positions applied) and values of the last m
      complete blocks and the current partial block (as in BSWA);
    * ``fam[l]``: (B, F, D) layer ``l``'s current FAM input (pre-norm hidden vectors), i.e.
      ``F_{c-1}`` for the block ``c = pos // L`` that the next token falls in; its positions
      follow from ``pos`` (``c·L - F … c·L - 1``) and ``offset``;
    * ``fam_k[l]``, ``fam_v[l]``: (B, H, F, Dh) the keys (positions applied) and values of
      ``fam[l]``, computed once when the FAM is made, so that decoding token by token
      does not project the FAM again at every token (the paper's ~0.5% inference cost);
    * ``offset``: (B,) int64 Random Position Offset of each row (0 in eval);
    * ``residual``: (B,) weight of ``F`` in the next FAM update's residual: 0 for a fresh
      learned FAM (the paper's first update), 1 once it has been updated.
    """

    fam: list[Tensor]
    fam_k: list[Tensor]
    fam_v: list[Tensor]
    offset: Tensor
    residual: Tensor


@register_variant("fam", config=FAMConfig)
class FAM(BlockWindowBackbone):
    """BSWA's K/V engine (:mod:`memzoo.variants.kv`) with the FAM as its per-block extra
    rows: :meth:`extra_rows` runs the scan that updates ``F``."""

    State = FAMState

    def build(self) -> None:
        fam_len, init = self.fam_len, self.init
        # named like BSWA's so a BSWA state_dict loads into FAM (plus the initial FAM)
        self.layers = self.make_layers()
        # The learned initial FAM, initialised like token embeddings (N(0, 1)). With F = 0
        # there is none (a zero-size parameter would look like one that never gets a gradient).
        prompt = prefix = None
        if fam_len and init == "prompt":
            prompt = nn.Parameter(torch.randn(fam_len, self.d_model))  # (F, D), enters at the embedding level
        elif fam_len:
            prefix = nn.Parameter(torch.randn(self.n_layers, fam_len, self.d_model))  # (n_layers, F, D)
        self.register_parameter("prompt", prompt)
        self.register_parameter("prefix", prefix)

    # ------------------------------------------------------------------ helpers
    def token_positions(self, state: State, n: int, device: torch.device) -> Tensor:
        """(B, n): the next ``n`` positions plus each row's Random Position Offset."""
        assert isinstance(state, FAMState)
        return torch.arange(state.pos, state.pos + n, device=device)[None, :] + state.offset[:, None]

    def fam_positions(self, block: int, offset: Tensor) -> Tensor:
        """Positions (B, F) of the FAM input of ``block`` (= the output of ``block - 1``):
        the last F positions before the block starts, plus each row's offset."""
        start = block * self.block_size - self.fam_len
        return torch.arange(start, start + self.fam_len, device=offset.device)[None, :] + offset[:, None]

    def draw_offsets(self, batch_size: int, device: torch.device) -> Tensor:
        """Random Position Offset (paper B.2.2): (B,) int64, uniform in ``[0, max)`` and
        zeroed with probability 1/2; all zero in eval mode or when switched off. Drawn on
        the CPU from torch's global generator, so ``torch.manual_seed`` fixes it."""
        if not (self.training and self.position_offset_max > 0):
            return torch.zeros(batch_size, dtype=torch.int64, device=device)
        offset = torch.randint(0, self.position_offset_max, (batch_size,), dtype=torch.int64)
        keep = torch.rand(batch_size) >= 0.5
        return (offset * keep).to(device)

    def initial_fam(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """Each layer's initial FAM, (B, F, D) per layer, differentiable in the learned init.

        Prompt init (paper B.1): the prompt enters at the embedding level and goes up
        through the layers with full (non-causal) attention among the prompt vectors at
        positions ``-F … -1``; layer ``l``'s initial FAM is layer ``l``'s input for the
        prompt. RoPE is relative, so the row's offset cannot change this and it is
        computed once for the batch.
        """
        if self.fam_len == 0:
            empty = torch.zeros(batch_size, 0, self.d_model, device=device, dtype=dtype)
            return [empty] * self.n_layers
        if self.prefix is not None:
            per_layer = list(self.prefix.unbind(0))
        else:
            assert self.prompt is not None
            h = self.prompt[None]  # (1, F, D)
            pos = torch.arange(-self.fam_len, 0, device=h.device)
            per_layer = []
            for i, layer in enumerate(self.layers):
                per_layer.append(h[0])
                if i + 1 < self.n_layers:  # the last layer's output on the prompt is never used
                    q, k, v = layer.project(h, pos)
                    heads = ops.dense(q, k, v, scale=layer.positions.scale, backend=self.backend)
                    h = layer.feed_forward(layer.attend_residual(h, heads))
        # clone: a state must not share storage with a parameter (an optimizer step would change it)
        return [f.to(device=device, dtype=dtype).clone().expand(batch_size, -1, -1) for f in per_layer]

    # --------------------------------------------------------------- the contract
    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        b, n = batch_size, self.n_layers
        fam_kv = [(b, self.n_kv_heads, self.fam_len, self.head_dim)] * n
        return {
            **super().expected_state_shapes(pos, b), "fam": [(b, self.fam_len, self.d_model)] * n,
            "fam_k": fam_kv, "fam_v": fam_kv, "offset": (b,), "residual": (b,),
        }

    def check_state_values(self, state: State) -> None:
        """``residual`` is 0 (a FAM never updated) or 1 per row; ``offset`` is an int64 in
        ``[0, MAX_POSITION]``; ``fam_k``/``fam_v`` are the keys/values of ``fam`` at its
        positions (recomputed here: a hand-edited cache would silently change the outputs)."""
        assert isinstance(state, FAMState)
        where = f"{self.variant}: state field"
        if not bool(((state.residual == 0) | (state.residual == 1)).all()):
            raise StateError(f"{where} 'residual' must be 0 or 1 per row, got {state.residual.tolist()}")
        if state.offset.dtype != torch.int64 or not bool(((state.offset >= 0) & (state.offset <= MAX_POSITION)).all()):
            raise StateError(f"{where} 'offset' must be int64 in [0, {MAX_POSITION}], got {state.offset.dtype} {state.offset.tolist()}")
        with torch.no_grad():
            keys, values = self.fam_kv(list(state.fam), state.pos // self.block_size, state.offset)
        # a state cast with state.to(dtype) rounds fam and its keys/values apart: up to about
        # one unit of the dtype's precision (measured 0.86 eps for bfloat16 and float16)
        tolerance = max(1e-4, 8 * torch.finfo(state.fam_k[0].dtype).eps) if state.fam_k else 1e-4
        for name, made, stored in (("fam_k", keys, state.fam_k), ("fam_v", values, state.fam_v)):
            for i, (a, b) in enumerate(zip(made, stored)):
                scale = float(a.abs().max()) if a.numel() else 0.0
                if a.shape != b.shape or (a.numel() and float((a - b).abs().max()) > tolerance * (1.0 + scale)):
                    raise StateError(
                        f"{where} '{name}[{i}]' does not match the keys/values this model makes of 'fam[{i}]': "
                        "the state was edited or damaged, or made by a model with other weights"
                    )

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> FAMState:
        residual = torch.zeros(batch_size, device=device, dtype=dtype)
        return self.new_sequence(self.initial_fam(batch_size, device, dtype), residual, self.draw_offsets(batch_size, device))

    def new_sequence(self, fam: list[Tensor], residual: Tensor, offset: Tensor) -> FAMState:
        """A state at position 0 (no K/V yet) whose FAM inputs are ``fam`` (B, F, D) per layer."""
        b, device, dtype = residual.shape[0], residual.device, residual.dtype
        empty = torch.zeros(b, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        fam_k, fam_v = self.fam_kv(fam, 0, offset)
        return FAMState(
            pos=0, fingerprint=self.fingerprint, k=[empty] * self.n_layers, v=[empty] * self.n_layers,
            fam=fam, fam_k=fam_k, fam_v=fam_v, offset=offset, residual=residual,
        )

    def fam_kv(self, fam: list[Tensor], block: int, offset: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer, the keys and values (B, H, F, Dh) of the FAM input ``fam[l]`` of ``block``."""
        pos = self.fam_positions(block, offset)
        keys, values = [], []
        for layer, f in zip(self.layers, fam):
            _, k, v = layer.project_raw(f)
            keys.append(layer.positions.key(k, pos))
            values.append(v)
        return keys, values

    def replace_fam(self, state: FAMState, fam: list[Tensor]) -> FAMState:
        """``state`` with other FAM inputs (B, F, D) per layer, their keys/values recomputed."""
        fam_k, fam_v = self.fam_kv(fam, state.pos // self.block_size, state.offset)
        return dataclasses.replace(state, fam=fam, fam_k=fam_k, fam_v=fam_v)

    def carry_state(self, state: State) -> FAMState:
        """Random State Passing (paper B.2.3): the state a *new* sequence starts from,
        keeping ``state``'s FAM (detached) and nothing else: position 0, no K/V, new
        offsets. The residual weight is kept (1 once the FAM was updated; a FAM never
        updated is still the prompt's and keeps its zero first-update residual). To reset
        some rows to the learned FAM: ``carried.where(keep, backbone.init_state(B))``."""
        if not isinstance(state, FAMState) or state.fingerprint != self.fingerprint:
            raise StateError(f"{self.variant}: carry_state needs a FAMState made by this backbone's config")
        fam = [f.detach() for f in state.fam]
        return self.new_sequence(fam, state.residual.detach(), self.draw_offsets(state.batch_size, state.device))

    def compress(self, layer: DecoderLayer, fam: Tensor, residual: Tensor | None, heads: Tensor) -> Tensor:
        """FAM update from the FAM queries' attention output ``heads`` (B, H, F, Dh):
        ``A = r·F + Out(heads)``, ``F_new = A + FF(Norm2(A))``. (B, F, D). ``residual``
        (B,) is ``r`` per row; ``None`` means 1."""
        kept = fam if residual is None else residual[:, None, None] * fam
        return layer.feed_forward(layer.attend_residual(kept, heads))

    # ------------------------------------------------- the engine's extra-rows hook
    def extra_rows(
        self, i: int, layer: DecoderLayer, state: State, keys: Tensor, values: Tensor, start: int, end: int
    ) -> tuple[dict[str, Tensor], tuple[Tensor, Tensor, Tensor]]:
        """The scan of layer ``i``: ``F_{τ-1}``'s keys/values for each query block of the
        call (the extra rows, (B, H, nb, F, Dh)), updating ``F`` at every block that
        completes in this call. Keeps ``(F, its keys, its values)`` for the next state.

        The scan is a chain of small sequential ops (at the leaderboard size one update is
        a few dozen ops on B·F rows), so it is written to keep their count down; what it
        computes is :meth:`compress` and :meth:`DecoderLayer.project` on ``F``, as in
        :meth:`step_reference`:

        * ``F`` is carried as (B·F, D) rows, so every projection is a plain 2-D matmul
          (a 3-D ``nn.Linear`` input adds a view before and after the matmul, forward and
          backward); the projections are still called as modules;
        * the positions of every update are made at once, and so are their rotations
          (:meth:`~memzoo.layers.positions.PositionScheme.positions_at`: RoPE's angles in one
          computation, not one per update); an update rotates the new ``F``'s queries and
          keys with one ``query_key_at`` call, the queries only when a later update uses them;
        * ``F`` from the state gets its queries projected alone (its keys/values came with it).
        """
        assert isinstance(state, FAMState)
        fam, fk, fv = state.fam[i], state.fam_k[i], state.fam_v[i]  # F (B, F, D) and its keys/values (B, Hkv, F, Dh)
        if not self.fam_len:
            return {}, (fam, fk, fv)
        size = self.block_size
        first_block = start // size
        n_blocks = (end - 1) // size - first_block + 1  # query blocks touched: nb
        n_done = end // size - first_block  # blocks completed here: one FAM update each
        k_start = end - keys.shape[2]
        fam_k, fam_v = [], []
        if n_done:
            b, f, d = fam.shape
            attn, positions, dh = layer.self_attn, layer.positions, layer.head_dim

            def heads_of(rows: Tensor) -> Tensor:  # (B·F, n·Dh) -> (B, n, F, Dh)
                return rows.reshape(b, f, -1, dh).transpose(1, 2)

            # the keys/values of the blocks completed here, cut once: slicing the whole
            # sequence in every update would make backward build a full-size gradient per block
            lo = first_block * size - k_start  # >= 0: the cache holds the partial block from its start
            block_k = keys[:, :, lo : lo + n_done * size].unflatten(2, (n_done, size)).unbind(2)  # (B, Hkv, L, Dh) each
            block_v = values[:, :, lo : lo + n_done * size].unflatten(2, (n_done, size)).unbind(2)
            # F's positions at blocks first_block + j, j = 0 … n_done: (B, n_done + 1, F),
            # made ready for the rotations at once (RoPE: one computation of the angles)
            offsets = torch.arange(0, (n_done + 1) * size, size, device=fam.device)
            pos = self.fam_positions(first_block, state.offset)[:, None, :] + offsets[None, :, None]
            at = positions.positions_at(pos, keys)
            r: Tensor | None = state.residual  # None: 1 (after the first update)
            rows = fam.reshape(b * f, d)  # F as (B·F, D)
            fq = positions.query_at(heads_of(attn.q_proj(layer.input_layernorm(rows))), at[0])
            for j in range(n_done):
                fam_k.append(fk)
                fam_v.append(fv)
                heads = ops.dense(  # F's queries against [F ; block]: (B, H, F, Dh)
                    fq,
                    torch.cat([fk, block_k[j]], dim=2),  # (B, Hkv, F + L, Dh)
                    torch.cat([fv, block_v[j]], dim=2),
                    scale=positions.scale,
                    backend=self.backend,
                )
                # compress(): A = r·F + Out(heads), F_new = A + FF(Norm2(A)), on rows
                kept = rows if r is None else (r[:, None, None] * fam).reshape(b * f, d)
                rows, r = layer.feed_forward(kept + attn.o_proj(heads.transpose(1, 2).reshape(b * f, -1))), None
                # project(): Norm1, then Q/K/V at F_new's positions (queries only if used)
                normed = layer.input_layernorm(rows)
                fv = heads_of(attn.v_proj(normed))
                if j + 1 < n_done:
                    fq, fk = positions.query_key_at(heads_of(attn.q_proj(normed)), heads_of(attn.k_proj(normed)), at[j + 1])
                else:
                    fk = positions.key_at(heads_of(attn.k_proj(normed)), at[j + 1])
            fam = rows.reshape(b, f, d)
        if n_blocks > n_done:  # the call ends in a partial block: it sees the last F
            fam_k.append(fk)
            fam_v.append(fv)
        extra = dict(extra_k=torch.stack(fam_k, dim=2), extra_v=torch.stack(fam_v, dim=2))  # (B, H, nb, F, Dh)
        return extra, (fam, fk, fv)

    def next_state(self, state: State, end: int, k: list[Tensor], v: list[Tensor], kept: list[Any]) -> FAMState:
        assert isinstance(state, FAMState)
        completed = end // self.block_size > state.pos // self.block_size  # did this call update the FAM?
        fam, fam_k, fam_v = (list(column) for column in zip(*kept))
        return FAMState(
            pos=end, fingerprint=self.fingerprint, k=k, v=v, fam=fam, fam_k=fam_k, fam_v=fam_v, offset=state.offset,
            residual=torch.ones_like(state.residual) if completed else state.residual,
        )

    # ------------------------------------------------------------ the reference
    def step_reference(self, x: Tensor, state: FAMState) -> tuple[Tensor, FAMState]:
        """The paper's Algorithm 2, slow and plain (:func:`memzoo.variants.naive.fam_reference`)."""
        from memzoo.variants.naive import fam_reference

        return fam_reference(self, x, state)

    def init_from_embeddings(self, embed: Tensor, generator: torch.Generator) -> list[str]:
        """A pretrained model's initial FAM: ``fam_len`` distinct real tokens' embeddings
        (see :meth:`Backbone.sample_token_embeddings`). With ``init="prompt"`` they are the
        prompt; with ``init="prefix"`` each layer's prefix is that layer's input for the
        same prompt (what the prompt would give it), so both start from the same FAM."""
        if self.fam_len == 0:
            return []
        rows = self.sample_token_embeddings(embed, self.fam_len, generator).to(self.param_dtype)
        with torch.no_grad():
            if self.prompt is not None:
                self.prompt.copy_(rows)
                return ["prompt"]
            assert self.prefix is not None
            h, pos = rows[None], torch.arange(-self.fam_len, 0, device=rows.device)
            for i, layer in enumerate(self.layers):
                self.prefix[i].copy_(h[0])
                q, k, v = layer.project(h, pos)
                heads = ops.dense(q, k, v, scale=layer.positions.scale, backend=self.backend)
                h = layer.feed_forward(layer.attend_residual(h, heads))
        return ["prefix"]
