"""What the core asks of data parallelism: the `RankSync` protocol, and digests that compare state across ranks."""

from __future__ import annotations

import hashlib
from typing import Protocol

from torch import Tensor


class RankSync(Protocol):
    """What data parallelism asks of the pruner's peers (cap.engine.distributed.DistContext provides it)."""

    rank: int
    world_size: int

    def average(self, tensor: Tensor) -> Tensor: ...

    def agree(self, what: str, digest: str) -> None: ...


def digest_tensors(tensors: list[Tensor], extra: str = "") -> str:
    """sha256 over the exact bytes of `tensors` (and `extra`): equal digests mean bit-identical values."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        h.update(t.detach().to("cpu", copy=True).contiguous().numpy().tobytes())
    return h.hexdigest()
