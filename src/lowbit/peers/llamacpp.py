"""llama.cpp as a peer runtime (needs llama-cpp-python): open a GGUF file, its logits for given
token ids (compare them with :func:`lowbit.eval.evaluation.compare_logits`, or evaluate
:class:`LlamaCppLM` with :func:`lowbit.eval.evaluation.evaluate`), llama.cpp's own quantizer
(:func:`quantize_gguf`) and the bytes a GGUF file stores per tensor (:func:`gguf_account`)."""

from __future__ import annotations

import functools
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


# Types whose tensors llama.cpp's CPU_REPACK buffer repacks (interleaved rows for its AVX2 /
# AVX-512 GEMV/GEMM kernels) in llama-cpp-python 0.3.36; a tensor of another type placed in it
# crashes llama.cpp, so only these are overridden there (as its own buffer selection would do).
REPACK_TYPES = ("Q4_0", "IQ4_NL", "Q4_K")


@functools.cache
def extra_buffer_types() -> dict[str, int]:
    """llama.cpp's extra CPU buffer types on this machine, name -> ``ggml_backend_buffer_type_t``
    (e.g. ``{"AMX": ..., "CPU_REPACK": ...}`` on a Sapphire Rapids CPU), read through ggml's
    backend registry in the libraries llama-cpp-python ships."""
    import ctypes

    llama_cpp = require_llama_cpp()
    libdir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(libdir / "libggml.so"))
    base = ctypes.CDLL(str(libdir / "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    llama_cpp.llama_backend_init()
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return {}
    fn = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return {}
    arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    out, i = {}, 0
    while arr and arr[i]:
        out[base.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
        i += 1
    return out


def repack_mode(extra_bufts: bool = True) -> str:
    """How :func:`open_llamacpp` runs llama.cpp's weight repacking here: ``"off"``, ``"default"``
    (its extra buffer types, as its users run it) or ``"cpu_repack"`` (AMX CPUs: the CPU_REPACK
    buffer for every tensor of :data:`REPACK_TYPES`, without the AMX buffer, whose matmul
    segfaults in llama-cpp-python 0.3.36; llama.cpp's upstream issue #20824)."""
    if not extra_bufts:
        return "off"
    return "cpu_repack" if "AMX" in extra_buffer_types() else "default"


def _repack_overrides(gguf_path):
    """A ``llama_model_tensor_buft_override`` array placing every decoder tensor of
    :data:`REPACK_TYPES` in the CPU_REPACK buffer (None when the file has none)."""
    import ctypes

    import gguf

    names = [
        t.name for t in gguf.GGUFReader(gguf_path).tensors
        if t.tensor_type.name in REPACK_TYPES and t.name.startswith("blk.") and len(t.shape) == 2
    ]
    buft = extra_buffer_types().get("CPU_REPACK")
    if not names or not buft:
        return None

    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    pattern = "^(" + "|".join(n.replace(".", "\\.") for n in names) + ")$"
    return (Override * 2)(Override(pattern.encode(), buft), Override(None, None))


@contextmanager
def _model_params(extra_bufts: bool, overrides=None):
    """llama-cpp-python builds its model params from ``llama_model_default_params()``; set
    ``use_extra_bufts`` (and buffer-type overrides) there for one ``Llama(...)`` construction."""
    import ctypes

    from llama_cpp import llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = extra_bufts
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
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

    ``extra_bufts=True`` (default) is llama.cpp as its users run it: weight repacking on. On CPUs
    with AMX that is the CPU_REPACK buffer alone (:func:`repack_mode`): llama-cpp-python 0.3.36
    segfaults in the AMX matmul at the first eval of any Q4_0 or Q8_0 file (upstream llama.cpp
    issue #20824; so on lowbit's test machine). ``extra_bufts=False`` runs llama.cpp's plain CPU
    kernels on the file's own layout.
    """
    require_llama_cpp()
    from llama_cpp import Llama

    mode = repack_mode(extra_bufts)
    overrides = _repack_overrides(gguf_path) if mode == "cpu_repack" else None
    with _model_params(mode == "default", overrides):
        llm = Llama(
            str(gguf_path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
    llm._lowbit_keep = overrides  # the override array must outlive the model
    llm.lowbit_repack = mode
    return llm


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
    """A llama.cpp model behind the interface :func:`lowbit.eval.evaluation.evaluate` calls
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
    from lowbit.gguf.export import SUPPORTED_ARCHITECTURES, _collect, _rope, _write, verify_gguf
    from lowbit.gguf.tokenizer import tokenizer_metadata
    from lowbit.store.folder import QuantizedFolder
    from lowbit.store.fsio import atomic_path

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
    """The bytes a GGUF file stores, as :func:`lowbit.eval.evaluation.size_account` counts a lowbit model:
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
