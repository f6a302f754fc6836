"""The byte-budget planner on a streamed checkpoint: Fisher sensitivities one decoder block at a time.

:class:`lowbit.budget.planner.Budget` weighs each linear's rounding error by the diagonal empirical Fisher
of the next-token loss (:func:`lowbit.budget.sensitivity.fisher_diagonal`: per calibration window, the
squared gradient of its summed token loss). That needs a backward pass through the whole model,
which streaming never holds. The same gradients come block by block:

1. forward: each window's input to every block is kept (block 0's from the embedding, block ``i+1``'s
   from block ``i`` run on the materialised float32 weights), in memory up to ``limit`` bytes per
   block, else in a memory-mapped file of the output's work folder;
2. the head: the model with its blocks replaced by one module that returns the last block's output
   gives the loss and its gradient with respect to that output (final norm and head materialised);
3. backward, last block first: the block is materialised again, each window's output gradient is
   pulled back through it (``torch.autograd.grad``), giving the gradient of every weight of the block
   (squared and summed: its Fisher) and of the block's input (the previous block's output gradient).
   The block's sensitivity tables are computed there and then, and the block is freed.

Mathematically these are the in-memory gradients; the float sums can differ in the last bits (the
two residual paths into a block's input are added in another order), so the Fisher agrees to float
rounding and the plan is the in-memory one unless two candidates tie that closely (tested on tiny
models). The plan then runs through :func:`lowbit.ptq.streaming.stream_quantize_to_dir`'s GPTQ or RTN
with the plan's per-layer settings. A file budget (``--budget-mb``) also plans the embedding and is
not streamed yet.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.budget.plan import Plan, _oriented, plan_from_tables, planned_linears
from lowbit.budget.sensitivity import LayerTable, Setting, layer_table
from lowbit.errors import LowbitError
from lowbit.ptq.blocks import HiddenStore, block_output, find_decoder_layers, layers_parent
from lowbit.ptq.methods import calibration_windows
from lowbit.ptq.source import capture_from_checkpoint, materialize, release, restore


def stream_plan(model, ckpt, config, method, tokenizer, work: Path, limit: int, progress: bool) -> Plan:
    """The plan :func:`lowbit.budget.plan.make_plan` makes, from Fisher sensitivities computed block by block."""
    targets = planned_linears(model, config)
    if not targets:
        raise LowbitError("no linear layer matched the include/exclude patterns: nothing to plan")
    layers = find_decoder_layers(model)
    prefix = layers_parent(model, layers)[0]
    windows = calibration_windows(tokenizer, method.calib, method.fisher_tokens, method.seq_len)
    stores = [capture_from_checkpoint(model, layers, ckpt, windows, limit, work, batch=1, name="fisher-0.f32")]
    tuple_out = False  # whether a block returns (hidden, ...) rather than hidden: the head pass mimics it
    for i, block in enumerate(tqdm(layers, desc="Fisher forward", disable=not progress, unit="block")):
        materialize(block, f"{prefix}.{i}", ckpt)
        ckpt.unmap()
        outs = []
        with torch.no_grad():
            for hidden, kwargs in stores[-1]:
                raw = block(hidden, **kwargs)
                tuple_out = isinstance(raw, (tuple, list))
                outs.append((raw[0] if tuple_out else raw, kwargs))
        stores.append(HiddenStore(outs, limit, work / f"fisher-{i + 1}.f32"))
        del outs
        release(block)
    grads = _head_gradients(model, layers, ckpt, stores.pop(), windows, tuple_out)
    tables: dict[str, LayerTable] = {}
    candidates = [Setting.parse(c) for c in method.candidates]
    tokens = windows.shape[1] - 1
    for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="Fisher backward", disable=not progress,
                  unit="block"):  # fmt: skip
        block = layers[i]
        materialize(block, f"{prefix}.{i}", ckpt)
        ckpt.unmap()
        names = {f"{prefix}.{i}.{n}": m for n, m in block.named_modules() if f"{prefix}.{i}.{n}" in targets}
        weights = [m.weight for m in names.values()]
        fisher = [torch.zeros_like(w) for w in weights]
        store = stores.pop()
        for p in block.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for k, (hidden, kwargs) in enumerate(store):
                x = hidden.detach().requires_grad_(True)
                out = block_output(block, x, kwargs)
                got = torch.autograd.grad(out, [x, *weights], grad_outputs=grads[k])
                grads[k] = got[0]
                for f, g in zip(fisher, got[1:], strict=True):
                    f.add_(g.float().square())
        n = len(store) * tokens
        for (name, module), f in zip(names.items(), fisher, strict=True):
            tables[name] = layer_table(name, [_oriented(module, f.div_(n))], candidates, config.scale_search)
        del fisher, weights, store
        release(block)
    ordered = [tables[name] for name in targets]
    return plan_from_tables(method, model, config, ordered, None)


class _Inject(nn.Module):
    """Stands for the decoder blocks: returns the last block's output for the current window."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.hidden = None
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        return (self.hidden,) if self.tuple_out else self.hidden


def _head_gradients(model, layers, ckpt, store, windows: torch.Tensor, tuple_out: bool) -> list[torch.Tensor]:
    """Per window: the gradient of its summed next-token loss with respect to the last block's output,
    through the final norm and the output head (materialised for this pass only)."""
    name, parent, attr = layers_parent(model, layers)
    prefix = name + "."
    inject = _Inject(tuple_out)
    setattr(parent, attr, nn.ModuleList([inject]))
    replaced = materialize(model, "", ckpt, lambda names, t: not t.is_meta or any(n.startswith(prefix) for n in names))
    ckpt.unmap()
    grads = []
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(False)
            for (hidden, _), ids in zip(store, windows.split(1), strict=True):
                inject.hidden = hidden.detach().requires_grad_(True)
                logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                loss = nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
                grads.append(torch.autograd.grad(loss, inject.hidden)[0])
    finally:
        inject.hidden = None
        setattr(parent, attr, layers)
        restore(replaced)
    return grads
