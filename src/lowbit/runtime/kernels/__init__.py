"""CPU kernels for packed low-bit weights: the C sources of this folder compiled with gcc at first use, called via ctypes.

The shared library is built once per (sources, flags, compiler) into
``$LOWBIT_CACHE/<sha>/liblowbit.so`` (:mod:`lowbit.runtime.kernels.build`; the hash covers every ``*.c``
and ``*.h`` here). At load the sizes and field offsets of the C structs (``lb_struct_layout``) are
checked against their ctypes mirrors (:mod:`lowbit.runtime.kernels.structs`).
It holds an AVX2+FMA path and a portable C path; the C code picks one at run time from the CPU
flags. Without a compiler (or with ``LOWBIT_KERNELS=0``) :func:`available` is False and callers
use the pure-PyTorch reference path; a missing compiler is reported by one warning.

The kernels read the row-major layouts of :mod:`lowbit.quant.packing` directly (no repacking): every
layout but u6 (6-bit codes; :func:`has_kernel` is False and PackedLinear dequantizes it in PyTorch)
decodes in registers (t5 with groups that are not multiples of 40 through a decoded row).
Two matvec families: :func:`linear` keeps the activations in float32 (exact up to summation
order); :func:`linear_q8` rounds them to int8 per block of 32 (as llama.cpp does) and runs integer
dot products (AVX-VNNI / AVX512-VNNI ``vpdpbusd`` when the CPU has it, else AVX2 ``vpmaddubsw``)
on u1/u2/u4/u8 codes: 2-3x fewer instructions per weight. :func:`linear_f16` multiplies by an
fp16 matrix (unquantized layers such as a tied output head); :func:`dequantize` decodes to
float32; :func:`decode_layers` runs a single-token step of every decoder block.
Building takes about 10 s of one core, once per machine and source version.
Threads: OpenMP over output rows, ``get_num_threads()`` (default ``torch.get_num_threads()``).
Environment: ``LOWBIT_KERNELS=0`` disables the kernels, ``LOWBIT_ISA=portable`` forces the
portable C path in every entry point (any other value: the best path the CPU has), ``CC`` picks
the compiler, ``LOWBIT_CACHE`` the cache folder.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import warnings

import torch

from lowbit.errors import LowbitError

# re-exported: the package's API predates the split into build / structs
from lowbit.runtime.kernels.build import BASE_FLAGS, HEADERS, LIBS, SOURCES, cache_dir, compile_library, compiler  # noqa: F401
from lowbit.runtime.kernels.structs import (  # noqa: F401
    FORMAT_IDS,
    MIRRORS,
    SCALE_TYPES,
    _Layer,
    _Weight,
    check_struct_layouts,
    check_weight,
    has_kernel,
    weight_struct,
)

ISA_NAMES = {0: "portable", 1: "avx2"}
_ISA_IDS = {"portable": 0, "avx2": 1}
# The int8-activation path's vector code: AVX2 (vpmaddubsw) or a VNNI dot-product instruction.
Q8_ISA_NAMES = {0: "portable", 1: "avx2", 2: "avxvnni", 3: "avx512vnni", 4: "avx512vnni-zmm"}
_Q8_ISA_IDS = {v: k for k, v in Q8_ISA_NAMES.items()}
_ERRORS = {
    -1: "unknown packing layout",
    -2: "out of memory",
    -3: "AVX2 requested on a CPU without it",
    -4: "invalid weight description or argument",
    -5: "the int8-activation path does not take this layout / group size (use the float path)",
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_load_failed = False
_num_threads: int | None = None


def _setup(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr = ctypes.POINTER(_Weight)
    lib.lb_linear.argtypes = [ptr, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.lb_linear.restype = ctypes.c_int
    lib.lb_dequantize.argtypes = [ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.lb_dequantize.restype = ctypes.c_int
    lib.lb_f16_to_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.lb_f16_to_f32.restype = None
    lib.lb_isa.restype = ctypes.c_int
    lib.lb_linear_q8.argtypes = lib.lb_linear.argtypes
    lib.lb_linear_q8.restype = ctypes.c_int
    lib.lb_q8_supported.argtypes = [ptr]
    lib.lb_q8_supported.restype = ctypes.c_int
    lib.lb_q8_isa_id.restype = ctypes.c_int
    lib.lb_linear_f16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.lb_linear_f16.restype = ctypes.c_int
    lib.lb_decode_layers.argtypes = [ctypes.POINTER(_Layer), ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.lb_decode_layers.restype = ctypes.c_int
    lib.lb_q8_round.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_int]
    lib.lb_q8_round.restype = ctypes.c_int
    lib.lb_q8_isa_ok.argtypes = [ctypes.c_int]
    lib.lb_q8_isa_ok.restype = ctypes.c_int
    lib.lb_openmp.restype = ctypes.c_int
    lib.lb_struct_layout.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.lb_struct_layout.restype = ctypes.c_int64
    check_struct_layouts(lib)
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None (after one warning) if that fails."""
    global _lib, _load_failed
    if _lib is not None or _load_failed:
        return _lib
    with _lock:
        if _lib is not None or _load_failed:
            return _lib
        cc = compiler()
        problem = "no C compiler found (install gcc or set CC)"
        if cc is not None:
            for flags in (BASE_FLAGS + ["-fopenmp"], BASE_FLAGS):  # without OpenMP: one thread
                try:
                    _lib = _setup(ctypes.CDLL(str(compile_library(cc, flags))))
                    break
                except (OSError, subprocess.CalledProcessError) as exc:
                    detail = getattr(exc, "stderr", None) or str(exc)
                    problem = f"building the kernels with {cc} failed: {detail.strip()[:500]}"
        if _lib is None:
            _load_failed = True
            warnings.warn(
                f"lowbit: {problem}; packed layers use the slower pure-PyTorch path", RuntimeWarning, stacklevel=2
            )
    return _lib


