"""One process, or many under ``torchrun`` with DDP (or FSDP2 with ``--fsdp``): each rank takes its
slice of the same global batch, so the trained model matches the one-process run. The process
context itself (:class:`DistContext`, :func:`setup_distributed`) lives in :mod:`lowbit.distributed`."""

from __future__ import annotations

import contextlib

from torch import nn

from lowbit.distributed import DistContext, setup_distributed, teardown  # noqa: F401 - re-exported


def shard(student: nn.Module, teacher: nn.Module) -> None:
    """FSDP2: shard every decoder block, then the whole model, of both student and teacher."""
    from torch.distributed.fsdp import fully_shard

    from lowbit.ptq.blocks import find_decoder_layers

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
