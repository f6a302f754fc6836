"""Post-training quantization: round-to-nearest and GPTQ (Frantar et al. 2023, arXiv:2210.17323).

GPTQ quantizes one column at a time and spreads each column's rounding error over the columns
not yet quantized, using the inverse Hessian ``H = 2 X X^T`` of the layer inputs gathered on
calibration tokens (docs/methods.md, "GPTQ", which lists the steps as implemented here). The model is processed one decoder block at a time:
the block's inputs are kept, its linears are quantized, and the quantized block's outputs feed
the next block, so memory stays near one block's activations beyond the model itself.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.distributed import DistContext, current_context
from lowbit.errors import LowbitError
from lowbit.quantizers import make_quantizer
from lowbit.surgery import (
    QuantConfig,
    is_linear,
    linear_weight,
    output_head_names,
    quantize_model,
    quantized_modules,
    snap_weights_,
)


def rtn(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Round-to-nearest: scales from the weights alone (``config.scale_search``), no data."""
    quantize_model(model, config)
    snap_weights_(model)
    return model


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks (Llama/Qwen/Gemma ``model.layers``, GPT-2 ``h``)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise LowbitError("could not find the decoder layers of this model: GPTQ supports HF decoder-only LMs")


class _Captured(Exception):
    pass


@torch.no_grad()
def _capture_block_inputs(model, layers, batches):
    """Run the model up to block 0 for each calibration batch; keep (hidden, kwargs)."""
    store = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return store


def _block_output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


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
    heads = output_head_names(model)
    ctx = current_context()
    batches = list(torch.split(calib_ids, batch_size))
    if len(batches) < ctx.world:
        raise LowbitError(
            f"GPTQ under torchrun splits its {len(batches)} calibration batches of {batch_size} windows over "
            f"{ctx.world} processes, fewer batches than processes: use more --calib-tokens or fewer processes"
        )
    store = _capture_block_inputs(model, layers, [batches[i] for i in ctx.slice(len(batches))])
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = {m: n for n, m in model.named_modules()}
    t0 = time.time()
    bar = tqdm(total=len(layers), desc="GPTQ blocks", disable=not (progress and ctx.is_main), unit="block")
    for block in layers:
        linears = {
            names[m]: m for m in block.modules() if is_linear(m) and names[m] not in heads and config.spec_for(names[m])
        }
        stages = _stages(block, linears, store[0]) if sequential else [list(linears)]
        for stage in stages:
            hessians = _block_hessians(block, {n: linears[n] for n in stage}, store, ctx)
            for name in stage:
                spec = config.spec_for(name)
                quantizer = make_quantizer(spec.bits, spec.quantizer, spec.group_size)
                weight, _ = linear_weight(linears[name])
                q, alpha, zero = gptq_quantize_weight(
                    weight, hessians.pop(name), quantizer, damp=damp, act_order=act_order,
                    scale_search=config.scale_search,
                )
                _write_weight(linears[name], q)
                results[name] = (alpha, zero)
        store = [(_block_output(block, hidden, kwargs), kwargs) for hidden, kwargs in store]
        bar.update(1)
        bar.set_postfix(s=f"{time.time() - t0:.0f}")
    bar.close()
    _install_scales(model, config, results)
    return model


def _block_hessians(
    block: nn.Module, linears: dict[str, nn.Module], store, ctx: DistContext | None = None
) -> dict[str, torch.Tensor]:
    """``H = 2 X X^T / n`` of each linear's inputs over the calibration batches in ``store``, in float32.

    Each batch adds its float32 product ``x^T x`` to a float64 sum (with the token count alongside);
    under torchrun (``ctx`` active) every rank holds its own batches and the sums and counts are
    added up over ranks before the division, so all ranks get the same H. A float64 sum of float32
    terms is exact, hence independent of order and of how the batches are split over ranks, as long
    as an entry's terms span fewer than about ``2**(29 - log2(batches))`` in magnitude, which
    calibration batches (terms of one sign on the diagonal, of like size elsewhere) satisfy in practice.
    """
    ctx = ctx or DistContext()
    sums = {n: torch.zeros(linear_weight(m)[0].shape[1], linear_weight(m)[0].shape[1], dtype=torch.float64)
            for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    # Linears called one after another on the very same input tensor (q/k/v, gate/up) share one sum:
    # decided on the first batch (the block's call structure does not change), same numbers, fewer products.
    owner: dict[str, str] = {}
    last: list = [None, None]  # the previous call's input tensor and linear

    def make_hook(name):
        def hook(_module, args, _out):
            if name not in owner:
                owner[name] = owner[last[1]] if last[0] is args[0] else name
                if owner[name] != name:
                    del sums[name]
            last[0], last[1] = args[0], name
            if owner[name] != name:
                return
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name].add_(x.t() @ x)
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        for hidden, kwargs in store:
            _block_output(block, hidden, kwargs)
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    tokens = ctx.sum(torch.tensor([counts[n] for n in linears], dtype=torch.int64)).tolist()
    own = {n: (ctx.sum(sums.pop(n)) * (2.0 / max(1, tokens[i]))).float() for i, n in enumerate(linears) if n in sums}
    return {n: own[owner.get(n, n)] for n in linears}  # gptq_quantize_weight copies its H: sharing one is safe


def _stages(block: nn.Module, linears: dict[str, nn.Module], first) -> list[list[str]]:
    """The block's linears in call order, consecutive ones that read the same input tensor merged
    into one stage (q/k/v; gate/up), found with one forward pass on the first calibration batch."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # held so that a freed input's address cannot be reused by a later one

    def make_hook(name):
        def hook(_module, args):
            alive.append(args[0])
            order.append((name, args[0].data_ptr()))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    try:
        _block_output(block, *first)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last_ptr = None
    for name, ptr in order:
        if any(name in stage for stage in stages):
            continue
        if stages and ptr == last_ptr:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_ptr = ptr
    called = {n for stage in stages for n in stage}
    return stages + [[n] for n in linears if n not in called]  # linears the forward never called, last


def _install_scales(model: nn.Module, config: QuantConfig, results: dict) -> None:
    """Swap in the quantized modules with GPTQ's scales (embeddings, if quantized: round-to-nearest)."""
    quantize_model(model, config, initialize=False)
    for name, module in quantized_modules(model):
        if name in results:
            module.quantizer.set_scales(*results[name])
        else:
            module.quantizer.initialize(module.weight, search=config.scale_search)
            module.quantizer.round_scales_()
    _check_on_grid(model, results)
    snap_weights_(model)


def _write_weight(module: nn.Module, q: torch.Tensor) -> None:
    if isinstance(module, nn.Linear):
        module.weight.copy_(q.to(module.weight.dtype))
    else:  # GPT-2 Conv1D stores (in, out)
        module.weight.copy_(q.t().to(module.weight.dtype))


def _check_on_grid(model, results):
    """GPTQ's columns and the installed scales must describe the same grid (idempotence)."""
    for name, module in quantized_modules(model):
        if name not in results:
            continue
        w = module.weight
        err = (module.quantizer(w) - w).abs().max().item()
        if not math.isfinite(err) or err > 1e-5 * max(1.0, w.abs().max().item()):
            raise RuntimeError(f"GPTQ result of {name} is not on its quantization grid (max err {err:g})")
