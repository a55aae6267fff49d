"""torchrun, in one place: this process's place in the run (RANK, WORLD_SIZE, LOCAL_RANK), its
device, and the process group (NCCL on CUDA, gloo on the CPU). Used by the trainer and by
`ddim-fast sample` into a folder; a single process (no torchrun) needs none of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """This process's place, from the variables torchrun sets (one process without them)."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """(Dist, device) with the process group started when there are several processes. A CUDA device
    without an index becomes cuda:LOCAL_RANK and is made current; CUDA that is not there is one
    clear error."""
    dist = Dist.from_env()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asks for CUDA, which is not available; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{dist.local_rank}")
        torch.cuda.set_device(device)
    if dist.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def barrier(dist: Dist) -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dist.world > 1:
        torch.distributed.barrier()


def all_mean(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The mean of x over the processes (x itself in a single process)."""
    if dist.world > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= dist.world
    return x


def finish() -> None:
    """End the process group, when one was started."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
