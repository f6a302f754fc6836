"""llama.cpp's own quantization types as points of a Pareto sweep (``lowbit pareto --peers llama.cpp``;
the default sweep measures them wherever llama-cpp-python imports, :func:`lowbit.pareto.spec.default_peers`).

Per model: the full-precision model is written once as an F32 GGUF file
(:func:`~lowbit.peers.llamacpp.write_fp_gguf`); each type is made from it by llama.cpp's own
quantizer (``llama_model_quantize``, default parameters, no importance matrix), run by llama.cpp
on exactly the sweep's eval windows and scored by :func:`lowbit.eval.evaluation.evaluate` against the
sweep's cached reference log-probs. Sizes are the bytes the quantized GGUF file stores per tensor
(:func:`~lowbit.peers.llamacpp.gguf_account`), whatever types llama.cpp fell back to.

llama.cpp runs with its weight-repacking buffer types off (``extra_bufts=False``, see
:func:`~lowbit.peers.llamacpp.open_llamacpp`: with them on, llama-cpp-python 0.3.36 segfaults on
AMX CPUs for Q4_0 / Q8_0); the same quantized weights, computed by llama.cpp's plain CPU kernels.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from lowbit.eval.evaluation import evaluate
from lowbit.peers.llamacpp import (
    DEFAULT_TYPES,
    LlamaCppLM,
    gguf_account,
    open_llamacpp,
    quantize_gguf,
    require_llama_cpp,
    write_fp_gguf,
)


@contextmanager
def _stderr_to(path: Path):
    """What is written to file descriptor 2 meanwhile goes to ``path``: llama.cpp's quantizer prints a
    warning per tensor that falls back to another type (hundreds on a model whose rows do not fit
    256-wide blocks), which would bury the sweep's own lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _fallback_line(log_text: str) -> str | None:
    """llama.cpp's one-line count of the tensors that fell back to another type, if it printed one."""
    lines = [line.strip() for line in log_text.splitlines() if "required fallback quantization" in line]
    return lines[-1].split("WARNING: ", 1)[-1] if lines else None


@dataclass
class LlamaCppPeer:
    """``types``: llama.cpp type names (``Q4_K_M``, ``Q8_0``...); ``threads``: llama.cpp's threads
    (default: torch's)."""

    name: ClassVar[str] = "llama.cpp"
    types: list[str] = field(default_factory=lambda: list(DEFAULT_TYPES))
    threads: int | None = None

    def check(self) -> None:
        require_llama_cpp()

    def plan(self, spec) -> list[dict]:
        # source: the GGUF llama.cpp quantizes from; repack: its weight-repacking buffer types
        return [{"peer_type": t.upper(), "source": "F32", "repack": False} for t in dict.fromkeys(self.types)]

    def version(self) -> str:
        return require_llama_cpp().__version__

    def measure(self, ctx, todo: list[dict], progress: bool, log: Callable[[str], None]) -> Iterator[tuple[dict, dict]]:
        from lowbit.eval.models import model_id

        threads = self.threads or torch.get_num_threads()
        with tempfile.TemporaryDirectory(prefix="lowbit-llamacpp-") as tmp:
            fp = write_fp_gguf(ctx.reference, ctx.tokenizer, Path(tmp) / "f32.gguf", model_id(ctx.spec))
            for settings in todo:
                yield settings, self._measure_type(ctx, fp, settings["peer_type"], threads, progress, log)

    def _measure_type(self, ctx, fp: Path, type_name: str, threads: int, progress: bool,
                      log: Callable[[str], None] = print) -> dict:  # fmt: skip
        t0 = time.perf_counter()
        quantize_log = fp.with_name(f"{type_name}.log")
        try:
            with _stderr_to(quantize_log):
                path = quantize_gguf(fp, fp.with_name(f"{type_name}.gguf"), type_name, threads)
        except Exception:
            sys.stderr.write(quantize_log.read_text(errors="replace")[-4000:])  # what llama.cpp said, on failure
            raise
        fallback = _fallback_line(quantize_log.read_text(errors="replace"))
        if fallback:
            log(f"pareto: llama.cpp {type_name}: {fallback} (rows that do not fit its blocks)")
        quantize_seconds = time.perf_counter() - t0
        size = gguf_account(path)
        llm = open_llamacpp(path, n_ctx=ctx.cache.windows.shape[1], n_threads=threads, extra_bufts=False)
        try:
            t0 = time.perf_counter()
            quality = evaluate(LlamaCppLM(llm), ctx.cache.windows, reference=ctx.cache, progress=progress)
            eval_seconds = time.perf_counter() - t0
        finally:
            llm.close()
            path.unlink()
        details = {
            k: size.pop(k) for k in ("gguf_file_bytes", "gguf_metadata_bytes", "gguf_linear_types", "gguf_types")
        }
        return {
            "size": size,
            "quality": quality,
            "quantize_seconds": quantize_seconds,
            "eval_seconds": eval_seconds,
            "details": {**details, "threads": threads},
        }
