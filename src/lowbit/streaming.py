"""Streaming quantization: quantize a checkpoint one decoder block at a time, never holding the model.

``lowbit quantize --stream`` (and :func:`stream_quantize_to_dir`) reads a Hugging Face folder's
safetensors weights through a copy-on-write memory map (:class:`lowbit.stfile.Checkpoint`; sharded
checkpoints too), builds the model's skeleton with every parameter on the ``meta`` device, and then,
for each decoder block in order: materialises that block alone in float32 (converted from the
stored bf16 / fp16 / fp32, as ``from_pretrained(dtype=float32)`` converts it), quantizes it with the
very functions the in-memory path runs (:func:`lowbit.ptq.rtn`; or GPTQ on the block's captured
inputs, :mod:`lowbit.ptq`), computes its stored tensors with :func:`lowbit.io.build_state`, appends
them to the weights file (:class:`lowbit.stfile.SafetensorsWriter`) and moves the block back to
``meta``. The embedding, the final norm and the output head are read last (the embedding also
first, for GPTQ's calibration pass) and stored like the in-memory path stores them.

GPTQ's calibration windows go through the embedding once; the hidden states (one per window) stay
in memory up to ``hidden_limit_bytes`` (default 1 GiB), else in a memory-mapped file of the output's
temporary folder; each block's quantized outputs become the next block's inputs, as
:func:`lowbit.ptq.gptq` does in memory.

The folder is the one :func:`lowbit.io.save_quantized` writes, bit for bit in every stored tensor
(tests/test_streaming.py), built in a temporary sibling and renamed into place at the end: a killed
run leaves no partial output. Peak memory: one block in float32 (plus, for GPTQ, its Hessians and
the calibration activations), the embedding and head in float32 at the end, and the packed output
of one block; everything else stays on disk. The byte-budget planner with ``--budget-bpw`` streams
too (:mod:`lowbit.stream_budget`: Fisher sensitivities block by block, then GPTQ/RTN on the plan).
Methods that need the whole model at once (a file budget, blockap, auto, qat, rotations) are refused
with the fix.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.fsio import atomic_dir, prepare_out
from lowbit.io import (
    QUANTIZED_OUT,
    WEIGHTS,
    build_state,
    is_quantized_dir,
    reference_identity,
    weights_metadata,
    write_config_files,
    write_manifest,
)  # fmt: skip
from lowbit.methods import Method, make_method, method_settings
from lowbit.ptq import find_decoder_layers
from lowbit.quantizers import check_group_size
from lowbit.stfile import Checkpoint, SafetensorsWriter
from lowbit.surgery import HP_DTYPES, QuantConfig, is_linear, linear_weight, output_head_names, round_high_precision_

STREAM_METHODS = ("rtn", "gptq")  # and "budget" (--budget-bpw) when asked for: lowbit.stream_budget
HIDDEN_IN_MEMORY_BYTES = 1 << 30
GPTQ_BATCH = 8  # calibration windows per forward, as lowbit.ptq.gptq's default
_WORK = ".stream-work"


def model_folder(spec: str) -> Path:
    """The Hugging Face folder behind a model spec: the folder itself, or the converted cache folder
    of a built-in name or a .gguf file (:func:`lowbit.models.cached_model_dir`)."""
    from lowbit.models import NAMED_MODELS, _resolve_path, cached_model_dir

    if spec in NAMED_MODELS:
        return cached_model_dir(spec)
    path = _resolve_path(spec)
    return path if path.is_dir() else cached_model_dir(str(path))


def check_streamable(method: Method, config: QuantConfig) -> None:
    """Refuse, before any work, what streaming cannot do yet (one line naming the fix)."""
    name = method.name
    if name == "budget":
        from lowbit.stream_budget import check_stream_budget

        check_stream_budget(method)
    elif name not in STREAM_METHODS:
        raise LowbitError(
            f"--stream supports --method rtn, gptq and budget (--budget-bpw), not {name} (it needs the whole "
            "model at once): drop --stream to load the model whole, or use "
            + ("--method budget (plan and GPTQ, without rotation or training)" if name == "auto" else "--method gptq")
        )
    if config.rotate:
        raise LowbitError("--stream cannot --rotate (the rotation mixes every block): drop --rotate or --stream")


def fp32_bytes(spec: str) -> int | None:
    """Bytes the model takes in float32 (what the in-memory path loads), or None when ``spec`` is not
    a safetensors folder (nothing is converted or read but the headers)."""
    from lowbit.models import NAMED_MODELS, _resolve_path

    try:
        if spec in NAMED_MODELS or not _resolve_path(spec).is_dir():
            return None
        return Checkpoint(spec).nbytes_as(torch.float32)
    except LowbitError:
        return None


def available_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is none)."""
    from lowbit.resident import proc_kib

    return proc_kib("/proc/meminfo", "MemAvailable")


