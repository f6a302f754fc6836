"""Post-training quantization: round-to-nearest and GPTQ (Frantar et al. 2023, arXiv:2210.17323).

GPTQ quantizes one column at a time and spreads each column's rounding error over the columns
not yet quantized, using the inverse Hessian ``H = 2 X X^T`` of the layer inputs gathered on
calibration tokens (docs/methods.md, "GPTQ", which lists the steps as implemented here). The model is processed one decoder block at a time:
the block's inputs are kept, its linears are quantized, and the quantized block's outputs feed
the next block, so memory stays near one block's activations beyond the model itself.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.distributed import DistContext, current_context
from lowbit.errors import LowbitError
from lowbit.ptq.blocks import (
    HiddenStore,
    block_hessians,
    block_output,
    capture_block_inputs,
    find_decoder_layers,
    install_scales,
    linear_stages,
    quant_targets,
    write_weight,
)
from lowbit.quant.quantizers import make_quantizer
from lowbit.quant.surgery import QuantConfig, linear_weight, quantize_model, snap_weights_


def rtn(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Round-to-nearest: scales from the weights alone (``config.scale_search``), no data."""
    quantize_model(model, config)
    snap_weights_(model)
    return model


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantizer,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_search: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one matrix. Returns (dequantized weight, alpha (rows, G), zero (rows, G)).

    Groups stay contiguous in the original column order; with act-order and groups, the group
    scales are fixed from the original weights before any update ("static groups"; docs/methods.md,
    "GPTQ", steps 1-8).
    """
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = quantizer.group_size
    if g == 0:
        raise LowbitError("GPTQ does not support per-tensor scales (absmean): use rtn or a group size")
    g = g or cols
    n_groups = -(-cols // g)
    alpha = torch.zeros(rows, n_groups)
    zero = torch.zeros(rows, n_groups)
    static = act_order or g == cols
    if static:
        for j in range(n_groups):
            alpha[:, j : j + 1], zero[:, j : j + 1] = quantizer.group_scales(W[:, j * g : (j + 1) * g], scale_search)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    diag = torch.arange(cols)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise LowbitError(f"GPTQ Hessian is not positive definite even with damping {damp}: raise --damp") from exc
    if not static:
        block_size = g * max(1, block_size // g)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and col % g == 0:
                a, z = quantizer.group_scales(W1[:, i : i + g], scale_search)
                alpha[:, grp : grp + 1], zero[:, grp : grp + 1] = a, z
            w = W1[:, i : i + 1]
            q = quantizer.fake_quantize_with(w, alpha[:, grp : grp + 1], zero[:, grp : grp + 1])
            Q[:, i1 + i] = q[:, 0]
            err = (w[:, 0] - q[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return Q, alpha, zero


@torch.no_grad()
def gptq(
    model: nn.Module,
    config: QuantConfig,
    calib_ids: torch.Tensor,
    batch_size: int = 8,
    damp: float = 0.01,
    act_order: bool = False,
    progress: bool = True,
    sequential: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place with GPTQ on calibration windows ``calib_ids`` (n, seq_len).

    Blocks are processed in order, each on the outputs of the already-quantized blocks before it.
    ``sequential`` also orders the linears *within* a block ("true sequential"): the linears that
    read the same input (q/k/v; gate/up) form one stage, and each stage's Hessians are gathered
    with the earlier stages of the block already quantized (e.g. o_proj sees the quantized
    attention's output). Without it, every linear of a block sees full-precision block internals.
    """
    if calib_ids.ndim != 2 or len(calib_ids) == 0:
        raise LowbitError("GPTQ needs at least one calibration window of tokens")
    layers = find_decoder_layers(model)
    ctx = current_context()
    batches = list(torch.split(calib_ids, batch_size))
    if len(batches) < ctx.world:
        raise LowbitError(
            f"GPTQ under torchrun splits its {len(batches)} calibration batches of {batch_size} windows over "
            f"{ctx.world} processes, fewer batches than processes: use more --calib-tokens or fewer processes"
        )
    store = HiddenStore(capture_block_inputs(model, layers, [batches[i] for i in ctx.slice(len(batches))]))
    targets = dict(quant_targets(model, config))
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = {m: n for n, m in model.named_modules()}
    t0 = time.time()
    bar = tqdm(total=len(layers), desc="GPTQ blocks", disable=not (progress and ctx.is_main), unit="block")
    for block in layers:
        linears = {names[m]: m for m in block.modules() if names.get(m) in targets}
        results.update(gptq_block(block, linears, config, store, damp, act_order, sequential, ctx))
        bar.update(1)
        bar.set_postfix(s=f"{time.time() - t0:.0f}")
    bar.close()
    install_scales(model, config, results)
    return model


@torch.no_grad()
def gptq_block(
    block: nn.Module,
    linears: dict[str, nn.Module],
    config: QuantConfig,
    store: HiddenStore,
    damp: float = 0.01,
    act_order: bool = False,
    sequential: bool = False,
    ctx: DistContext | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ on one decoder block: Hessians of ``linears`` on the block inputs in ``store`` (stage by
    stage with ``sequential``), each linear's columns quantized and written back, then ``store``
    advanced through the quantized block. Returns each linear's scales ``(alpha, zero)``, which
    :func:`lowbit.ptq.blocks.install_scales` installs."""
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stages = linear_stages(block, linears, store[0]) if sequential else [list(linears)]
    for stage in stages:
        hessians = block_hessians(block, {n: linears[n] for n in stage}, store, ctx)
        for name in stage:
            spec = config.spec_for(name)
            quantizer = make_quantizer(spec.bits, spec.quantizer, spec.group_size)
            weight, _ = linear_weight(linears[name])
            q, alpha, zero = gptq_quantize_weight(
                weight, hessians.pop(name), quantizer, damp=damp, act_order=act_order, scale_search=config.scale_search
            )
            write_weight(linears[name], q)
            results[name] = (alpha, zero)
    store.advance(lambda hidden, kwargs: block_output(block, hidden, kwargs))
    return results
