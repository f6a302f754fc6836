"""Streaming quantization: quantize a checkpoint one decoder block at a time, never holding the model.

``lowbit quantize --stream`` (and :func:`stream_quantize_to_dir`) reads a Hugging Face folder's
safetensors weights through a copy-on-write memory map (:class:`lowbit.store.stfile.Checkpoint`; sharded
checkpoints too), builds the model's skeleton with every parameter on the ``meta`` device, and then,
for each decoder block in order: materialises that block alone in float32 (converted from the
stored bf16 / fp16 / fp32, as ``from_pretrained(dtype=float32)`` converts it), quantizes it with the
very functions the in-memory path runs (:func:`lowbit.ptq.gptq.rtn`; or GPTQ on the block's captured
inputs, :mod:`lowbit.ptq.gptq`), computes its stored tensors with :func:`lowbit.store.folder.build_state`, appends
them to the weights file (:class:`lowbit.store.stfile.SafetensorsWriter`) and moves the block back to
``meta``. The embedding, the final norm and the output head are read last (the embedding also
first, for GPTQ's calibration pass) and stored like the in-memory path stores them.

GPTQ's calibration windows go through the embedding once; the hidden states (one per window) stay
in memory up to ``hidden_limit_bytes`` (default 1 GiB), else in a memory-mapped file of the output's
temporary folder; each block's quantized outputs become the next block's inputs, as
:func:`lowbit.ptq.gptq.gptq` does in memory.

The folder is the one :func:`lowbit.store.folder.save_quantized` writes, bit for bit in every stored tensor
(tests/test_streaming.py), built in a temporary sibling and renamed into place at the end: a killed
run leaves no partial output. Peak memory: one block in float32 (plus, for GPTQ, its Hessians and
the calibration activations), the embedding and head in float32 at the end, and the packed output
of one block; everything else stays on disk. The byte-budget planner with ``--budget-bpw`` streams
too (:mod:`lowbit.budget.streamed`: Fisher sensitivities block by block, then GPTQ/RTN on the plan).
Methods that need the whole model at once (a file budget, blockap, auto, qat, rotations) are refused
with the fix.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from lowbit.distributed import launched_by_torchrun
from lowbit.errors import LowbitError
from lowbit.ptq.blocks import find_decoder_layers, keep_high_precision, layers_parent, quant_targets
from lowbit.ptq.methods import Method, make_method, run_record, streamable_methods
from lowbit.ptq.source import capture_from_checkpoint, check_checkpoint, materialize, release, scope_at, skeleton
from lowbit.quant.quantizers import check_group_size
from lowbit.quant.surgery import QuantConfig, linear_weight
from lowbit.store.folder import (
    QUANTIZED_OUT,
    WEIGHTS,
    build_state,
    is_quantized_dir,
    weights_metadata,
    write_config_files,
    write_manifest,
)  # fmt: skip
from lowbit.store.fsio import atomic_dir, prepare_out
from lowbit.store.stfile import Checkpoint, SafetensorsWriter

HIDDEN_IN_MEMORY_BYTES = 1 << 30
_WORK = ".stream-work"


def model_folder(spec: str) -> Path:
    """The Hugging Face folder behind a model spec: the folder itself, or the converted cache folder
    of a built-in name or a .gguf file (:func:`lowbit.eval.models.cached_model_dir`)."""
    from lowbit.eval.models import NAMED_MODELS, _resolve_path, cached_model_dir

    if spec in NAMED_MODELS:
        return cached_model_dir(spec)
    path = _resolve_path(spec)
    return path if path.is_dir() else cached_model_dir(str(path))


def check_streamable(method: Method, config: QuantConfig) -> None:
    """Refuse, before any work, what streaming cannot do (one line naming the fix)."""
    if not getattr(method, "streamable", False):
        names = streamable_methods()
        raise LowbitError(
            f"--stream supports --method {', '.join(names[:-1])} and {names[-1]}, not {method.name} (it needs the "
            "whole model at once): drop --stream to load the model whole, or use "
            + getattr(method, "stream_instead", "--method gptq")
        )
    own_check = getattr(method, "check_streamable", None)
    if own_check is not None:
        own_check()
    if config.rotate:
        raise LowbitError("--stream cannot --rotate (the rotation mixes every block): drop --rotate or --stream")


def should_stream(spec: str, method: Method, config: QuantConfig) -> bool:
    """Whether :func:`lowbit.api.quantize_to_dir` streams by default: wherever streaming writes the
    folder the in-memory path writes (the method quantizes block by block, no rotation, one process,
    a Hugging Face or built-in model), since it is as fast and holds one block instead of the model."""
    if launched_by_torchrun():
        return False
    try:
        check_streamable(method, config)  # the method, its settings and the config allow it
        folder = model_folder(spec)
    except LowbitError:
        return False
    return folder.is_dir() and not is_quantized_dir(folder) and any(folder.glob("*.safetensors"))


def _plan_checks(model: nn.Module, config: QuantConfig) -> None:
    """quantize_model's own refusals, made on the skeleton before any work."""
    targets = quant_targets(model, config)
    if not targets and not config.quantize_embeddings:
        raise LowbitError("no linear layer matched the include/exclude patterns: nothing to quantize")
    for name, module in targets:
        check_group_size(config.spec_for(name).group_size, linear_weight(module)[0].shape[1])


