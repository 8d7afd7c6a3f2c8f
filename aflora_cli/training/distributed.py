"""Several processes through torch.distributed, as started by `torchrun` or `accelerate launch`."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a list of one when alone)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def max_int(self, value: int) -> int:
        """The largest of every rank's `value` (one tiny all-reduce; `value` alone when not distributed)."""
        if not self.distributed:
            return value
        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: str) -> ProcessGroup:
    """Join the process group the launcher describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroup(rank, world_size, chosen)


def teardown() -> None:
    """Leave the process group. On the CPU (gloo) a worker thread may still be releasing the last collective's
    tensors, which takes the GIL, when the group's last owner (a DDP wrapper, freed with the trainer) joins those
    threads while holding the GIL: both then wait forever (in 1 of 17 two-process runs under load). So the
    ranks first meet (a monitored barrier: it gives up rather than hangs if a rank has gone), the wrappers that
    re-wrapping left in reference cycles are collected, and the workers get a moment without the GIL."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # a rank has failed or gone: nothing is left to wait for
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        gc.collect()
        time.sleep(0.05)
    dist.destroy_process_group()