def enabled() -> bool:
    """False when ``LOWBIT_KERNELS=0``."""
    return os.environ.get("LOWBIT_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """True when the kernels are enabled and the library could be built and loaded."""
    return enabled() and load() is not None


def isa() -> str | None:
    """The code path the kernels run: "avx2", "portable", or None when unavailable."""
    if not available():
        return None
    return ISA_NAMES[0 if _isa_id() == 0 else int(load().lb_isa())]


def _isa_id() -> int:
    """-1 lets the C code pick (AVX2 when the CPU has it); 0 forces the portable path."""
    return 0 if os.environ.get("LOWBIT_ISA", "").strip().lower() == "portable" else -1


def has_openmp() -> bool:
    lib = load()
    return bool(lib is not None and lib.lb_openmp())


def set_num_threads(n: int | None) -> None:
    """Threads for the kernels; None follows ``torch.get_num_threads()``."""
    global _num_threads
    if n is not None and n < 1:
        raise LowbitError(f"number of kernel threads must be at least 1, got {n}")
    _num_threads = n


def get_num_threads() -> int:
    return _num_threads if _num_threads is not None else torch.get_num_threads()


def _check(code: int) -> None:
    if code == -2:
        raise MemoryError("lowbit kernel: out of memory")
    if code:
        raise LowbitError(f"lowbit kernel failed: {_ERRORS.get(code, code)}")


def _checked(x: torch.Tensor, weight: _Weight, out: torch.Tensor | None) -> tuple[ctypes.CDLL, torch.Tensor]:
    """The library and the output tensor for a checked kernel call on input ``x``."""
    lib = load()
    if lib is None:
        raise LowbitError("lowbit kernels are not available (see the warning above)")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != weight.cols or not x.is_contiguous():
        raise LowbitError(
            f"kernel input must be contiguous float32 (batch, {weight.cols}), got {x.dtype} {tuple(x.shape)}"
        )
    if out is None:
        out = torch.empty(x.shape[0], weight.rows, dtype=torch.float32)
    return lib, out


def linear(x: torch.Tensor, weight: _Weight, out: torch.Tensor | None = None, isa: str | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` for contiguous float32 ``x`` (batch, cols); ``isa`` forces "avx2"/"portable"."""
    lib, out = _checked(x, weight, out)
    isa_id = _isa_id() if isa is None else _ISA_IDS[isa]
    threads = _num_threads or torch.get_num_threads()
    code = lib.lb_linear(ctypes.byref(weight), x.data_ptr(), x.shape[0], out.data_ptr(), threads, isa_id)
    if code:
        _check(code)
    return out


def q8_supported(weight: _Weight) -> bool:
    """Whether :func:`linear_q8` takes this weight: layouts u1/u2/u4/u8 whose groups are whole
    32-byte units, the whole row, or an even split of a unit into 4-code lanes (u3, t5 and odd
    groups run the float kernels)."""
    lib = load()
    return bool(lib is not None and lib.lb_q8_supported(ctypes.byref(weight)))


def q8_isa() -> str | None:
    """The vector code of the int8-activation path on this CPU ("avxvnni", "avx512vnni", "avx2",
    "portable"), or None when the kernels are unavailable."""
    if not available():
        return None
    return Q8_ISA_NAMES[0 if _isa_id() == 0 else int(load().lb_q8_isa_id())]


# Inputs up to which linear_q8 beats dequantize + fp32 GEMM: its 512-bit code path multiplies 4
# inputs per pass over the weights (benchmarks/bench_matvec.py); the others decode the weights for
# every input, so above the one-token range (16) a GEMM wins. 64: where 4-bit g32 breaks even
# with the GEMM on a default-model prompt (2-bit: at ~128), on an AVX-512 Xeon.
Q8_GEMM_MAX_BATCH = 64
_q8_batch_limit: int | None = None


def q8_batch_limit(default: int) -> int:
    """How many inputs :func:`linear_q8` takes before dequantize + GEMM is faster: ``Q8_GEMM_MAX_BATCH``
    on the 512-bit code path, else ``default``."""
    global _q8_batch_limit
    if _q8_batch_limit is None:
        _q8_batch_limit = Q8_GEMM_MAX_BATCH if q8_isa() == "avx512vnni-zmm" else 0
    return _q8_batch_limit or default


def q8_isa_ok(name: str) -> bool:
    """Whether this CPU can run the int8 path's ``name`` code (see :data:`Q8_ISA_NAMES`)."""
    lib = load()
    return bool(lib is not None and lib.lb_q8_isa_ok(_Q8_ISA_IDS[name]))


def linear_q8(
    x: torch.Tensor, weight: _Weight, out: torch.Tensor | None = None, isa: str | None = None
) -> torch.Tensor:
    """``q8(x) @ W^T + bias`` with integer dot products: each row of ``x`` is quantized per block
    of 32 columns to ``d * q`` (``d = max|x| / 127``, ``q = round(x * (1 / d))``, int8), as
    llama.cpp does for its CPU matvec. Exact integer sums, float32 scaling: the result equals
    ``F.linear(d * q, W) + bias`` up to float32 summation order. ``isa`` forces one of
    :data:`Q8_ISA_NAMES`; raises LowbitError for weights :func:`q8_supported` rejects."""
    lib, out = _checked(x, weight, out)
    isa_id = (0 if _isa_id() == 0 else -1) if isa is None else _Q8_ISA_IDS[isa]
    threads = _num_threads or torch.get_num_threads()
    code = lib.lb_linear_q8(ctypes.byref(weight), x.data_ptr(), x.shape[0], out.data_ptr(), threads, isa_id)
    if code:
        _check(code)
    return out


def q8_round(x: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """``x`` (contiguous float32, 2-d) rounded as :func:`linear_q8` rounds its input: per block of
    32 columns ``d * round(x / d)`` with ``d = max|x| / 127``, in float32 (bit-identical with
    :func:`lowbit.runtime.packed_linear.q8_round`); for paths that multiply the rounded input in float."""
    lib = load()
    if lib is None:
        raise LowbitError("lowbit kernels are not available (see the warning above)")
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        raise LowbitError(f"q8_round input must be a contiguous 2-d float32 tensor, got {x.dtype} {tuple(x.shape)}")
    out = torch.empty_like(x)
    isa_id = _isa_id() if isa is None else _ISA_IDS[isa]
    _check(lib.lb_q8_round(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), get_num_threads(), isa_id))
    return out


def linear_f16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: str | None = None
) -> torch.Tensor:
    """``x @ W^T + bias`` for an fp16 weight (rows, cols) and float32 ``x`` (batch, cols), read in
    fp16 (each half converted in registers, float32 sums): for unquantized layers a packed model
    keeps in fp16, such as the tied output head."""
    lib = load()
    if lib is None:
        raise LowbitError("lowbit kernels are not available (see the warning above)")
    if weight.dtype != torch.float16 or weight.dim() != 2 or not weight.is_contiguous():
        raise LowbitError(f"weight must be a contiguous 2-d float16 tensor, got {weight.dtype} {tuple(weight.shape)}")
    rows, cols = weight.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != cols or not x.is_contiguous():
        raise LowbitError(f"kernel input must be contiguous float32 (batch, {cols}), got {x.dtype} {tuple(x.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (rows,) or not bias.is_contiguous()):
        raise LowbitError(f"bias must be a contiguous float32 tensor of shape ({rows},)")
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    isa_id = _isa_id() if isa is None else _ISA_IDS[isa]
    threads = _num_threads or torch.get_num_threads()
    _check(
        lib.lb_linear_f16(
            weight.data_ptr(), rows, cols, None if bias is None else bias.data_ptr(), x.data_ptr(), x.shape[0],
            out.data_ptr(), threads, isa_id,
        )
    )
    return out


def run_unchecked(x: torch.Tensor, weight: _Weight, int8: bool) -> torch.Tensor:
    """:func:`linear` / :func:`linear_q8` without the argument checks, for PackedLinear's decode
    path (one call per layer per token), whose buffers and input the caller has checked."""
    lib = _lib
    out = torch.empty(x.shape[0], weight.rows, dtype=torch.float32)
    fn = lib.lb_linear_q8 if int8 else lib.lb_linear
    code = fn(ctypes.byref(weight), x.data_ptr(), x.shape[0], out.data_ptr(), _num_threads or torch.get_num_threads(),
              _isa_id())
    if code:
        _check(code)
    return out


def bound_linear(weight: _Weight, int8: bool, keep=None):
    """``run_unchecked`` with everything but the input bound once (library function, weight
    pointer, threads, code path); ``keep`` is held so that the buffers outlive the callable."""
    lib = load()
    fn = lib.lb_linear_q8 if int8 else lib.lb_linear
    ref, rows = ctypes.byref(weight), weight.rows
    threads, isa_id = get_num_threads(), _isa_id()
    empty, f32 = torch.empty, torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        out = empty(x.shape[0], rows, dtype=f32)
        code = fn(ref, x.data_ptr(), x.shape[0], out.data_ptr(), threads, isa_id)
        if code:
            _check(code)
        return out

    run.keep = (weight, keep)
    return run


def decode_layers(layers, x: torch.Tensor, pos: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                  scratch: torch.Tensor, isa: str | None = None) -> None:
    """Run every decoder block of ``layers`` (a ctypes array of :class:`_Layer`) on one token's
    hidden state ``x`` (float32, contiguous, updated in place) at position ``pos``; ``cos`` /
    ``sin_signed`` are that position's RoPE rows. Used by :class:`lowbit.runtime.decoder.Decoder`.
    ``isa`` forces "avx2"/"portable" (default: ``LOWBIT_ISA``); int8 layers then run the int8
    path's portable code, or its best vector code."""
    isa_id = _isa_id() if isa is None else _ISA_IDS[isa]
    code = _lib.lb_decode_layers(layers, len(layers), x.data_ptr(), pos, cos.data_ptr(), sin_signed.data_ptr(),
                                 scratch.data_ptr(), _num_threads or torch.get_num_threads(), isa_id)
    if code:
        _check(code)


def dequantize(
    weight: _Weight, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None, isa: str | None = None
) -> torch.Tensor:
    """The float32 weight ``step * (code - zero)`` (only ``rows=(r0, r1)`` if given), bit-exact
    with ``QuantizedWeight.dequantize`` on every code path (``isa`` forces one, as for :func:`linear`)."""
    lib = load()
    if lib is None:
        raise LowbitError("lowbit kernels are not available (see the warning above)")
    r0, r1 = rows if rows is not None else (0, weight.rows)
    if not 0 <= r0 <= r1 <= weight.rows:
        raise LowbitError(f"row range {r0}:{r1} outside 0:{weight.rows}")
    if out is None:
        out = torch.empty(r1 - r0, weight.cols, dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (r1 - r0, weight.cols) or not out.is_contiguous():
        raise LowbitError(f"out must be a contiguous float32 tensor of shape ({r1 - r0}, {weight.cols})")
    isa_id = _isa_id() if isa is None else _ISA_IDS[isa]
    _check(lib.lb_dequantize(ctypes.byref(weight), r0, r1, out.data_ptr(), get_num_threads(), isa_id))
    return out


def half_to_float(h: torch.Tensor) -> torch.Tensor:
    """The C code's fp16 -> fp32 conversion (exposed for tests)."""
    h = h.contiguous()
    out = torch.empty(h.shape, dtype=torch.float32)
    load().lb_f16_to_f32(h.data_ptr(), out.data_ptr(), h.numel())
    return out
