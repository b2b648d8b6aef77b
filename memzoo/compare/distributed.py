"""One run on several processes: data-parallel training under ``torchrun``.

``torchrun --nproc_per_node=2 -m memzoo compare ...`` starts one process per rank with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`context` sees them, joins the process
group (gloo on CPU, nccl on CUDA) and the trainer wraps the model in
``DistributedDataParallel``. Every rank draws the same seeded global batch and keeps
its own rows, so the data, the loss and the gradient equal a single process with the
same global batch; only rank 0 writes results. Several nodes: the same command with
torchrun's rendezvous flags (``--nnodes``, ``--rdzv-backend=c10d``,
``--rdzv-endpoint=HOST:PORT``) on each node. FSDP is not built in: it is for models that
no longer fit one device, and its gloo support is unreliable (see docs/compare.md).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from memzoo.errors import MemzooError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The rank's device: ``cuda`` becomes ``cuda:<local rank>``."""
        return f"cuda:{self.local_rank}" if torch.device(device).type == "cuda" and ":" not in device else device


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def context(device: str = "cpu") -> DistContext | None:
    """The torch.distributed context of this process (joining the group on first use), or
    None when it runs alone."""
    if not launched():
        return None
    if not dist.is_available():
        raise MemzooError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        # leave the group before the interpreter tears down: a gloo group left to the
        # process's exit sometimes aborted a rank ("terminate called without an active
        # exception", SIGABRT; 2 of 20 two-rank runs under load) after its work was done
        atexit.register(_leave)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def split_rows(batch_size: int, ctx: DistContext | None) -> slice:
    """The rows of the global batch this rank trains on."""
    if ctx is None:
        return slice(0, batch_size)
    if batch_size % ctx.world_size:
        raise MemzooError(
            f"train.batch_size ({batch_size}) must be a multiple of the number of processes ({ctx.world_size}) "
            "under torchrun: the global batch is split evenly across ranks"
        )
    per = batch_size // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)
