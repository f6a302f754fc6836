"""llama.cpp as a peer runtime (needs llama-cpp-python): open an exported GGUF file, and its logits
for given token ids (compare them with :func:`lowbit.evaluation.compare_logits`)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from lowbit.errors import LowbitError


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
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LowbitError(
            "llama.cpp comparison needs llama-cpp-python: pip install llama-cpp-python diskcache"
        ) from exc
    with _extra_buffer_types(extra_bufts):
        return Llama(
            str(gguf_path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )


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
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