def should_stream(spec: str, method: str, config: QuantConfig) -> bool:
    """``--stream auto``: stream when the method allows it and the model's float32 size exceeds
    80% of the memory available now."""
    if method not in STREAM_METHODS or config.rotate:
        return False
    need, free = fp32_bytes(spec), available_memory()
    return need is not None and free is not None and need > 0.8 * free


# ------------------------------------------------------------------------------------------------
# the skeleton and its blocks


def _skeleton(folder: Path):
    """(model with meta parameters and real buffers, tokenizer) of a Hugging Face folder, offline."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from lowbit.models import load_causal_config, load_tokenizer

    hf_config = load_causal_config(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.tie_weights()  # init_empty_weights re-creates each parameter, which unties a tied head
    model.eval()
    return model, load_tokenizer(folder)


def _stored(key_names: list[str], ckpt: Checkpoint) -> str | None:
    return next((k for k in key_names if k in ckpt), None)


def _tensor_slots(root: nn.Module, prefix: str):
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
    for names, where in _tensor_slots(model, "").values():
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


def _materialize(root: nn.Module, prefix: str, ckpt: Checkpoint, skip=lambda names, tensor: False) -> list:
    """Load every meta parameter (and stored persistent buffer) under ``root`` from the checkpoint,
    floating tensors in float32 (tied parameters stay one tensor), except those ``skip`` names.
    Returns what was replaced, ``[(module, attr, is_param, old)]`` (:func:`_restore` puts it back)."""
    replaced = []
    for names, where in _tensor_slots(root, prefix).values():
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


def _restore(replaced: list) -> None:
    for module, attr, is_param, old in replaced:
        (module._parameters if is_param else module._buffers)[attr] = old


def _release(root: nn.Module) -> None:
    """Move every tensor under ``root`` back to ``meta`` (its memory is freed), and hand the freed heap
    back to the system: glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in
    the heap, and without a trim the resident set grew ~80 MB a block on a 1.1 B model."""
    root.to("meta")
    _trim_heap()


def _trim_heap() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _scope(prefix: str, module: nn.Module) -> nn.Module:
    """A module holding ``module`` at the path ``prefix``, so that its submodules carry their full names."""
    root = node = nn.Module()
    parts = prefix.split(".")
    for part in parts[:-1]:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)
    return root


def _targets(root: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Module]]:
    """The linears :func:`lowbit.surgery.quantize_model` would quantize under ``root``."""
    heads = output_head_names(root)
    return [(n, m) for n, m in root.named_modules() if n not in heads and is_linear(m) and config.spec_for(n)]


def _plan_checks(model: nn.Module, config: QuantConfig) -> None:
    """quantize_model's own refusals, made on the skeleton before any work."""
    targets = _targets(model, config)
    if not targets and not config.quantize_embeddings:
        raise LowbitError("no linear layer matched the include/exclude patterns: nothing to quantize")
    for name, module in targets:
        check_group_size(config.spec_for(name).group_size, linear_weight(module)[0].shape[1])


def _hp_only(root: nn.Module, config: QuantConfig) -> None:
    """A part of the model with nothing to quantize: high-precision tensors rounded as quantize_model rounds them."""
    with torch.no_grad():
        round_high_precision_(root, HP_DTYPES[config.hp_dtype])
    root.lowbit_config = config


