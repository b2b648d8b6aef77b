"""Attention backends behind one seam (see :mod:`memzoo.ops.base`)."""

from memzoo.ops.base import (
    AttentionCall,
    Backend,
    BackendUnavailable,
    check_backend_name,
    get_backend,
    list_backends,
    register_backend,
    resolve_backend,
    use_backend,
)
from memzoo.ops.layout import BlockLayout
from memzoo.ops import reference as _reference  # noqa: F401  (registers "reference")
from memzoo.ops import sdpa as _sdpa  # noqa: F401  (registers "sdpa")


def attend(q, k, v, *, layout, q_start, scale, backend="auto", k_mem=None, v_mem=None, extra_k=None, extra_v=None):
    """Dispatch one layout attention call to ``backend`` (a name or ``"auto"``)."""
    call = AttentionCall.describe(q, k, layout, k_mem, extra_k)
    impl = resolve_backend(backend, call)
    return impl.attend(
        q, k, v, layout=layout, q_start=q_start, scale=scale,
        k_mem=k_mem, v_mem=v_mem, extra_k=extra_k, extra_v=extra_v,
    )


def dense(q, k, v, *, scale, backend="auto"):
    """Unmasked attention of every query to every key, through ``backend``."""
    call = AttentionCall.describe(q, k, BlockLayout(), None, None)
    return resolve_backend(backend, call).dense(q, k, v, scale=scale)


__all__ = [
    "AttentionCall", "Backend", "BackendUnavailable", "BlockLayout", "attend", "dense",
    "check_backend_name", "get_backend", "list_backends", "register_backend", "resolve_backend", "use_backend",
]