class _Output:
    """The weights file being written, the layers' metadata and the size account (as
    :func:`lowbit.eval.evaluation.size_account` counts it) of what was written so far."""

    def __init__(self, path: Path, work: Path):
        self.writer = SafetensorsWriter(path, work)
        self.layers: dict[str, dict] = {}
        self.linear_bytes = 0
        self.linear_params = 0

    def emit(self, scope: nn.Module) -> None:
        tensors, layers = build_state(scope)
        for name, t in tensors.items():
            self.writer.add(name, t)
        for name, info in layers.items():
            if "tied_to" in info:
                continue
            self.linear_params += info["shape"][0] * info["shape"][1]
            for suffix in ("qweight", "step", "zero"):
                t = tensors.get(f"{name}.{suffix}")
                self.linear_bytes += 0 if t is None else t.numel() * t.element_size()
        self.layers.update(layers)

    def account(self, params: int) -> dict:
        total = self.writer.data_bytes
        return {
            "total_bytes": int(total),
            "params": int(params),
            "bits_per_weight": 8.0 * total / params,
            "bits_per_weight_linear": 8.0 * self.linear_bytes / self.linear_params if self.linear_params else None,
            "linear_bytes": int(self.linear_bytes),
            "linear_params": int(self.linear_params),
            "other_bytes": int(total - self.linear_bytes),
        }


def _quantize_blocks(model, ckpt, config, method, tokenizer, out: _Output, work: Path, limit: int, progress: bool):
    """Every decoder block in turn: materialise, quantize (the method's block hook), write, release."""
    layers = find_decoder_layers(model)
    prefix, _, _ = layers_parent(model, layers)
    block_config = dataclasses.replace(config, quantize_embeddings=False)
    ids = method.stream_windows(model, tokenizer)
    store = None if ids is None else capture_from_checkpoint(model, layers, ckpt, ids, limit, work)
    t0 = time.time()
    bar = tqdm(total=len(layers), desc=f"stream {method.name} blocks", disable=not progress, unit="block")
    for i, block in enumerate(layers):
        scope = scope_at(f"{prefix}.{i}", block)
        materialize(block, f"{prefix}.{i}", ckpt)
        ckpt.unmap()  # the block's pages of the checkpoint leave the resident set (float32 copies are kept)
        linears = dict(quant_targets(scope, block_config))
        method.quantize_block(scope, block, linears, block_config, store)
        if not linears:
            keep_high_precision(scope, block_config)
        out.emit(scope)
        release(block)
        bar.update(1)
        bar.set_postfix(s=f"{time.time() - t0:.0f}")
    bar.close()


def _quantize_rest(model, ckpt, config, method, out: _Output) -> None:
    """The embedding, final norm, output head and anything else outside the decoder blocks."""
    layers = find_decoder_layers(model)
    _, parent, attr = layers_parent(model, layers)
    setattr(parent, attr, nn.ModuleList())  # the blocks are written: the rest is the model without them
    try:
        materialize(model, "", ckpt)
        ckpt.unmap()
        if not quant_targets(model, config) and not config.quantize_embeddings:
            keep_high_precision(model, config)
        else:
            method.quantize_rest(model, config)
        out.emit(model)
    finally:
        release(model)
        setattr(parent, attr, layers)


def _count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def stream_quantize_to_dir(
    model_spec: str,
    out: str | os.PathLike,
    config: QuantConfig,
    method: str | Method = "rtn",
    progress: bool = True,
    overwrite: bool = False,
    hidden_limit_bytes: int = HIDDEN_IN_MEMORY_BYTES,
    **settings,
) -> dict:
    """:func:`lowbit.api.quantize_to_dir` one decoder block at a time (see the module notes): the
    same folder, the same run record (``info["streamed"]`` is True)."""
    method = make_method(method, **settings)
    check_streamable(method, config)
    target = prepare_out(out, QUANTIZED_OUT, overwrite, inputs=(model_spec,))
    folder = model_folder(model_spec)
    if is_quantized_dir(folder):
        raise LowbitError(f"{model_spec} is already quantized: quantize the full-precision model instead")
    ckpt = Checkpoint(folder)
    model, tokenizer = skeleton(folder)
    check_checkpoint(model, ckpt)
    _plan_checks(model, config)
    params = _count_params(model)
    order = [n for n, _ in model.named_modules()]
    t0 = time.time()
    with atomic_dir(target) as tmp:
        work = tmp / _WORK
        output = _Output(tmp / WEIGHTS, work)
        run, run_config, plan = method, config, None
        planner = getattr(method, "stream_plan", None)
        if planner is not None:  # a method that plans first, then runs a block-by-block method on the plan
            plan = planner(model, ckpt, config, tokenizer, work, hidden_limit_bytes, progress)
            if progress:
                print(plan.table())
            run, run_config = method.planned_run(plan, config)
            _plan_checks(model, run_config)
        _quantize_blocks(model, ckpt, run_config, run, tokenizer, output, work, hidden_limit_bytes, progress)
        _quantize_rest(model, ckpt, run_config, run, output)
        output.writer.finish(weights_metadata())
        shutil.rmtree(work)
        report = None
        if plan is not None:  # as Budget.apply reports it
            report = {**plan.record(), "bits_per_weight_linear": 8.0 * output.linear_bytes / plan.linear_params,
                      "linear_bytes": output.linear_bytes, "tensor_bytes": output.writer.data_bytes,
                      "then": {}}  # fmt: skip
        info = run_record(model_spec, method, time.time() - t0, report, streamed=True)
        rank = {n: i for i, n in enumerate(order)}
        layers = dict(sorted(output.layers.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        write_config_files(tmp, model.config, tokenizer)
        write_manifest(tmp, run_config, layers, info)
    return {**info, "out": str(out), **output.account(params)}