# ------------------------------------------------------------------------------------------------
# GPTQ's calibration activations


class HiddenStore(Sequence):
    """The calibration batches' block inputs ``(hidden, kwargs)``: hidden states in memory, or in one
    memory-mapped float file when larger than ``limit`` bytes; :meth:`advance` replaces each batch's
    hidden states by a block's outputs (what :func:`lowbit.ptq.gptq` does to its list)."""

    def __init__(self, captured: list, limit: int, path: Path):
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


def _capture(model: nn.Module, layers: nn.ModuleList, ckpt: Checkpoint, ids: torch.Tensor, limit: int, work: Path,
             batch: int = GPTQ_BATCH, name: str = "hidden.f32"):
    """Block 0's inputs for every calibration batch (:func:`lowbit.ptq._capture_block_inputs`), with
    what runs before the blocks (embeddings, position embeddings) materialised for the pass only:
    not the blocks, nor an output head of its own."""
    from lowbit.ptq import _capture_block_inputs

    prefix = _layers_parent(model, layers)[0] + "."
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    head_only = {id(p) for p in head.parameters()} - {id(p) for p in emb.parameters()} if head is not None else set()

    def skip(names, tensor):
        return not tensor.is_meta or id(tensor) in head_only or any(n.startswith(prefix) for n in names)

    replaced = _materialize(model, "", ckpt, skip)
    try:
        captured = _capture_block_inputs(model, layers, list(torch.split(ids, batch)))
    finally:
        _restore(replaced)  # the meta tensors again (ties intact)
        ckpt.unmap()
    return HiddenStore(captured, limit, work / name)


@torch.no_grad()
def _gptq_block(scope: nn.Module, block: nn.Module, config: QuantConfig, method, store: HiddenStore) -> None:
    """GPTQ on one materialised block, as one iteration of :func:`lowbit.ptq.gptq`'s loop: Hessians on
    ``store``, columns quantized, ``store`` advanced through the quantized block, scales installed."""
    from lowbit.ptq import _block_hessians, _block_output, _install_scales, _stages, _write_weight, gptq_quantize_weight
    from lowbit.quantizers import make_quantizer

    linears = dict(_targets(scope, config))
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stages = _stages(block, linears, store[0]) if method.sequential else [list(linears)]
    for stage in stages:
        hessians = _block_hessians(block, {n: linears[n] for n in stage}, store)
        for name in stage:
            spec = config.spec_for(name)
            quantizer = make_quantizer(spec.bits, spec.quantizer, spec.group_size)
            weight, _ = linear_weight(linears[name])
            q, alpha, zero = gptq_quantize_weight(
                weight, hessians.pop(name), quantizer, damp=method.damp, act_order=method.act_order,
                scale_search=config.scale_search,
            )  # fmt: skip
            _write_weight(linears[name], q)
            results[name] = (alpha, zero)
    store.advance(lambda hidden, kwargs: _block_output(block, hidden, kwargs))
    if linears:
        _install_scales(scope, config, results)
    else:
        _hp_only(scope, config)


# ------------------------------------------------------------------------------------------------
# the run


class _Output:
    """The weights file being written, the layers' metadata and the size account (as
    :func:`lowbit.evaluation.size_account` counts it) of what was written so far."""

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


def _layers_parent(model: nn.Module, layers: nn.ModuleList) -> tuple[str, nn.Module, str]:
    """(full name of the decoder ModuleList, its parent module, its attribute name)."""
    name = next(n for n, m in model.named_modules() if m is layers)
    parent_name, _, attr = name.rpartition(".")
    return name, model.get_submodule(parent_name) if parent_name else model, attr


