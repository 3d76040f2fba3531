"""Data-parallel context: who this process is, and the few collectives training needs.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it (a plain `cap train`) it returns a single-process context whose collectives are no-ops,
so the trainer has one code path. The context also serves the pruner as its `sync`: theta
gradients averaged over ranks, and a check that every rank reached the same pruning decision.
`wrap_model` puts a model into DistributedDataParallel where there is more than one process.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

_DDP_HAS_FORWARD_SYNC = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters


class RankMismatchError(RuntimeError):
    """Ranks disagree about state that must be identical on all of them (thetas, pruning decisions)."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def average(self, tensor: Tensor) -> Tensor:
        """In-place mean over ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def sum(self, tensor: Tensor) -> Tensor:
        """In-place sum over ranks."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any (a stop signal seen by one rank stops all together)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def agree(self, what: str, digest: str) -> list[str]:
        """Raise RankMismatchError on every rank unless all ranks pass the same digest; returns the digests."""
        digests = self.gather(digest)
        if len(set(digests)) > 1:
            detail = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise RankMismatchError(f"ranks disagree on {what} ({detail}); training stops rather than let the "
                                    "networks on different ranks diverge")
        return digests

    def broadcast_object(self, obj: Any) -> Any:
        """rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_kind: str, timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group torchrun (or a launcher setting the same variables) describes.

    gloo on CPU, NCCL on GPU. A world of one needs no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """The module a training step calls: `model` itself on one process, else DistributedDataParallel over its
    current parameters (build it again after surgery replaced some of them)."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # thetas are buffers kept equal by the pruner itself; BN statistics are re-estimated before use,
    # so no buffer needs broadcasting each forward (torch >= 2.14 renamed the switch)
    no_sync = {"forward_sync_buffers": False} if _DDP_HAS_FORWARD_SYNC else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)
