"""llama.cpp's block formats in numpy, and the choice of an exact one per tensor.

``k`` are the signed integer levels of a tensor and ``d`` the fp16 scale of each block; the byte
layouts follow ggml's ``block_q4_0`` / ``block_q6_K`` / ``block_q8_0`` / ``block_tq2_0`` / ``block_tq1_0``. A lowbit
tensor is written in a type only when every weight is exactly representable there (see
:func:`plan_exact` and the module docstring of :mod:`lowbit.gguf.export`).
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = {"q4_0": 32, "q6_k": 256, "q8_0": 32, "tq2_0": 256, "tq1_0": 256}
K_RANGE = {"q4_0": (-8, 7), "q6_k": (-32, 31), "q8_0": (-128, 127), "tq2_0": (-1, 1), "tq1_0": (-1, 1)}


def ggml_type(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name.upper())


def _blocks(k: np.ndarray, d: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    rows, cols = k.shape
    nb = cols // size
    return k.reshape(rows, nb, size), d.astype(np.float16).reshape(rows, nb, 1).view(np.uint8), rows, nb


def pack_q4_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0: per 32 values an fp16 ``d`` then 16 bytes; byte j holds q[j] (low) and q[j+16] (high), q = k + 8."""
    kb, db, rows, nb = _blocks(k, d, 32)
    q = (kb + 8).astype(np.uint8)
    qs = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return np.concatenate([db, qs], axis=-1).reshape(rows, nb * 18)


