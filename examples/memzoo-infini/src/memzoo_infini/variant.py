"""``infini``: Infini-attention (Munkhdalai, Faruqui, Gopal 2024, arXiv 2404.07143).

Every layer keeps, per key/value head, a compressive memory ``M`` (Dh × Dh) and a
normaliser ``z`` (Dh), written once per completed block (``block_size`` L tokens, the
paper's segment) from that block's own keys and values, with σ = ELU + 1::

    retrieval   A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1})                   (denominator clamped)
    linear      M_s = M_{s-1} + σ(K)ᵀ V
    delta       M_s = M_{s-1} + σ(K)ᵀ (V - σ(K) M_{s-1} / (σ(K) z_{s-1}))
    both        z_s = z_{s-1} + Σ_t σ(K_t)
    output      sigmoid(β_h) ⊙ A_mem + (1 - sigmoid(β_h)) ⊙ A_local     one learned β per layer and head

``A_local`` is softmax attention causal within the block (RoPE). The queries, keys and
values are the layer's own (no new projections); the only new parameters are the
``n_layers × n_heads`` gate logits β. Who sees what, L = 4::

    keys:            | block 0 | block 1 | block 2 |
    query in block 2 |         |         | x x . . |  local, causal
                     |  M_1 = memory of blocks 0 and 1 |  through σ(Q) M_1 / σ(Q) z_1

Choices the paper leaves open (see docs/variants/infini.md):

* σ(Q), σ(K) use the *unrotated* queries and keys by default (as Hugging Face's
  reproduction did): the memory is a sum over positions, and RoPE angles of different
  absolute positions would mix in it. ``memory_positions="rotated"`` uses the rotated ones.
* β starts at ``gate_init`` = 0 (sigmoid 0.5: memory and local attention mixed equally).
* The denominator is clamped at :data:`DENOMINATOR_MIN` (:func:`denominator`). Before the first block completes
  ``M = 0`` and ``z = 0``, so the retrieval is exactly 0 and the first block's output is
  ``(1 - sigmoid(β)) ⊙ A_local``; the delta rule's first write equals the linear one.
* GQA: the memory is per key/value head; query head ``h`` reads the memory of key/value
  head ``h // (H / Hkv)``, as its softmax attention reads that head's keys.

Streaming: the memory changes only when a block completes (on the absolute grid of
``block_size`` positions), and the partial block's unrotated keys and values are held in
the state until then (a ring buffer of L rows, :mod:`memzoo.ring`: one shape once the
first block is complete), so any chunking gives the same outputs, state and gradients. A
decode step attends over the block so far (views of the ring), or, for one shape at every
step (compiled code, ``memzoo.ring.static_shapes``), over the whole ring at its positions
(``key_pos``; the previous block's rows lie outside the layout). In eager no-grad calls a state also carries its
ring's keys rotated, beside its fields (``memzoo.State.derived``), so a decode step
rotates only its own key.

Shapes: B batch, T tokens in this call, D model width, H query heads, Hkv key/value
heads, Dh head width, L block_size, nb query blocks touched by the call.

This module uses memzoo's public API only (``memzoo``, ``memzoo.ops``): it is the worked
example of docs/adding-a-variant.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

import memzoo
from memzoo import ops
from memzoo.ops import BlockLayout

#: the smallest retrieval denominator σ(q)·z: it is 0 only while z = 0 (before the first
#: block completes, when the numerator is 0 too), so the clamp makes that retrieval 0
DENOMINATOR_MIN = 1e-6


def denominator(den: Tensor) -> Tensor:
    """The retrieval denominator σ(q)·z as used: clamped at :data:`DENOMINATOR_MIN`, and 1
    where it is 0 (an empty memory: ``z = 0`` and ``M = 0``, so the retrieval is 0 either
    way). The forward is the clamp's; the backward at an empty memory has no
    ``1 / DENOMINATOR_MIN`` factor, which in float16 overflowed to inf and, times the zero
    memory, made every gradient NaN."""
    return torch.where(den > 0, den.clamp_min(DENOMINATOR_MIN), torch.ones_like(den))


class InfiniConfig(memzoo.VariantConfig):
    update: Literal["linear", "delta"] = Field(
        "delta", description="memory update rule: linear, or delta (writes only what the memory does not already retrieve)"
    )
    memory_positions: Literal["unrotated", "rotated"] = Field(
        "unrotated", description="σ(Q), σ(K) of the memory from the queries/keys before RoPE (HF's reproduction) or after"
    )
    gate_init: float = Field(
        0.0, allow_inf_nan=False, description="initial gate logit β of every head (sigmoid(0) = 0.5)",
        json_schema_extra=memzoo.NOT_IN_FINGERPRINT,
    )

    conformance_options = (
        {"update": "delta"},
        {"update": "linear"},
        {"update": "delta", "memory_positions": "rotated", "gate_init": 1.0},
    )


def sigma(t: Tensor) -> Tensor:
    """The memory's feature map σ = ELU + 1 (positive, so the normaliser is positive)."""
    return F.elu(t) + 1.0


