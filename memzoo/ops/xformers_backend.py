"""xformers ``memory_efficient_attention`` with a block-diagonal bias over per-block
gathered keys.

Shape notation as in :mod:`memzoo.ops.layout`; xformers wants ``(B, M, H, K)``
("BMHK": batch, sequence, heads, width). A call is turned into one varlen call::

    per query block j (queries [qa_j, qb_j), keys from ka_j = max(k_start, j's block start - W)):
        queries   qb_j - qa_j                              (partial blocks: fewer)
        keys      [F extra rows of j | sinks 0 .. s-1 (those before qb_j) | positions ka_j .. qb_j-1]
    bias      BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen).make_causal_from_bottomright()

Bottom-right causal inside each (queries, keys) pair is exactly the layout: the last
query of a block sees its last key, a query ``i`` rows earlier sees ``i`` keys fewer,
and everything before its own block (extra rows, memory keys) is visible to all of the
block's queries. With memory tensors, a memory position (before the block's start) is
gathered from ``k_mem``/``v_mem`` and an own-block position from ``k``/``v``, which is
the reference's selection. The batch is folded into the sequence list (xformers'
block-diagonal biases take batch 1). A single block whose keys are the whole key
tensor (``full``, one Transformer-XL segment without memory tensors) needs no gather:
``LowerTriangularFromBottomRightMask`` on the tensors as they are.

Extra rows sit in the same key list as the block's keys, so one kernel call is exact;
log-sum-exp merging of separate calls (``fmha.merge_attentions``) is not needed.

:func:`plan_call` (indices and sequence lengths, pure torch) and :func:`make_bias`
(the exact ``attn_bias`` object) are what the real path uses; on CPU the tests
materialise that bias and compare it with the reference layout, and run the whole path
with a materialising kernel in place of xformers' CUDA one.

xformers 0.0.35 has no CPU operator, and its C++ extension is built for one torch
version (2.10 for the 0.0.35 wheels): with another torch the extension does not load
and xformers refuses every CUDA operator. :func:`diagnose` says which case applies and
what to do about it, without importing xformers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

import torch
from torch import Tensor

from memzoo.ops.base import TOLERANCES, AttentionCall, AttentionInputs, Backend, Support, Tolerance, register_backend
from memzoo.ops.layout import BlockLayout

Kernel = Callable[[Tensor, Tensor, Tensor, Any, float], Tensor]

SOURCE_BUILD = "pip install -v --no-build-isolation -U git+https://github.com/facebookresearch/xformers.git@main#egg=xformers"
NO_CPU = (
    "xformers has no CPU operator (memory_efficient_attention runs on CUDA only; on CPU it fails with "
    "'No operator found'); use backend='sdpa' on CPU"
)


def _base(version: str) -> str:
    return version.split("+")[0]


def diagnose(
    installed: str | None,
    build: dict[str, Any] | None,
    torch_version: str,
    torch_cuda: str | None,
    python_version: str,
) -> list[str]:
    """Why xformers cannot run here, from its install metadata alone (no import).

    ``installed``: the xformers version, None when not installed; ``build``: the
    ``version`` entry of xformers' ``cpp_lib.json`` (torch, cuda, python it was built
    for), None when absent.
    """
    if installed is None:
        return [
            "xformers is not installed; install a wheel built for this torch "
            f"({_base(torch_version)}), e.g. `pip install xformers` in an environment whose torch matches it"
        ]
    if build is None:
        return [
            f"xformers {installed} has no C++/CUDA extension build record (cpp_lib.json); "
            f"reinstall a wheel built for torch {_base(torch_version)}, or build it from source: {SOURCE_BUILD}"
        ]
    reasons = []
    built_torch = str(build.get("torch", "?"))
    if _base(built_torch) != _base(torch_version):
        reasons.append(
            f"xformers {installed}'s C++/CUDA extension was built for torch {built_torch} "
            f"(Python {build.get('python', '?')}), but this is torch {torch_version} (Python {python_version}): "
            "the extension does not load, and xformers then refuses every CUDA operator "
            "(\"xFormers wasn't build with CUDA support\"). Remedy: install the torch it was built for "
            f"(`pip install torch=={_base(built_torch)}`), or an xformers built for torch {_base(torch_version)} "
            f"(a matching wheel, or from source: {SOURCE_BUILD})"
        )
    if build.get("cuda") is None and build.get("hip") is None:
        reasons.append(f"xformers {installed} was built without CUDA; install a CUDA wheel or build from source: {SOURCE_BUILD}")
    if torch_cuda is None:
        reasons.append(f"this torch ({torch_version}) is a CPU-only build: xformers needs a CUDA build of torch")
    return reasons


@functools.lru_cache(maxsize=None)
def install_status() -> tuple[str | None, list[str]]:
    """(installed xformers version or None, reasons it cannot run CUDA calls here)."""
    try:
        installed: str | None = metadata.version("xformers")
    except metadata.PackageNotFoundError:
        installed = None
    build = None
    if installed is not None:
        spec = importlib.util.find_spec("xformers")
        locations = list(spec.submodule_search_locations or []) if spec else []
        for loc in locations:
            path = os.path.join(loc, "cpp_lib.json")
            if os.path.exists(path):
                with open(path) as fh:
                    build = json.load(fh).get("version")
                break
    return installed, diagnose(installed, build, torch.__version__, torch.version.cuda, platform.python_version())


def _quiet_import(module: str) -> Any:
    """Import an xformers module; its import-time warning about a mismatched extension is
    reported by :func:`diagnose` instead, with the remedy."""
    logger = logging.getLogger("xformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=None)
def extension_reasons() -> list[str]:
    """After importing xformers: why its CUDA extension did not load (empty: it did)."""
    xformers = _quiet_import("xformers")
    cpp = importlib.import_module("xformers._cpp_lib")
    if getattr(xformers, "_has_cpp_library", False) and getattr(cpp, "_built_with_cuda", False):
        return []
    error = getattr(cpp, "_cpp_library_load_exception", None)
    detail = str(error).strip().replace("\n", " ") if error is not None else "built without CUDA"
    return [f"xformers' C++/CUDA extension did not load ({detail}); see docs/backends.md for the remedy"]


def attn_bias_module() -> Any:
    """``xformers.ops.fmha.attn_bias`` (plain Python: importable without a working extension)."""
    return _quiet_import("xformers.ops.fmha.attn_bias")


# ----------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """How one call becomes one varlen xformers call (for one batch row).

    The key source is ``[extra rows (nb·F) | k (Tk) | k_mem (Tk), with memory tensors]``
    along the sequence; ``kv_index`` picks each block's keys from it, in block order.
    ``simple``: one block over all of ``k`` with no gather (a bottom-right causal bias).
    """

    q_seqlens: tuple[int, ...]
    kv_seqlens: tuple[int, ...]
    kv_index: Tensor  # (sum(kv_seqlens),) int64 into the key source
    n_source: int
    simple: bool


@functools.lru_cache(maxsize=512)
def plan_call(
    layout: BlockLayout, q_start: int, n_queries: int, n_keys: int, extra_per_block: int, memory_copy: bool
) -> Plan:
    """The sequence lengths and key gather of a call (shapes only; cached)."""
    size, window = layout.block_size, layout.window
    end = q_start + n_queries
    n_sink, k_start = layout.n_sink_rows(end), layout.run_start(end, n_keys)  # k_start: the run's first position
    nb = layout.n_query_blocks(q_start, n_queries)
    f = extra_per_block
    n_extra = nb * f
    q_lens, kv_lens, pieces = [], [], []
    for j in range(nb):
        if size is None:
            start, qa, qb = 0, q_start, end
        else:
            start = (q_start // size + j) * size
            qa, qb = max(q_start, start), min(end, start + size)
        ka = k_start if window is None else max(k_start, start - window)
        # ascending positions: the sinks (visible to every later query, wherever the window
        # is), then the run's visible part; the block's own queries come last, as the
        # bottom-right causal bias needs
        sink_pos = torch.arange(min(n_sink, qb))
        run_pos = torch.arange(ka, max(ka, qb))  # empty when every query of the block is a sink
        pos = torch.cat([sink_pos, run_pos])
        src = n_extra + torch.cat([sink_pos, n_sink + run_pos - k_start])
        if memory_copy:
            src = torch.where(pos < start, src + n_keys, src)
        pieces += [torch.arange(j * f, (j + 1) * f), src]
        q_lens.append(qb - qa)
        kv_lens.append(f + len(pos))
    first_start = 0 if size is None else (q_start // size) * size
    lowest = 0 if n_sink else k_start  # the first key row's position (a sink's, when there are sinks)
    simple = (
        # with memory tensors, only when no key row is memory (before the block): the simple
        # path reads k/v alone, so a sink or run row that is memory would skip k_mem/v_mem
        nb == 1 and f == 0 and kv_lens[0] == n_keys and (not memory_copy or lowest >= first_start)
        and (not n_sink or k_start == n_sink)  # sinks and run meet: the keys as they are
    )
    return Plan(
        q_seqlens=tuple(q_lens),
        kv_seqlens=tuple(kv_lens),
        kv_index=torch.cat(pieces),
        n_source=n_extra + n_keys * (2 if memory_copy else 1),
        simple=simple,
    )


def make_bias(plan: Plan, batch: int, device: torch.device | str = "cpu") -> Any:
    """The exact ``attn_bias`` the backend passes for ``plan`` and ``batch`` rows."""
    ab = attn_bias_module()
    if plan.simple:
        return ab.LowerTriangularFromBottomRightMask()
    return ab.BlockDiagonalMask.from_seqlens(
        q_seqlen=list(plan.q_seqlens) * batch, kv_seqlen=list(plan.kv_seqlens) * batch, device=torch.device(device)
    ).make_causal_from_bottomright()


def bmhk(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H, D)"""
    return x.transpose(1, 2)


