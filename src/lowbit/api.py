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
from lowbit.methods import GPTQ, RTN, Method, make_method, method_settings  # noqa: F401
from lowbit.models import DEFAULT_MODEL, load_model, model_id
from lowbit.surgery import QuantConfig


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
    **settings,
) -> dict:
    """Load, quantize and save; returns the run record (settings, time, size account)."""
    method = make_method(method, **settings)
    model, tokenizer, meta = load(model_spec)
    if meta is not None:
        raise LowbitError(f"{model_spec} is already quantized: quantize the full-precision model instead")
    t0 = time.time()
    method.apply(model, config, tokenizer=tokenizer, progress=progress)
    seconds = time.time() - t0
    info = {
        "base_model": model_spec,
        "base_model_id": model_id(model_spec),
        "method": method.name,
        "quantize_seconds": round(seconds, 2),
        "settings": method_settings(method),
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
