"""One process, or many under ``torchrun``: who this process is, and the few collectives lowbit uses.

QAT (:mod:`lowbit.train.distributed`: DDP / FSDP) and GPTQ (:func:`lowbit.ptq.gptq.gptq`: data-parallel
Hessians) share this. Without torchrun's variables every call is a no-op on one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values`` added up (a new tensor on ``values``' device; ``values`` itself when alone).

        Moved to this rank's device for the collective (NCCL reduces CUDA tensors only)."""
        if not self.active:
            return values
        moved = values.to(self.device, copy=True)
        torch.distributed.all_reduce(moved)
        return moved.to(values.device)

    def slice(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (ranks in order; sizes differ by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed() -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group:
    nccl on CUDA, gloo on CPU. Without them: one process on the first GPU or the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2)
        )
    return DistContext(rank, world, local_rank, device)


def current_context() -> DistContext:
    """The running process group as a :class:`DistContext` (one process when none is initialised)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return DistContext()
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