def fold_batch(x: Tensor) -> Tensor:
    """(B, H, M, K) -> (1, B*M, H, K): batch rows become consecutive sequences."""
    b, h, m, d = x.shape
    return bmhk(x).reshape(1, b * m, h, d)


def attend_planned(kernel: Kernel, inputs: AttentionInputs) -> Tensor:
    """The whole xformers path with ``kernel(q, k, v, attn_bias, scale)`` (BMHK in and
    out) as the attention kernel: gather, bias, kernel, un-gather. (B,H,Tq,Dv) out."""
    if inputs.rel_q is not None:
        raise ValueError(XformersBackend.support.no_relative_keys_because)
    if inputs.key_pos is not None:
        raise ValueError(XformersBackend.support.no_key_positions_because)
    q, k, v, layout, q_start, scale = inputs.q, inputs.k, inputs.v, inputs.layout, inputs.q_start, inputs.scale
    k_mem, v_mem, extra_k, extra_v = inputs.k_mem, inputs.v_mem, inputs.extra_k, inputs.extra_v
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    f = 0 if extra_k is None else extra_k.shape[3]
    plan = plan_call(layout, q_start, tq, tk, f, k_mem is not None)
    bias = make_bias(plan, b, q.device)
    if plan.simple:
        out = kernel(bmhk(q), bmhk(k), bmhk(v), bias, scale)  # (B, Tq, H, Dv)
        return bmhk(out)
    keys, values = [k], [v]
    if extra_k is not None:
        assert extra_v is not None
        keys.insert(0, extra_k.flatten(2, 3))
        values.insert(0, extra_v.flatten(2, 3))
    if k_mem is not None:
        assert v_mem is not None
        keys.append(k_mem)
        values.append(v_mem)
    index = plan.kv_index.to(q.device)
    ks = torch.cat(keys, dim=2).index_select(2, index)  # (B, H, sum kv, D)
    vs = torch.cat(values, dim=2).index_select(2, index)
    out = kernel(fold_batch(q), fold_batch(ks), fold_batch(vs), bias, scale)  # (1, B*Tq, H, Dv)
    return out.reshape(b, tq, *out.shape[2:]).transpose(1, 2)


