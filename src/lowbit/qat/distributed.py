"""One process, or many under ``torchrun`` with DDP (or FSDP2 with ``--fsdp``): each rank takes its
slice of the same global batch, so the trained model matches the one-process run."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn


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


def teardown(ctx: DistContext) -> None:
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(student: nn.Module, teacher: nn.Module) -> None:
    """FSDP2: shard every decoder block, then the whole model, of both student and teacher."""
    from torch.distributed.fsdp import fully_shard

    from lowbit.ptq import find_decoder_layers

    for model in (student, teacher):
        for block in find_decoder_layers(model):
            fully_shard(block)
        fully_shard(model)


def wrap(student: nn.Module, teacher: nn.Module, fsdp: bool, ctx: DistContext) -> nn.Module:
    """The module the loop calls: ``student`` itself (one process, or sharded in place by FSDP),
    or its DDP wrapper."""
    if fsdp:
        shard(student, teacher)
        return student
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return student


def no_sync(model: nn.Module, student: nn.Module, fsdp: bool, ctx: DistContext):
    """Context that skips the gradient all-reduce on accumulation micro-steps."""
    if fsdp:

        @contextlib.contextmanager
        def off():
            student.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                student.set_requires_gradient_sync(True)

        return off
    return model.no_sync if ctx.active else contextlib.nullcontext
