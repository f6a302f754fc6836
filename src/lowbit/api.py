"""The small public API: load, quantize, evaluate. The CLI is a thin layer over these."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from lowbit.distributed import current_context, launched_by_torchrun, setup_distributed, teardown
from lowbit.errors import LowbitError
from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos
from lowbit.eval.evaluation import evaluate, size_account
from lowbit.eval.models import DEFAULT_MODEL, check_reference, load_model
from lowbit.memory import peak_resident_bytes
from lowbit.ptq.methods import GPTQ, RTN, Method, make_method, method_settings, run_record  # noqa: F401
from lowbit.ptq.streaming import should_stream, stream_quantize_to_dir
from lowbit.quant.surgery import QuantConfig
from lowbit.store.folder import QUANTIZED_OUT, is_quantized_dir, load_quantized, save_quantized
from lowbit.store.fsio import prepare_out


def load(spec: str = DEFAULT_MODEL):
    """Load a model by default name, HF folder, GGUF file or lowbit quantized folder.

    Returns (model, tokenizer, meta); ``meta`` is None for a full-precision model. A folder that
    looks like a lowbit output but is not whole is refused (:func:`lowbit.store.folder.is_quantized_dir`).
    """
    if Path(spec).is_dir() and is_quantized_dir(spec):
        return load_quantized(spec)
    model, tokenizer = load_model(spec)
    return model, tokenizer, None


def quantize(
    model: nn.Module,
    config: QuantConfig,
    method: str | Method = "rtn",
    tokenizer=None,
    progress: bool = True,
    **settings,
) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says, with ``method``: a method object
    (``RTN()``, ``GPTQ(calib_tokens=65536)``) or a registered name whose fields ``settings`` fill
    (``quantize(model, cfg, "gptq", tokenizer=tok, damp=0.02)``)."""
    make_method(method, **settings).apply(model, config, tokenizer=tokenizer, progress=progress)
    return model


def quantize_to_dir(
    model_spec: str,
    out: str,
    config: QuantConfig,
    method: str | Method = "rtn",
    progress: bool = True,
    overwrite: bool = False,
    stream: bool | None = None,
    **settings,
) -> dict:
    """Load, quantize and save; returns the run record (settings, time, size account).

    ``stream``: quantize one decoder block at a time from the checkpoint
    (:func:`lowbit.ptq.streaming.stream_quantize_to_dir`: the same folder, one block in memory instead
    of the model); None (the default) streams wherever that writes the same folder
    (:func:`lowbit.ptq.streaming.should_stream`), True refuses what cannot stream, False loads the model whole.

    ``out`` is checked before any work (:func:`lowbit.store.fsio.prepare_out`): it must not hold
    anything but, with ``overwrite``, a previous quantized folder, nor overlap ``model_spec``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: a data-parallel method (GPTQ
    splits its calibration batches over the processes and sums their Hessians; RTN needs no data)
    gives every rank the same model, rank 0 alone checks and writes ``out`` and returns the record,
    the others return ``{"rank": r}``.
    """
    method = make_method(method, **settings)
    if stream is None:
        stream = should_stream(model_spec, method, config)
    if stream:
        return stream_quantize_to_dir(model_spec, out, config, method, progress=progress, overwrite=overwrite)
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = setup_distributed() if launched_by_torchrun() else current_context()
    try:
        if ctx.active and not getattr(method, "data_parallel", False):
            raise LowbitError(
                f"--method {method.name} runs in one process: launch it without torchrun "
                "(under torchrun: --method gptq or rtn)"
            )
        if ctx.is_main:
            prepare_out(out, QUANTIZED_OUT, overwrite, inputs=(model_spec,))
        ctx.barrier()
        record = _quantize_and_save(model_spec, out, config, method, progress and ctx.is_main, overwrite, ctx)
        ctx.barrier()
        return record
    finally:
        if owned:
            teardown(ctx)


def _quantize_and_save(model_spec, out, config, method, progress, overwrite, ctx) -> dict:
    model, tokenizer, meta = load(model_spec)
    if meta is not None:
        raise LowbitError(f"{model_spec} is already quantized: quantize the full-precision model instead")
    t0 = time.time()
    report = method.apply(model, config, tokenizer=tokenizer, progress=progress)
    seconds = time.time() - t0
    if not ctx.is_main:
        return {"rank": ctx.rank}
    info = run_record(model_spec, method, seconds, report, getattr(model, "lowbit_rotation", None))
    save_quantized(model, tokenizer, out, info=info, overwrite=overwrite, inputs=(model_spec,))
    return {**info, "out": str(out), **size_account(model), **({"world_size": ctx.world} if ctx.active else {})}


def resolve_reference(meta: dict) -> tuple[str | None, nn.Module | None]:
    """The reference a quantized folder records (``meta`` from :func:`load`): ``(spec, model)``,
    ``(None, None)`` when it records none; loaded only once :func:`check_reference` passes."""
    spec = check_reference(meta)
    return (spec, load(spec)[0]) if spec else (None, None)


def eval_model(
    model: nn.Module,
    tokenizer,
    data: str = "wiki-eval",
    reference: nn.Module | None = None,
    seq_len: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Perplexity / KL / top-1 on ``data`` plus the size account, as one flat dict.

    The reference (if any) runs alongside, batch by batch (``reference_mode`` "model-alongside"): only
    one batch's full-vocabulary log-probs of each model exist at a time, never all windows' at once.
    ``peak_memory_bytes`` is this process's peak resident memory so far (models included)."""
    windows = tokenize_windows(
        tokenizer, get_text(data), seq_len, max_tokens=max_tokens, bos=tokenizer_adds_bos(tokenizer)
    )
    with torch.inference_mode():
        result = evaluate(model, windows, reference=reference, batch_size=batch_size, progress=progress)
    return {"data": data, **result, **size_account(model), "peak_memory_bytes": peak_resident_bytes()}
