"""The ctypes mirrors of the C structs (``lb_weight``, ``lb_layer`` in lowbit.h), their check
against the library's own sizes and offsets, and :func:`weight_struct`, which describes a packed
weight to the C code."""

from __future__ import annotations

import ctypes

import torch

from lowbit.errors import LowbitError
from lowbit.quant.packing import row_bytes

FORMAT_IDS = {"u1": 1, "u2": 2, "u3": 3, "u4": 4, "t5": 5, "u8": 8}
SCALE_TYPES = {torch.float32: 0, torch.float16: 1, torch.uint8: 2}


class _Weight(ctypes.Structure):
    """Mirror of ``lb_weight`` in lowbit.h."""

    _fields_ = [
        ("fmt", ctypes.c_int32),
        ("step_type", ctypes.c_int32),
        ("zero_type", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("packed", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("group", ctypes.c_int64),
        ("step", ctypes.c_void_p),
        ("step_rs", ctypes.c_int64),
        ("step_gs", ctypes.c_int64),
        ("zero", ctypes.c_void_p),
        ("zero_rs", ctypes.c_int64),
        ("zero_gs", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    """Mirror of ``lb_layer`` in lowbit.h (one decoder block for :func:`decode_layers`)."""

    _fields_ = [
        ("qkv", ctypes.POINTER(_Weight)),
        ("o", ctypes.POINTER(_Weight)),
        ("gate_up", ctypes.POINTER(_Weight)),
        ("down", ctypes.POINTER(_Weight)),
        ("ln1", ctypes.c_void_p),
        ("ln2", ctypes.c_void_p),
        ("kcache", ctypes.c_void_p),
        ("vcache", ctypes.c_void_p),
        ("hidden", ctypes.c_int64),
        ("nh", ctypes.c_int64),
        ("nkv", ctypes.c_int64),
        ("hd", ctypes.c_int64),
        ("inter", ctypes.c_int64),
        ("max_len", ctypes.c_int64),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("q8", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


# The ctypes mirror of each C struct that lb_struct_layout describes.
MIRRORS = {"lb_weight": _Weight, "lb_layer": _Layer}


def check_struct_layouts(lib: ctypes.CDLL, mirrors: dict | None = None) -> int:
    """Compare the C structs' sizes and field offsets (``lb_struct_layout``) with their ctypes
    mirrors; raise LowbitError naming every difference. Returns the number of entries checked."""
    mirrors = MIRRORS if mirrors is None else mirrors
    problems = []
    name = ctypes.c_char_p()
    i = 0
    while (value := lib.lb_struct_layout(i, ctypes.byref(name))) >= 0:
        i += 1
        struct, _, field = name.value.decode().partition(".")
        mirror = mirrors.get(struct)
        if mirror is None:
            problems.append(f"{struct} has no ctypes mirror")
            continue
        if not field:
            got = ctypes.sizeof(mirror)
        elif field in dict(mirror._fields_):
            got = getattr(mirror, field).offset
        else:
            problems.append(f"{mirror.__name__} lacks the field {field!r} of {struct}")
            continue
        if got != value:
            what = f"offset of {struct}.{field}" if field else f"size of {struct}"
            problems.append(f"{what}: C {value}, ctypes {mirror.__name__} {got}")
    if problems:
        raise LowbitError("lowbit kernels: the ctypes mirrors do not match the C structs: " + "; ".join(problems))
    return i


def _scale_ptr(t: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    if t.dim() != 2 or t.dtype not in SCALE_TYPES:
        raise LowbitError(f"{what} must be a 2-d float32, float16 or uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    rs = t.stride(0) if t.shape[0] > 1 else 0
    gs = t.stride(1) if t.shape[1] > 1 else 0
    return t.data_ptr(), SCALE_TYPES[t.dtype], rs, gs


def has_kernel(layout: str) -> bool:
    """Whether the C kernels read ``layout`` (u6 has none: PackedLinear dequantizes it in PyTorch)."""
    return layout in FORMAT_IDS


def check_weight(packed: torch.Tensor, layout: str, cols: int, group_size: int | None, step: torch.Tensor,
                 zero: torch.Tensor, bias: torch.Tensor | None = None) -> int:  # fmt: skip
    """Refuse buffers that do not describe a packed (rows, ``cols``) weight in ``layout`` (any layout of
    :mod:`lowbit.quant.packing`, with or without a kernel); returns the group length."""
    rows = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes(layout, cols):
        raise LowbitError(
            f"packed weight must be uint8 ({rows}, {row_bytes(layout, cols)}), got {packed.dtype} {tuple(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise LowbitError("packed weight must be contiguous")
    group = cols if not group_size else min(group_size, cols)
    n_groups = -(-cols // group)
    for t, what in ((step, "step"), (zero, "zero")):
        if t.dim() != 2 or t.dtype not in SCALE_TYPES:
            raise LowbitError(f"{what} must be a 2-d float32, float16 or uint8 tensor, got {t.dtype} {tuple(t.shape)}")
        if t.shape[0] not in (1, rows) or t.shape[1] not in (1, n_groups):
            raise LowbitError(f"{what} of shape {tuple(t.shape)} does not fit {rows} rows x {n_groups} groups")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (rows,) or not bias.is_contiguous()):
        raise LowbitError(f"bias must be a contiguous float32 tensor of shape ({rows},)")
    return group


def weight_struct(packed: torch.Tensor, layout: str, cols: int, group_size: int | None, step: torch.Tensor,
                  zero: torch.Tensor, bias: torch.Tensor | None = None) -> _Weight:  # fmt: skip
    """Describe a packed weight to the C code. The tensors must outlive the struct."""
    if not has_kernel(layout):
        raise LowbitError(f"no kernel for layout {layout!r}")
    group = check_weight(packed, layout, cols, group_size, step, zero, bias)
    rows = packed.shape[0]
    s_ptr, s_type, s_rs, s_gs = _scale_ptr(step, "step")
    z_ptr, z_type, z_rs, z_gs = _scale_ptr(zero, "zero")
    return _Weight(
        FORMAT_IDS[layout],
        s_type,
        z_type,
        0,
        packed.data_ptr(),
        packed.shape[1],
        rows,
        cols,
        group,
        s_ptr,
        s_rs,
        s_gs,
        z_ptr,
        z_rs,
        z_gs,
        bias.data_ptr() if bias is not None else None,
    )
