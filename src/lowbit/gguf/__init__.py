"""GGUF export for llama.cpp: :mod:`~lowbit.gguf.quants` (GGML block packing, the exact-type plan),
:mod:`~lowbit.gguf.tokenizer` (tokenizer metadata) and :mod:`~lowbit.gguf.export` (writer,
read-back verification, report)."""

from lowbit.gguf.export import FALLBACK_TYPES, TERNARY_TYPES, GGUFTensor, TensorReport, export_gguf, verify_gguf
from lowbit.gguf.quants import dequantize_tensor

__all__ = [
    "FALLBACK_TYPES",
    "TERNARY_TYPES",
    "GGUFTensor",
    "TensorReport",
    "dequantize_tensor",
    "export_gguf",
    "verify_gguf",
]