def materialized_kernel(q: Tensor, k: Tensor, v: Tensor, attn_bias: Any, scale: float) -> Tensor:
    """A slow stand-in for ``memory_efficient_attention`` (BMHK): softmax(q·kᵀ·scale + bias)·v
    with the bias materialised. Any device and dtype; used by the CPU tests."""
    bias = attn_bias.materialize((q.shape[1], k.shape[1]), dtype=q.dtype, device=q.device)  # (Mq, Mk)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)


def xformers_kernel(q: Tensor, k: Tensor, v: Tensor, attn_bias: Any, scale: float) -> Tensor:
    fmha = _quiet_import("xformers.ops.fmha")
    return fmha.memory_efficient_attention(q, k, v, attn_bias=attn_bias, scale=scale)


@register_backend
class XformersBackend(Backend):
    name = "xformers"
    priority = 5
    support = Support(
        dtypes={"cuda": frozenset({torch.float16, torch.bfloat16, torch.float32})},
        training=frozenset({"cuda"}),
        no_device_because={"cpu": NO_CPU},
        no_relative_keys_because=(
            "relative-position keys (xl's positions='relative') are not implemented for xformers (its kernels take "
            "no score term with a gradient here); use backend='sdpa', or xl with positions='rope'"
        ),
        no_key_positions_because=(
            "keys at explicit positions (a ring-buffer cache read in slot order) are not implemented for xformers: its "
            "biases describe runs of consecutive positions; the variants then read their caches in position order "
            "(or use backend='sdpa')"
        ),
        # the shared table for its dtypes, but float32 wider: not measured here (no GPU in this
        # project's CI), xformers' own per-op tolerance widened to model level;
        # tests/test_backends.py checks them where a GPU exists
        tolerances={
            torch.float32: Tolerance(3e-4, 1e-3),
            torch.bfloat16: TOLERANCES[torch.bfloat16],
            torch.float16: TOLERANCES[torch.float16],
        },
    )

    def availability_reasons(self, call: AttentionCall) -> list[str]:
        installed, reasons = install_status()
        if reasons or call.device_type != "cuda":
            return reasons
        return extension_reasons()

    def versions(self) -> dict[str, str]:
        installed, _ = install_status()
        return {"torch": torch.__version__, "xformers": installed or "not installed"}

    def attend(self, inputs: AttentionInputs) -> Tensor:
        return attend_planned(xformers_kernel, inputs)

    def dense(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
        lead, tq = q.shape[:-2], q.shape[-2]
        q4, k4, v4 = (x.reshape(-1, *x.shape[-2:]).unsqueeze(2) for x in (q, k, v))  # (N, T, 1, D)
        out = xformers_kernel(q4, k4, v4, None, scale)  # (N, Tq, 1, Dv)
        return out.reshape(*lead, tq, out.shape[-1])
