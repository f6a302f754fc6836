"""The block runner: what every block-by-block pass shares.

GPTQ in memory (:func:`lowbit.ptq.gptq.gptq`), streamed RTN and GPTQ (:mod:`lowbit.ptq.streaming`), the
streamed byte-budget planner (:mod:`lowbit.budget.streamed`) and Block-AP (:mod:`lowbit.train.blockap`)
all walk the decoder blocks in order: capture block 0's inputs on calibration windows, run a block,
gather its linears' Hessians, quantize its linears stage by stage, advance the stored activations
through the quantized block, install the scales and write the weights. Those steps live here once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.distributed import DistContext
from lowbit.errors import LowbitError
from lowbit.quant.surgery import (
    HP_DTYPES,
    QuantConfig,
    is_linear,
    linear_weight,
    output_head_names,
    quantize_model,
    quantized_modules,
    round_high_precision_,
    snap_weights_,
)


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
def capture_block_inputs(model, layers, batches):
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


def block_output(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_hessians(
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
            block_output(block, hidden, kwargs)
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    tokens = ctx.sum(torch.tensor([counts[n] for n in linears], dtype=torch.int64)).tolist()
    own = {n: (ctx.sum(sums.pop(n)) * (2.0 / max(1, tokens[i]))).float() for i, n in enumerate(linears) if n in sums}
    return {n: own[owner.get(n, n)] for n in linears}  # gptq_quantize_weight copies its H: sharing one is safe


def linear_stages(block: nn.Module, linears: dict[str, nn.Module], first) -> list[list[str]]:
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
        block_output(block, *first)
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


def install_scales(model: nn.Module, config: QuantConfig, results: dict) -> None:
    """Swap in the quantized modules with GPTQ's scales (embeddings, if quantized: round-to-nearest)."""
    quantize_model(model, config, initialize=False)
    for name, module in quantized_modules(model):
        if name in results:
            module.quantizer.set_scales(*results[name])
        else:
            module.quantizer.initialize(module.weight, search=config.scale_search)
            module.quantizer.round_scales_()
    check_on_grid(model, results)
    snap_weights_(model)


def write_weight(module: nn.Module, q: torch.Tensor) -> None:
    if isinstance(module, nn.Linear):
        module.weight.copy_(q.to(module.weight.dtype))
    else:  # GPT-2 Conv1D stores (in, out)
        module.weight.copy_(q.t().to(module.weight.dtype))


def check_on_grid(model, results):
    """GPTQ's columns and the installed scales must describe the same grid (idempotence)."""
    for name, module in quantized_modules(model):
        if name not in results:
            continue
        w = module.weight
        err = (module.quantizer(w) - w).abs().max().item()
        if not math.isfinite(err) or err > 1e-5 * max(1.0, w.abs().max().item()):
            raise RuntimeError(f"GPTQ result of {name} is not on its quantization grid (max err {err:g})")


def quant_targets(root: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The linears :func:`lowbit.quant.surgery.quantize_model` would quantize under ``root``."""
    heads = output_head_names(root)
    return [(n, m) for n, m in root.named_modules() if n not in heads and is_linear(m) and config.spec_for(n)]


def keep_high_precision(root: nn.Module, config: QuantConfig) -> None:
    """A part of the model with nothing to quantize: high-precision tensors rounded as quantize_model rounds them."""
    with torch.no_grad():
        round_high_precision_(root, HP_DTYPES[config.hp_dtype])
    root.lowbit_config = config


class HiddenStore(Sequence):
    """The calibration batches' block inputs ``(hidden, kwargs)``: hidden states in memory, or in one
    memory-mapped float file at ``path`` when larger than ``limit`` bytes; :meth:`advance` replaces
    each batch's hidden states by a block's outputs, which become the next block's inputs."""

    def __init__(self, captured: list, limit: float = math.inf, path: Path | None = None):
        self.kwargs = [kwargs for _, kwargs in captured]
        hidden = [h for h, _ in captured]
        self.rows = np.cumsum([0] + [h.shape[0] for h in hidden]).tolist()
        self.map = None
        if sum(h.numel() * h.element_size() for h in hidden) > limit:
            self.dtype = hidden[0].dtype
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            self.map = np.memmap(path, dtype=np_dtype, mode="w+", shape=(self.rows[-1], *hidden[0].shape[1:]))
            for i, h in enumerate(hidden):
                self.map[self.rows[i] : self.rows[i + 1]] = h.numpy()
            hidden = None
        self.hidden = hidden

    def __len__(self) -> int:
        return len(self.kwargs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self.map is None:
            return self.hidden[i], self.kwargs[i]
        return torch.from_numpy(np.array(self.map[self.rows[i] : self.rows[i + 1]])), self.kwargs[i]

    def advance(self, fn) -> None:
        for i in range(len(self)):
            out = fn(*self[i])
            if self.map is None:
                self.hidden[i] = out
            else:
                self.map[self.rows[i] : self.rows[i + 1]] = out.numpy()
        if self.map is not None:
            self.map.flush()


def layers_parent(model: nn.Module, layers: nn.ModuleList) -> tuple[str, nn.Module, str]:
    """(full name of the decoder ModuleList, its parent module, its attribute name)."""
    name = next(n for n, m in model.named_modules() if m is layers)
    parent_name, _, attr = name.rpartition(".")
    return name, model.get_submodule(parent_name) if parent_name else model, attr
