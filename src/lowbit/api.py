"""The small public API: load, quantize, evaluate. The CLI is a thin layer over these."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from lowbit.data import get_text, tokenize_windows, tokenizer_adds_bos
from lowbit.errors import LowbitError
from lowbit.evaluation import evaluate, size_account
from lowbit.io import is_quantized_dir, load_quantized, save_quantized
from lowbit.models import DEFAULT_MODEL, load_model, model_id
from lowbit.ptq import gptq, rtn
from lowbit.surgery import QuantConfig

METHODS = ("rtn", "gptq")


def load(spec: str = DEFAULT_MODEL):
    """Load a model by default name, HF folder, GGUF file or lowbit quantized folder.

    Returns (model, tokenizer, meta); ``meta`` is None for a full-precision model.
    """
    if Path(spec).is_dir() and is_quantized_dir(spec):
        return load_quantized(spec)
    model, tokenizer = load_model(spec)
    return model, tokenizer, None


def quantize(
    model: nn.Module,
    config: QuantConfig,
    method: str = "rtn",
    tokenizer=None,
    calib: str = "wiki-calib",
    calib_tokens: int = 16384,
    seq_len: int = 512,
    act_order: bool = False,
    damp: float = 0.01,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place with RTN or GPTQ (calibrated on ``calib`` text)."""
    if method == "rtn":
        return rtn(model, config)
    if method == "gptq":
        if tokenizer is None:
            raise LowbitError("GPTQ needs a tokenizer to read its calibration text")
        ids = tokenize_windows(
            tokenizer, get_text(calib), seq_len, max_tokens=calib_tokens, bos=tokenizer_adds_bos(tokenizer)
        )
        return gptq(model, config, ids, act_order=act_order, damp=damp, progress=progress)
    raise LowbitError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def quantize_to_dir(
    model_spec: str,
    out: str,
    config: QuantConfig,
    method: str = "rtn",
    progress: bool = True,
    **kwargs,
) -> dict:
    """Load, quantize and save; returns the run record (settings, time, size account)."""
    model, tokenizer, meta = load(model_spec)
    if meta is not None:
        raise LowbitError(f"{model_spec} is already quantized: quantize the full-precision model instead")
    t0 = time.time()
    quantize(model, config, method, tokenizer=tokenizer, progress=progress, **kwargs)
    seconds = time.time() - t0
    info = {
        "base_model": model_spec,
        "base_model_id": model_id(model_spec),
        "method": method,
        "quantize_seconds": round(seconds, 2),
        "settings": {k: v for k, v in kwargs.items()},
    }
    save_quantized(model, tokenizer, out, info=info)
    return {**info, "out": str(out), **size_account(model)}


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
    """Perplexity / KL / top-1 on ``data`` plus the size account, as one flat dict."""
    windows = tokenize_windows(
        tokenizer, get_text(data), seq_len, max_tokens=max_tokens, bos=tokenizer_adds_bos(tokenizer)
    )
    with torch.inference_mode():
        result = evaluate(model, windows, reference=reference, batch_size=batch_size, progress=progress)
    return {"data": data, **result, **size_account(model)}