def retrieve(sq: Tensor, mem: Tensor, norm: Tensor) -> Tensor:
    """σ(Q) M / clamp(σ(Q) z): ``sq`` (..., n, Dh), ``mem`` (..., Dh, Dh), ``norm`` (..., Dh)
    -> (..., n, Dh)."""
    den = denominator(sq @ norm.unsqueeze(-1))  # (..., n, 1)
    return (sq @ mem) / den


def write(mem: Tensor, norm: Tensor, sk: Tensor, v: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """One block's memory update: ``sk`` = σ(K), ``v`` (B, Hkv, L, Dh); ``mem`` (B, Hkv, Dh, Dh),
    ``norm`` (B, Hkv, Dh). Returns the new (mem, norm)."""
    if rule == "delta":
        v = v - retrieve(sk, mem, norm)
    return mem + sk.transpose(-1, -2) @ v, norm + sk.sum(dim=2)


def scan(
    mem: Tensor, norm: Tensor, sk: Tensor, v: Tensor, size: int, rule: str, fresh: bool, n_read: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`write` for ``n`` consecutive complete blocks at once: ``sk`` = σ(K) and ``v``
    (B, Hkv, n·L, Dh), ``mem`` (B, Hkv, Dh, Dh) and ``norm`` (B, Hkv, Dh) before the first.
    Returns the memories before each of the first ``n_read`` blocks (``n_read`` ≤ n + 1;
    the (n+1)-th is the last), (B·Hkv, n_read, Dh, Dh); the last memory (B·Hkv, Dh, Dh);
    and every normaliser from before the first block to after the last, (B·Hkv, n+1, Dh).
    ``fresh``: ``mem`` and ``norm`` are the empty ones (zeros: the sequence's first block).

    The same function as ``n`` calls of :func:`write`, with the per-block work batched
    (at small sizes a step is per-op overhead): the normalisers are a cumulative sum, so
    every block's denominator ``den = σ(K) z_{s-1}`` (clamped) and ``W = σ(K) / den`` are
    known before the loop, which then does the delta rule's write
    ``M_s = M_{s-1} + σ(K)ᵀ (V - W M_{s-1})`` as two ``baddbmm`` per block (the linear
    rule is a cumulative sum of the blocks' ``σ(K)ᵀ V``). With ``fresh`` the first block's
    write is the linear one (its retrieval is exactly 0: ``M = 0``), so no ``W`` with the
    clamped ``den`` of an empty normaliser is formed."""
    b, hkv, length, dh = sk.shape
    g, n = b * hkv, length // size
    skb = sk.reshape(g, n, size, dh)  # one row of blocks per head
    vb = v.reshape(g, n, size, dh)
    # z before block j is norms[:, j]: the state's, then a running sum of the blocks' σ(K) sums
    norms = torch.cat([norm.reshape(g, 1, dh), skb.sum(2)], dim=1).cumsum(1)  # (B·Hkv, n+1, Dh)
    if rule == "linear":
        written = torch.bmm(sk.reshape(g * n, size, dh).transpose(1, 2), v.reshape(g * n, size, dh)).view(g, n, dh, dh)  # σ(K)ᵀ V
        mems = torch.cat([mem.reshape(g, 1, dh, dh), written], dim=1).cumsum(1)
        return mems[:, :n_read], mems[:, n], norms
    first = 1 if fresh else 0  # blocks [first, n) read the memory before writing
    ws: tuple[Tensor, ...] = ()
    if first < n:
        sk_d = skb[:, first:].reshape(-1, size, dh)  # (B·Hkv·(n-first), L, Dh)
        den = denominator(torch.bmm(sk_d, norms[:, first:n].reshape(-1, dh, 1)))  # (·, L, 1)
        ws = (sk_d / den).view(g, n - first, size, dh).unbind(1)
    keys_t, values = skb.transpose(2, 3).unbind(1), vb.unbind(1)  # (B·Hkv, Dh, L), (B·Hkv, L, Dh) per block
    m = mem.reshape(g, dh, dh)
    mems = [m]
    for j in range(n):
        if j < first:
            m = torch.bmm(keys_t[j], values[j])
        else:  # M + σ(K)ᵀ (V - W M)
            m = torch.baddbmm(m, keys_t[j], torch.baddbmm(values[j], ws[j - first], m, alpha=-1))
        mems.append(m)
    return torch.stack(mems[:n_read], dim=1), m, norms


@dataclass
class InfiniState(memzoo.State):
    """Per layer: ``k[l]``, ``v[l]`` (B, Hkv, t, Dh) the *unrotated* keys and the values of
    the current block so far, in a ring buffer of L rows (:mod:`memzoo.ring`: the block's
    positions in its slots 0 … pos % L - 1, the previous block's rows after them; one
    shape once the first block is complete); ``mem[l]`` (B, Hkv, Dh, Dh) and ``norm[l]``
    (B, Hkv, Dh) the memory and normaliser of every completed block."""

    k: list[Tensor]
    v: list[Tensor]
    mem: list[Tensor]
    norm: list[Tensor]


@memzoo.register_variant("infini", config=InfiniConfig)
class InfiniAttention(memzoo.Backbone):
    State = InfiniState
    #: 2: the block's K/V are a ring buffer of L rows (1: the partial block's rows only)
    state_format = 2
    #: why a compiled training step fails (memzoo's compile tests check it still does)
    compile_training_issue = (
        "torch 2.13's AOT autograd traces a backward in which the unrotated queries' gradient (the sum of the "
        "RoPE path's and the memory retrieval's) has other strides at run time than traced, then views it in the "
        "head split's backward ('view size is not compatible'); the forward traces with no graph break, and "
        "inductor (bench_train --compile) runs it"
    )

    def build(self) -> None:
        self.layers = self.make_layers()
        # β: one gate logit per layer and query head
        self.gate = nn.Parameter(torch.full((self.n_layers, self.n_heads), float(self.gate_init)))

    def init_from_embeddings(self, embed: torch.Tensor, generator: torch.Generator) -> list[str]:
        """On a pretrained decoder β is the one new parameter: it starts at ``gate_init``
        (a constant, not noise; e.g. ``gate_init=-8`` starts near plain local attention)."""
        with torch.no_grad():
            self.gate.fill_(float(self.gate_init))
        return ["gate"]

    # ------------------------------------------------------------------ the contract
    def expected_state_shapes(self, pos: int, batch_size: int) -> dict[str, Any]:
        b, n, hkv, dh = batch_size, self.n_layers, self.n_kv_heads, self.head_dim
        kv = [(b, hkv, memzoo.ring.size(self.block_size, pos), dh)] * n
        return {"k": kv, "v": kv, "mem": [(b, hkv, dh, dh)] * n, "norm": [(b, hkv, dh)] * n}

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> InfiniState:
        b, n, hkv, dh = batch_size, self.n_layers, self.n_kv_heads, self.head_dim
        empty = torch.zeros(b, hkv, 0, dh, device=device, dtype=dtype)
        mem = torch.zeros(b, hkv, dh, dh, device=device, dtype=dtype)
        norm = torch.zeros(b, hkv, dh, device=device, dtype=dtype)
        return InfiniState(pos=0, fingerprint=self.fingerprint, k=[empty] * n, v=[empty] * n, mem=[mem] * n, norm=[norm] * n)

    def decodes_in_ring_order(self, start: int, n_tokens: int) -> bool:
        return n_tokens == 1 and start >= self.block_size

    def check_state_values(self, state: memzoo.State) -> None:
        """Every normaliser is >= 0 (a sum of σ(K) > 0); before the first block completes
        (``pos < L``) no block has been written, so the memory and the normaliser are zero
        (a call from there writes its first block as the first: a memory in such a state
        would be dropped, not read)."""
        assert isinstance(state, InfiniState)
        where = f"{self.variant}: state field"
        for i, norm in enumerate(state.norm):
            if not bool((norm >= 0).all()):
                raise memzoo.StateError(f"{where} 'norm[{i}]' must be >= 0 (a sum of σ(K) > 0), got a minimum of {float(norm.min()):.4g}")
        if state.pos < self.block_size:
            for name in ("mem", "norm"):
                for i, t in enumerate(getattr(state, name)):
                    if bool(t.any()):
                        raise memzoo.StateError(
                            f"{where} '{name}[{i}]' must be zero at position {state.pos}: no block of {self.block_size} "
                            "tokens is complete yet, so nothing was written to the memory (edited or damaged state?)"
                        )

    def step(self, x: Tensor, state: InfiniState) -> tuple[Tensor, InfiniState]:
        size, t = self.block_size, x.shape[1]
        start, end = state.pos, state.pos + t
        block_start = start // size * size  # the ring holds the partial block [block_start, start) in its first slots
        n_done = end // size - start // size  # blocks completed in this call
        n_blocks = (end - 1) // size - start // size + 1  # query blocks touched: nb
        pad = start - block_start
        # a decode step keeping one shape (compiled code, memzoo.ring.static_shapes): attention over
        # the whole ring in slot order, every row at its position
        static = self.decodes_in_ring_order(start, t) and memzoo.ring.decodes_statically() and ops.takes_key_positions(self.backend)
        ring = dict(capacity=size)  # for memzoo.ring
        pos = torch.arange(block_start, end, device=x.device)
        q_pos = pos[pad:]  # made once for every layer (RoPE then computes its angles once)
        key_pos = memzoo.ring.positions(size, end, x.device) if static else None
        layout = BlockLayout(block_size=size, window=0)  # causal within the block only
        rotated = self.memory_positions == "rotated"
        gates = torch.sigmoid(self.gate).to(x.dtype)[:, None, :, None, None]  # (n_layers, 1, H, 1, 1): sigmoid(β)
        new_k, new_v, new_mem, new_norm, rotated_k = [], [], [], [], []
        for i, layer in enumerate(self.layers):
            q_raw, k_raw, v = layer.project_raw(x)  # (B, H, T, Dh), (B, Hkv, T, Dh)
            cached = state.derived(f"rotated_k.{i}", (state.k[i],))  # the ring's keys rotated, by the last step
            if n_blocks == 1:  # the call stays in one block: write the ring, read the block so far from it
                ring_k = memzoo.ring.write(state.k[i], k_raw, start, **ring)
                ring_v = memzoo.ring.write(state.v[i], v, start, **ring)
                if cached is None:
                    q = layer.positions.query(q_raw, q_pos)
                    keys_ring = layer.positions.key(ring_k, memzoo.ring.positions(size, end, x.device))
                else:  # rotate only this call's keys (a decode step would rotate the whole block again)
                    q, k = layer.positions.query_key(q_raw, k_raw, q_pos)
                    keys_ring = memzoo.ring.write(cached, k, start, **ring)
                values = memzoo.ring.read(ring_v, block_start, end, end, **ring)
                keys = memzoo.ring.read(keys_ring, block_start, end, end, **ring)
                keys_raw = memzoo.ring.read(ring_k, block_start, end, end, **ring) if n_done and not rotated else keys
            else:  # positions [block_start, end) in order; the new ring is their last L rows
                keys_raw = torch.cat([memzoo.ring.read(state.k[i], block_start, start, start, **ring), k_raw], dim=2)
                values = torch.cat([memzoo.ring.read(state.v[i], block_start, start, start, **ring), v], dim=2)
                if cached is None:
                    q, keys = layer.positions.query(q_raw, q_pos), layer.positions.key(keys_raw, pos)
                else:
                    q, k = layer.positions.query_key(q_raw, k_raw, q_pos)
                    keys = torch.cat([memzoo.ring.read(cached, block_start, start, start, **ring), k], dim=2)
                ring_k, ring_v, keys_ring = (memzoo.ring.from_ordered(r, end, **ring) for r in (keys_raw, values, keys))
            if static:  # every slot at its position: the previous block's rows are out of the layout's reach
                local = ops.attend(
                    q, keys_ring, ring_v, layout=layout, q_start=start, scale=layer.positions.scale, backend=self.backend,
                    key_pos=key_pos,
                )
            else:
                local = ops.attend(q, keys, values, layout=layout, q_start=start, scale=layer.positions.scale, backend=self.backend)

            sq = sigma(q if rotated else q_raw)
            b, dh = x.shape[0], self.head_dim
            if n_done:  # the memory each query block of the call reads, and the last
                sk = sigma((keys if rotated else keys_raw)[:, :, : n_done * size])  # the completed blocks' keys
                reads, last, norms = scan(
                    state.mem[i], state.norm[i], sk, values[:, :, : n_done * size], size, self.update,
                    fresh=block_start == 0, n_read=n_blocks,
                )
                last_mem, last_norm = last.view(b, -1, dh, dh), norms[:, n_done].view(b, -1, dh)
            else:
                last_mem, last_norm = state.mem[i], state.norm[i]
            if n_blocks == 1:  # every query reads one memory (a decode step): no padding to a whole block
                a_mem = retrieve(sq, ops.repeat_kv(state.mem[i], self.n_heads), ops.repeat_kv(state.norm[i], self.n_heads))
            else:  # every query block's retrieval in one batched product: queries padded to whole blocks
                sq_blocks = F.pad(sq, (0, 0, pad, n_blocks * size - pad - t)).reshape(-1, size, dh)  # (B·H·nb, L, Dh)
                mem = ops.repeat_kv(reads.unflatten(0, (b, -1)), self.n_heads)  # (B, H, nb, Dh, Dh)
                norm = ops.repeat_kv(norms[:, :n_blocks].unflatten(0, (b, -1)), self.n_heads)  # (B, H, nb, Dh)
                den = torch.bmm(sq_blocks, norm.reshape(-1, dh, 1)).clamp_min(DENOMINATOR_MIN)  # (B·H·nb, L, 1)
                a_mem = (torch.bmm(sq_blocks, mem.reshape(-1, dh, dh)) / den).view(b, self.n_heads, -1, dh)[:, :, pad : pad + t]

            # sigmoid(β) ⊙ A_mem + (1 - sigmoid(β)) ⊙ A_local, as local + sigmoid(β) ⊙ (A_mem - local)
            x = layer.feed_forward(layer.attend_residual(x, torch.lerp(local, a_mem, gates[i])))
            new_k.append(ring_k)
            new_v.append(ring_v)
            new_mem.append(last_mem)
            new_norm.append(last_norm)
            rotated_k.append(keys_ring)
        new = InfiniState(pos=end, fingerprint=self.fingerprint, k=new_k, v=new_v, mem=new_mem, norm=new_norm)
        for i, (k, r) in enumerate(zip(new_k, rotated_k)):  # for the next step (eager no-grad calls only)
            new.keep_derived(f"rotated_k.{i}", (k,), r)
        return x, new
