"""Attention backends behind one seam (see :mod:`memzoo.ops.base`).

Registered backends: ``reference`` (dense masks, the oracle), ``sdpa`` (block-gathered
``scaled_dot_product_attention``), ``flex`` (FlexAttention block masks) and
``xformers`` (``memory_efficient_attention`` with block-diagonal biases). See
``docs/backends.md`` for what each supports and how ``auto`` picks.
"""

from memzoo.ops.base import (
    AttentionCall,
    Backend,
    BackendRecord,
    BackendUnavailable,
    Support,
    Tolerance,
    check_backend_name,
    explain,
    get_backend,
    list_backends,
    note_resolved,
    record_backends,
    register_backend,
    resolve_backend,
    resolve_backend_name,
    use_backend,
)
from memzoo.ops.layout import BlockLayout
from memzoo.ops import reference as _reference  # noqa: F401  (registers "reference")
from memzoo.ops import sdpa as _sdpa  # noqa: F401  (registers "sdpa")
from memzoo.ops import flex as _flex  # noqa: F401  (registers "flex")
from memzoo.ops import xformers_backend as _xformers  # noqa: F401  (registers "xformers"; imports xformers lazily)


def repeat_kv(t, n_heads):
    """Grouped-query attention: K/V (B, Hkv, ...) -> (B, H, ...), query head ``h`` reading
    K/V head ``h // (H / Hkv)`` (Hugging Face's ``repeat_kv``). Identity when Hkv = H."""
    if t is None or t.shape[1] == n_heads:
        return t
    n_kv = t.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv})")
    return t.unsqueeze(2).expand(t.shape[0], n_kv, n_heads // n_kv, *t.shape[2:]).flatten(1, 2)


def attend(q, k, v, *, layout, q_start, scale, backend="auto", k_mem=None, v_mem=None, extra_k=None, extra_v=None):
    """Dispatch one layout attention call to ``backend`` (a name or ``"auto"``).

    ``q`` (B, H, Tq, D); ``k``, ``v`` and the optional memory tensors / extra rows may have
    fewer heads Hkv dividing H (grouped-query attention): they are shared by groups of
    H / Hkv query heads."""
    h = q.shape[1]
    k, v, k_mem, v_mem, extra_k, extra_v = (repeat_kv(t, h) for t in (k, v, k_mem, v_mem, extra_k, extra_v))
    call = AttentionCall.describe(q, k, layout, k_mem, extra_k, v=v, v_mem=v_mem, extra_v=extra_v)
    impl = resolve_backend(backend, call)
    note_resolved(impl.name)
    return impl.attend(
        q, k, v, layout=layout, q_start=q_start, scale=scale,
        k_mem=k_mem, v_mem=v_mem, extra_k=extra_k, extra_v=extra_v,
    )


def dense(q, k, v, *, scale, backend="auto"):
    """Unmasked attention of every query to every key, through ``backend`` (K/V may have
    fewer heads than ``q``, as in :func:`attend`)."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    call = AttentionCall.describe(q, k, BlockLayout(), None, None, v=v)
    impl = resolve_backend(backend, call)
    note_resolved(impl.name)
    return impl.dense(q, k, v, scale=scale)


__all__ = [
    "AttentionCall", "Backend", "BackendRecord", "BackendUnavailable", "BlockLayout", "Support", "Tolerance",
    "attend", "check_backend_name", "dense", "explain", "get_backend", "list_backends", "record_backends",
    "register_backend", "repeat_kv", "resolve_backend", "resolve_backend_name", "use_backend",
]