def _quantize_blocks(model, ckpt, config, method, tokenizer, out: _Output, work: Path, limit: int, progress: bool):
    """Every decoder block in turn: materialise, quantize, write, release."""
    layers = find_decoder_layers(model)
    prefix, _, _ = _layers_parent(model, layers)
    block_config = dataclasses.replace(config, quantize_embeddings=False)
    store = None
    if method.name == "gptq":
        from lowbit.methods import calibration_windows
        from lowbit.models import check_seq_len

        check_seq_len(model, method.seq_len, "--seq-len")
        ids = calibration_windows(tokenizer, method.calib, method.calib_tokens, method.seq_len, method.sample, method.seed)
        if ids.ndim != 2 or len(ids) == 0:
            raise LowbitError("GPTQ needs at least one calibration window of tokens")
        store = _capture(model, layers, ckpt, ids, limit, work)
    t0 = time.time()
    bar = tqdm(total=len(layers), desc=f"stream {method.name} blocks", disable=not progress, unit="block")
    for i, block in enumerate(layers):
        scope = _scope(f"{prefix}.{i}", block)
        _materialize(block, f"{prefix}.{i}", ckpt)
        ckpt.unmap()  # the block's pages of the checkpoint leave the resident set (float32 copies are kept)
        if store is not None:
            _gptq_block(scope, block, block_config, method, store)
        elif _targets(scope, block_config):
            from lowbit.ptq import rtn

            rtn(scope, block_config)
        else:
            _hp_only(scope, block_config)
        out.emit(scope)
        _release(block)
        bar.update(1)
        bar.set_postfix(s=f"{time.time() - t0:.0f}")
    bar.close()


def _quantize_rest(model, ckpt, config, method, out: _Output) -> None:
    """The embedding, final norm, output head and anything else outside the decoder blocks."""
    from lowbit.ptq import _install_scales, rtn

    layers = find_decoder_layers(model)
    _, parent, attr = _layers_parent(model, layers)
    setattr(parent, attr, nn.ModuleList())  # the blocks are written: the rest is the model without them
    try:
        _materialize(model, "", ckpt)
        ckpt.unmap()
        if not _targets(model, config) and not config.quantize_embeddings:
            _hp_only(model, config)
        elif method.name == "gptq":  # as lowbit.ptq.gptq ends: embeddings (if quantized) by round-to-nearest
            with torch.no_grad():
                _install_scales(model, config, {})
        else:
            rtn(model, config)
        out.emit(model)
    finally:
        _release(model)
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
    model, tokenizer = _skeleton(folder)
    check_checkpoint(model, ckpt)
    _plan_checks(model, config)
    params = _count_params(model)
    order = [n for n, _ in model.named_modules()]
    t0 = time.time()
    with atomic_dir(target) as tmp:
        work = tmp / _WORK
        output = _Output(tmp / WEIGHTS, work)
        run, run_config, plan = method, config, None
        if method.name == "budget":
            from lowbit.stream_budget import stream_plan

            plan = stream_plan(model, ckpt, config, method, tokenizer, work, hidden_limit_bytes, progress)
            if progress:
                print(plan.table())
            run, run_config = make_method(method.then_method, **method_settings(method)), plan.quant_config(config)
            _plan_checks(model, run_config)
        _quantize_blocks(model, ckpt, run_config, run, tokenizer, output, work, hidden_limit_bytes, progress)
        _quantize_rest(model, ckpt, run_config, run, output)
        output.writer.finish(weights_metadata())
        shutil.rmtree(work)
        info = {
            **reference_identity(model_spec),
            "base_model_id": _model_id(model_spec),
            "method": method.name,
            "quantize_seconds": round(time.time() - t0, 2),
            "settings": method_settings(method),
            "streamed": True,
        }
        if plan is not None:  # as Budget.apply reports it
            info["report"] = {**plan.record(), "bits_per_weight_linear": 8.0 * output.linear_bytes / plan.linear_params,
                              "linear_bytes": output.linear_bytes, "tensor_bytes": output.writer.data_bytes,
                              "then": {}}  # fmt: skip
        rank = {n: i for i, n in enumerate(order)}
        layers = dict(sorted(output.layers.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        write_config_files(tmp, model.config, tokenizer)
        write_manifest(tmp, run_config, layers, info)
    return {**info, "out": str(out), **output.account(params)}


def _model_id(spec: str) -> str:
    from lowbit.models import model_id

    return model_id(spec)
