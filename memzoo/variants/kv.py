"""A shared engine for variants whose per-layer state is a window of cached keys and
values: ``full`` (keep everything) and ``bswa`` (keep the last m blocks + the partial
block). Subclasses say what a query may see (:meth:`layout`) and how far back the
cache must reach (:meth:`keep_from`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memzoo import ops
from memzoo.ops import BlockLayout
from memzoo.state import State
from memzoo.variants.base import Backbone


@dataclass
class KVState(State):
    """Per layer, keys (positions applied) and values of positions ``[pos - t, pos)``:
    ``k[l]``, ``v[l]``: (B, Hkv, t, Dh)."""

    k: list[Tensor]
    v: list[Tensor]


class KVCacheBackbone(Backbone):
    #: detach memory keys/values (keys before the query's block); a config field where a variant has it
    stop_gradient_memory: bool = False

    def layout(self) -> BlockLayout:
        raise NotImplementedError

    def keep_from(self, next_pos: int) -> int:
        """The first position whose K/V a query at ``next_pos`` or later can still see."""
        raise NotImplementedError

    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        kv = [(batch_size, self.n_kv_heads, pos - max(0, self.keep_from(pos)), self.head_dim)] * self.n_layers
        return {"k": kv, "v": kv}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> KVState:
        empty = torch.zeros(batch_size, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return self.State(pos=0, fingerprint=self.fingerprint, k=[empty] * self.n_layers, v=[empty] * self.n_layers)

    def step(self, x: Tensor, state: KVState) -> tuple[Tensor, KVState]:
        t = x.shape[1]
        pos = self.token_positions(state, t, x.device)
        next_pos = state.pos + t
        layout = self.layout()
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(self.layers, state.k, state.v):
            q, k, v = layer.project(x, pos)  # (B, H, T, Dh)
            keys = torch.cat([k_cache, k], dim=2)
            values = torch.cat([v_cache, v], dim=2)
            memory = dict(k_mem=keys.detach(), v_mem=values.detach()) if self.stop_gradient_memory else {}
            heads = ops.attend(
                q, keys, values, layout=layout, q_start=state.pos, scale=layer.positions.scale, backend=self.backend, **memory
            )
            x = layer.feed_forward(layer.attend_residual(x, heads))
            drop = max(0, self.keep_from(next_pos) - (next_pos - keys.shape[2]))
            new_k.append(keys[:, :, drop:])
            new_v.append(values[:, :, drop:])
        return x, self.State(pos=next_pos, fingerprint=self.fingerprint, k=new_k, v=new_v)
