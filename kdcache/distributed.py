"""Several processes under ``torchrun``: who this process is, and the few collective steps kdcache needs.

Outside torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op, so the
single-process path is the same code with rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import KdcacheError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank ([obj] in a single process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, error: str | None) -> None:
        """Every rank reports whether its part succeeded; if any failed, every rank raises the first
        error, so no rank is left waiting at a barrier for one that gave up."""
        if not self.active:
            if error:
                raise KdcacheError(error)
            return
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise KdcacheError(first)


def init(device_type: str) -> Dist:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); rank 0 of 1 without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
