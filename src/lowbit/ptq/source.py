"""A checkpoint read one block at a time: the model's skeleton on the ``meta`` device, and each part of it
materialised in float32 from a copy-on-write memory map of the safetensors files only while it is used.

Used by streamed quantization (:mod:`lowbit.ptq.streaming`) and the streamed byte-budget planner
(:mod:`lowbit.budget.streamed`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.memory import trim_heap
from lowbit.ptq.blocks import HiddenStore, capture_block_inputs, layers_parent
from lowbit.store.stfile import Checkpoint


def skeleton(folder: Path):
    """(model with meta parameters and real buffers, tokenizer) of a Hugging Face folder, offline."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.eval.models import load_causal_config, load_tokenizer

    hf_config = load_causal_config(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.tie_weights()  # init_empty_weights re-creates each parameter, which unties a tied head
    model.eval()
    return model, load_tokenizer(folder)


def _stored(key_names: list[str], ckpt: Checkpoint) -> str | None:
    return next((k for k in key_names if k in ckpt), None)


def tensor_slots(root: nn.Module, prefix: str):
    """Every parameter and persistent buffer under ``root``: {id: (full names, [(module, attr, is_param)])}."""
    slots: dict[int, tuple[list[str], list]] = {}
    for mname, module in root.named_modules(remove_duplicate=False):
        full = ".".join(p for p in (prefix, mname) if p)
        for attr, t in list(module._parameters.items()) + [
            (b, t) for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set
        ]:
            if t is None:
                continue
            names, where = slots.setdefault(id(t), ([], []))
            names.append(f"{full}.{attr}" if full else attr)
            where.append((module, attr, attr in module._parameters))
    return slots


def check_checkpoint(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every parameter of the skeleton is in the checkpoint (under one of its tied names), of its shape."""
    for names, where in tensor_slots(model, "").values():
        module, attr, is_param = where[0]
        key = _stored(names, ckpt)
        if key is None:
            if is_param:
                raise LowbitError(
                    f"{ckpt.folder} has no tensor {names[0]} that the model config needs: the checkpoint does not "
                    "match its config.json (re-save the model with save_pretrained)"
                )
            continue  # a buffer the model computes itself
        shape = tuple(ckpt.where[key].entries[key][1])
        if shape != tuple(getattr(module, attr).shape):
            raise LowbitError(
                f"{ckpt.folder}: tensor {key} has shape {list(shape)}, the config expects "
                f"{list(getattr(module, attr).shape)}: the checkpoint does not match its config.json"
            )


def materialize(root: nn.Module, prefix: str, ckpt: Checkpoint, skip=lambda names, tensor: False) -> list:
    """Load every meta parameter (and stored persistent buffer) under ``root`` from the checkpoint,
    floating tensors in float32 (tied parameters stay one tensor), except those ``skip`` names.
    Returns what was replaced, ``[(module, attr, is_param, old)]`` (:func:`restore` puts it back)."""
    replaced = []
    for names, where in tensor_slots(root, prefix).values():
        module, attr, is_param = where[0]
        old = getattr(module, attr)
        key = _stored(names, ckpt)
        if key is None or skip(names, old):
            continue  # a computed buffer (checked by check_checkpoint for parameters)
        t = ckpt.get(key)
        t = t.to(torch.float32) if t.is_floating_point() else t.clone()
        new = nn.Parameter(t, requires_grad=old.requires_grad) if is_param else t
        for module, attr, is_param in where:
            replaced.append((module, attr, is_param, old))
            (module._parameters if is_param else module._buffers)[attr] = new
    return replaced


def restore(replaced: list) -> None:
    for module, attr, is_param, old in replaced:
        (module._parameters if is_param else module._buffers)[attr] = old


def release(root: nn.Module) -> None:
    """Move every tensor under ``root`` back to ``meta`` (its memory is freed), and hand the freed heap
    back to the system: glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in
    the heap, and without a trim the resident set grew ~80 MB a block on a 1.1 B model."""
    root.to("meta")
    trim_heap(collect=False)


def scope_at(prefix: str, module: nn.Module) -> nn.Module:
    """A module holding ``module`` at the path ``prefix``, so that its submodules carry their full names."""
    root = node = nn.Module()
    parts = prefix.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)
    return root


def capture_from_checkpoint(model: nn.Module, layers: nn.ModuleList, ckpt: Checkpoint, ids: torch.Tensor, limit: int,
                            work: Path, batch: int = 8, name: str = "hidden.f32") -> HiddenStore:
    """Block 0's inputs for every calibration batch of ``batch`` windows (GPTQ's default batch;
    :func:`lowbit.ptq.blocks.capture_block_inputs`), with what runs before the blocks (embeddings,
    position embeddings) materialised for the pass only: not the blocks, nor an output head of its own."""
    prefix = layers_parent(model, layers)[0] + "."
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_only = {id(p) for p in head.parameters()} - {id(p) for p in emb.parameters()} if head is not None else set()

    def skip(names, tensor):
        return not tensor.is_meta or id(tensor) in head_only or any(n.startswith(prefix) for n in names)

    replaced = materialize(model, "", ckpt, skip)
    try:
        captured = capture_block_inputs(model, layers, list(torch.split(ids, batch)))
    finally:
        restore(replaced)  # the meta tensors again (ties intact)
        ckpt.unmap()
    return HiddenStore(captured, limit, work / name)