def pack_q6_k(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K with every 16-value sub-block scale 1, so that a value is ``d * k`` exactly: per 256 values
    128 bytes ``ql`` (low 4 bits of q = k + 32), 64 bytes ``qh`` (high 2 bits), 16 int8 scales, an fp16 ``d``.

    Per half of 128 values: value ``v < 64`` in the low nibble of ``ql[v]``, ``v >= 64`` in the high
    nibble of ``ql[v - 64]``; value ``32 j + m`` has its high bits at bits ``2 j`` of ``qh[m]``.
    """
    kb, db, rows, nb = _blocks(k, d, 256)
    q = (kb + 32).astype(np.uint8).reshape(rows, nb, 2, 128)
    lo, hi = q & np.uint8(0x0F), q >> np.uint8(4)
    ql = lo[..., :64] | (lo[..., 64:] << np.uint8(4))
    qh = hi[..., :32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:] << 6)
    scales = np.ones((rows, nb, 16), dtype=np.uint8)
    return np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), scales, db], axis=-1).reshape(
        rows, nb * 210
    )


def pack_q8_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0: per 32 values an fp16 ``d`` then 32 int8 values."""
    kb, db, rows, nb = _blocks(k, d, 32)
    return np.concatenate([db, kb.astype(np.int8).view(np.uint8)], axis=-1).reshape(rows, nb * 34)


def pack_tq2_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ2_0: per 256 values 64 bytes of 2-bit q = k + 1 then an fp16 ``d``.

    Each half of the block (128 values) is 32 bytes; value ``l*32 + m`` of a half sits in byte m
    at bits ``2l``.
    """
    kb, db, rows, nb = _blocks(k, d, 256)
    q = (kb + 1).astype(np.uint8).reshape(rows, nb, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return np.concatenate([qs.reshape(rows, nb, 64), db], axis=-1).reshape(rows, nb * 66)


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _base3_bytes(q: np.ndarray, digits: int) -> np.ndarray:
    """Combine ``digits`` trits along axis -2 (most significant first) into a byte holding the
    fixed-point fraction ceil(value * 256 / 243), as TQ1_0 stores them."""
    value = (q.astype(np.int32) * _POW3[:digits].reshape(digits, 1)).sum(axis=-2)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def pack_tq1_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ1_0: per 256 values 48 bytes of 5 trits, 4 bytes of 4 trits, then an fp16 ``d`` (54 bytes).

    Values 0..159 fill 32 bytes (trit n of byte m is value n*32+m), values 160..239 fill 16 bytes
    (value 160 + n*16 + m) and values 240..255 fill the 4 ``qh`` bytes (value 240 + n*4 + m).
    """
    kb, db, rows, nb = _blocks(k, d, 256)
    q = (kb + 1).astype(np.uint8)
    qs0 = _base3_bytes(q[..., :160].reshape(rows, nb, 5, 32), 5)
    qs1 = _base3_bytes(q[..., 160:240].reshape(rows, nb, 5, 16), 5)
    qh = _base3_bytes(q[..., 240:].reshape(rows, nb, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, db], axis=-1).reshape(rows, nb * 54)


PACKERS = {"q4_0": pack_q4_0, "q6_k": pack_q6_k, "q8_0": pack_q8_0, "tq2_0": pack_tq2_0, "tq1_0": pack_tq1_0}


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """llama.cpp's reference Q8_0 quantization (absmax / 127 per 32, round half away from zero).

    Used only for ``--fallback q8_0``: this *re-quantizes* and its error is reported.
    """
    rows, cols = w.shape
    wb = w.astype(np.float32).reshape(rows, cols // 32, 32)
    d = np.abs(wb).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = wb * inv
    k = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
    return pack_q8_0(k.reshape(rows, cols), d.reshape(rows, cols // 32))


def _group_len(group_size: int | None, cols: int) -> int | None:
    """Inputs per lowbit group along a row; None for one scale per tensor."""
    if group_size == 0:
        return None
    return cols if group_size is None else group_size


def _expand(values: torch.Tensor, rows: int, cols: int, group_size: int | None) -> np.ndarray:
    """Per-group (R or 1, G or 1) values -> per element (rows, cols), float64."""
    v = values.double()
    g = _group_len(group_size, cols)
    col_group = torch.zeros(cols, dtype=torch.long) if g is None else torch.arange(cols) // g
    col_group = col_group.clamp(max=v.shape[1] - 1)
    return v[:, col_group].expand(rows, cols).numpy()


def exact_candidates(ternary: str) -> list[str]:
    return [ternary, "q4_0", "q6_k", "q8_0"]


def plan_exact(
    codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, group_size: int | None, ternary: str = "tq2_0"
) -> tuple[str | None, np.ndarray | None, list[str]]:
    """(type, packed bytes, reasons) for the first exactly representable type, or (None, None, reasons)."""
    rows, cols = codes.shape
    g = _group_len(group_size, cols)
    z = _expand(zero, rows, cols, group_size)
    if np.all(z == np.round(z)):
        c = 1
    elif np.all(2 * z == np.round(2 * z)):
        c = 2
    else:
        return None, None, ["zero points are not integers or half-integers"]
    k = np.round(c * (codes.numpy().astype(np.float64) - z)).astype(np.int32)
    kmin, kmax = int(k.min()), int(k.max())
    d_el = _expand(step, rows, cols, group_size) / c
    reasons = []
    for qtype in exact_candidates(ternary):
        size = BLOCK[qtype]
        lo, hi = K_RANGE[qtype]
        if cols % size:
            reasons.append(f"{qtype}: row length {cols} is not a multiple of {size}")
            continue
        if g is not None and g % size:
            reasons.append(f"{qtype}: group size {g} is not a multiple of the {size}-value block")
            continue
        if kmin < lo or kmax > hi:
            reasons.append(f"{qtype}: integer levels {kmin}..{kmax} outside {lo}..{hi}")
            continue
        d = d_el[:, ::size]
        d16 = d.astype(np.float16)
        if not (np.all(np.isfinite(d16)) and np.array_equal(d16.astype(np.float64), d)):
            reasons.append(f"{qtype}: step / {c} is not exactly representable in fp16")
            continue
        return qtype, PACKERS[qtype](k, d16), reasons
    return None, None, reasons


def pack_fallback(w: np.ndarray, fallback: str) -> tuple[str, np.ndarray, str | None]:
    """(type, data, note) for a tensor written in the fallback type."""
    if fallback == "q8_0":
        if w.shape[1] % 32 == 0:
            return "q8_0", quantize_q8_0(w), None
        return (
            "f16",
            w.astype(np.float16),
            f"q8_0 impossible: row length {w.shape[1]} is not a multiple of 32; wrote f16",
        )
    if fallback == "f32":
        return "f32", w.astype(np.float32), None
    return "f16", w.astype(np.float16), None


def hp_array(tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A high-precision tensor in the dtype it was stored in."""
    if tensor.dtype == torch.float16:
        return "f16", tensor.numpy()
    if tensor.dtype == torch.bfloat16:
        return "bf16", tensor.view(torch.int16).numpy().view(np.uint8).reshape(tensor.shape[0], -1)
    return "f32", tensor.float().numpy()


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in (rows, cols) / (n,) order."""
    from gguf.quants import dequantize

    shape = [int(s) for s in reversed(tensor.shape)]
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name == "BF16":
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = dequantize(data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape)
