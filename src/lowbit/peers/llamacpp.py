"""llama.cpp as a peer runtime (needs llama-cpp-python): open a GGUF file, its logits for given
token ids (compare them with :func:`lowbit.evaluation.compare_logits`, or evaluate
:class:`LlamaCppLM` with :func:`lowbit.evaluation.evaluate`), llama.cpp's own quantizer
(:func:`quantize_gguf`) and the bytes a GGUF file stores per tensor (:func:`gguf_account`)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError

# llama.cpp's own types a sweep compares with by default: those llama_model_quantize makes without
# an importance matrix (the IQ types need one).
DEFAULT_TYPES = ("Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "TQ2_0")
# GGUF names of a Llama decoder block's linear layers (attn_q/k/v/output, ffn_gate/up/down), as
# lowbit.gguf.export writes them; "linears" in bits_per_weight_linear means these.
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def require_llama_cpp():
    """The ``llama_cpp`` module, or a one-line :class:`LowbitError` naming the install command."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise LowbitError(
            "llama.cpp comparison needs llama-cpp-python: pip install llama-cpp-python diskcache"
        ) from exc
    return llama_cpp


@contextmanager
def _extra_buffer_types(enabled: bool):
    """llama-cpp-python builds its model params from ``llama_model_default_params()``; set
    ``use_extra_bufts`` there for the duration of one ``Llama(...)`` construction."""
    from llama_cpp import llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = enabled
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llamacpp(
    gguf_path: str | os.PathLike,
    n_ctx: int = 512,
    n_threads: int = 2,
    logits_all: bool = True,
    extra_bufts: bool = True,
):
    """A ``llama_cpp.Llama`` for ``gguf_path``.

    ``extra_bufts=True`` (default) is llama.cpp as its users run it: weight-repacking buffer types
    (AMX, CPU_REPACK) on. ``extra_bufts=False`` turns them off and runs the plain CPU kernels:
    needed on AMX (Sapphire Rapids) CPUs with llama-cpp-python 0.3.36 built with GGML_NATIVE,
    where the AMX matmul segfaults on the first eval of any Q4_0 or Q8_0 file, llama.cpp's own
    quantizations included (upstream llama.cpp issue #20824; still so on lowbit's test machine,
    so its tests and benchmarks pass ``extra_bufts=False``).
    """
    require_llama_cpp()
    from llama_cpp import Llama

    with _extra_buffer_types(extra_bufts):
        return Llama(
            str(gguf_path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )


def window_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), vocab) of exactly these token ids, from an empty context (no BOS added)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llamacpp_logits(
    gguf_path: str | os.PathLike,
    ids: list[int],
    n_threads: int = 2,
    n_ctx: int | None = None,
    extra_bufts: bool = True,
) -> np.ndarray:
    """Per-position logits (len(ids), vocab) from llama.cpp for exactly these token ids
    (``extra_bufts``: see :func:`open_llamacpp`)."""
    llm = open_llamacpp(gguf_path, n_ctx=n_ctx or max(64, len(ids)), n_threads=n_threads, extra_bufts=extra_bufts)
    try:
        return window_logits(llm, ids)
    finally:
        llm.close()


class LlamaCppLM(nn.Module):
    """A llama.cpp model behind the interface :func:`lowbit.evaluation.evaluate` calls
    (``model(input_ids=ids).logits``), so llama.cpp's points are scored by lowbit's one evaluator:
    each window is evaluated from an empty context, exactly its token ids."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        rows = [torch.from_numpy(window_logits(self.llm, window)) for window in input_ids.tolist()]
        return SimpleNamespace(logits=torch.stack(rows))


# ---------------------------------------------------------------- writing and quantizing GGUF files


def write_fp_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, name: str) -> Path:
    """Write the full-precision Llama ``model`` as an F32 GGUF file (every tensor as float32), with
    lowbit's GGUF writer (:mod:`lowbit.gguf.export`: tensor names, rotary row order, hyperparameters,
    tokenizer) and its read-back check that every tensor equals the model's."""
    from lowbit.fsio import atomic_path
    from lowbit.gguf.export import SUPPORTED_ARCHITECTURES, _collect, _rope, _write, verify_gguf
    from lowbit.gguf.tokenizer import tokenizer_metadata
    from lowbit.io import QuantizedFolder

    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    if model.config.model_type != "llama" or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise LowbitError(f"llama.cpp peers need a Llama-family model (GGUF export); {name} is {'/'.join(archs)}")
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    # A folder with no quantized layer: every tensor is written in the dtype it is stored in (F32).
    folder = QuantizedFolder(Path(name), {"quant_config": None, "info": {"base_model_id": name}, "layers": {}}, state)
    tensors = _collect(folder, model, "f32", "tq2_0")
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    tok, _ = tokenizer_metadata(tokenizer, model.config.to_dict(), n_vocab, "auto")
    out = Path(out)
    with atomic_path(out) as target:
        _write(target, folder, model.config, _rope(model.config), tok, tensors)
        verify_gguf(target, tensors)
    return out


@contextmanager
def _quiet_llama_log():
    """llama.cpp logs every tensor it quantizes through llama-cpp-python's logger: errors only."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, type_name: str, threads: int = 2) -> Path:
    """``llama_model_quantize`` (llama.cpp's own quantizer, its default parameters, no importance
    matrix) from ``src`` to ``dst`` as llama.cpp type ``type_name`` (``Q4_K_M``, ``Q8_0``, ...).
    llama.cpp falls back to other types where a tensor's rows do not fit the type's blocks:
    :func:`gguf_account` reads what it chose."""
    llama_cpp = require_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        known = sorted(
            n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")
        )
        raise LowbitError(f"unknown llama.cpp type {type_name!r}: choose from {', '.join(known)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with _quiet_llama_log():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise LowbitError(f"llama.cpp could not quantize {src} as {type_name} (llama_model_quantize returned {rc})")
    return Path(dst)


def gguf_account(path: str | os.PathLike) -> dict:
    """The bytes a GGUF file stores, as :func:`lowbit.evaluation.size_account` counts a lowbit model:
    ``total_bytes`` is every tensor's data (the file adds ``gguf_metadata_bytes`` of header,
    tokenizer and alignment: ``gguf_file_bytes`` in all); ``linear_bytes`` the decoder linears'
    (:data:`LINEAR_KINDS`). ``gguf_types`` is the type of every tensor, ``gguf_linear_types`` how
    many decoder linears got each type."""
    import gguf

    reader = gguf.GGUFReader(path)
    types, total, params, lin_bytes, lin_params, lin_types = {}, 0, 0, 0, 0, Counter()
    for t in reader.tensors:
        n_bytes, n_elements = int(t.n_bytes), int(t.n_elements)
        types[t.name] = t.tensor_type.name
        total += n_bytes
        params += n_elements
        if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_KINDS and t.name.endswith(".weight"):
            lin_bytes += n_bytes
            lin_params += n_elements
            lin_types[t.tensor_type.name] += 1
    del reader
    file_bytes = Path(path).stat().st_size
    return {
        "total_bytes": total,
        "params": params,
        "bits_per_weight": 8.0 * total / params,
        "bits_per_weight_linear": 8.0 * lin_bytes / lin_params if lin_params else None,
        "linear_bytes": lin_bytes,
        "linear_params": lin_params,
        "other_bytes": total - lin_bytes,
        "gguf_file_bytes": file_bytes,
        "gguf_metadata_bytes": file_bytes - total,
        "gguf_linear_types": dict(sorted(lin_types.items())),
        "gguf_types": types,
    }
