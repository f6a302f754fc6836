"""The optimization recipe: learning-rate schedule, data order, distillation loss, AdamW groups.

ParetoQ (Liu et al. 2025) trains the latent weights (straight-through) and the quantizer scales
(LSQ gradient) with AdamW, a linear warm-up and a cosine decay to zero, the scales in their own
parameter group. LLM-QAT (Liu et al. 2023) distils from the full-precision model:
``KL(teacher || student)`` on the logits at temperature 1.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lowbit.train.config import TrainConfig


def lr_multiplier(step: int, warmup: int, steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps`` (``schedule="cosine"``)
    or the full rate to the end (``"constant"``: a run whose loss curve can be extrapolated, or continued)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_indices(seed: int, step: int, global_batch: int, n_windows: int) -> torch.Tensor:
    """Window indices of optimizer step ``step``, a pure function of (seed, step).

    The windows are read epoch after epoch, each epoch in its own permutation seeded by
    (seed, epoch), so a resumed run reads exactly what an unbroken one would have read.
    """
    parts, pos, end = [], step * global_batch, (step + 1) * global_batch
    while pos < end:
        epoch, offset = divmod(pos, n_windows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_windows, generator=gen)
        take = min(end - pos, n_windows - offset)
        parts.append(perm[offset : offset + take])
        pos += take
    return torch.cat(parts)


def distillation_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    kind: str = "kl",
    kl_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kl``: mean over positions of KL(teacher || student), temperature 1; ``ce``: next-token
    cross-entropy on ``ids``; ``mix``: ``kl_weight * kl + (1 - kl_weight) * ce``."""
    parts: dict[str, torch.Tensor] = {}
    logits = logits.float()
    if kind in ("kl", "mix"):
        logp = F.log_softmax(logits, dim=-1).flatten(0, -2)
        t_logp = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
        parts["kl"] = F.kl_div(logp, t_logp, log_target=True, reduction="batchmean")
    if kind in ("ce", "mix"):
        parts["ce"] = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if kind == "kl":
        loss = parts["kl"]
    elif kind == "ce":
        loss = parts["ce"]
    else:
        loss = kl_weight * parts["kl"] + (1.0 - kl_weight) * parts["ce"]
    return loss, {k: v.detach() for k, v in parts.items()}


def param_groups(model: nn.Module, lr: float, scale_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (weight decay), vectors (norms, biases: none) and quantizer scales
    (their own learning rate, no weight decay). Empty groups are left out."""
    groups = {"weights": [], "vectors": [], "scales": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("quantizer.alpha"):
            groups["scales"].append(p)
        elif p.ndim >= 2:
            groups["weights"].append(p)
        else:
            groups["vectors"].append(p)
    settings = {"weights": (lr, weight_decay), "vectors": (lr, 0.0), "scales": (scale_lr, 0.0)}
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
        for name, params in groups.items()
        if params
    ]


def make_optimizer(student: nn.Module, cfg: TrainConfig):
    """AdamW over :func:`param_groups` and its warm-up + cosine (or constant) schedule (per optimizer step). With
    ``cfg.train_params == "scales"`` everything but the quantizers' step sizes is frozen first."""
    if cfg.train_params == "scales":
        for name, p in student.named_parameters():
            if not name.endswith("quantizer.alpha"):
                p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.lr, cfg.scale_lr, cfg.weight_decay), betas=(0.9, 0.95))
    multiplier = functools.partial(lr_multiplier, warmup=cfg.warmup, steps=cfg.steps, schedule=cfg.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return optimizer, scheduler
