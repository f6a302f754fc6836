"""Pack integer codes at their true bit-width (row-major, little-endian within each byte;
docs/methods.md, "lowbit packing").

Layouts (name -> codes per byte):
- ``u1``: 1-bit, 8 codes per byte;      ``u2``: 2-bit, 4 per byte (also ternary for speed);
- ``u3``: 3-bit, 8 codes in 3 bytes;    ``u4``: 4-bit, 2 per byte;     ``u8``: 1 per byte;
- ``u6``: 6-bit, 4 codes in 3 bytes (code i of a group at bits ``6i`` of the 24-bit little-endian word);
- ``t5``: ternary base-3, 5 trits per byte (3^5 = 243 <= 256), 1.6 bits per code.

Each row is packed on its own (padded with zero codes to whole bytes), so a row's bytes start
at ``row * row_bytes``: kernels can split work by rows.
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import LowbitError

LAYOUT_BITS = {"u1": 1, "u2": 2, "u3": 3, "u4": 4, "u6": 6, "u8": 8}
LAYOUT_LEVELS = {"u1": 2, "u2": 4, "u3": 8, "u4": 16, "u6": 64, "u8": 256, "t5": 3}


def default_layout(n_levels: int) -> str:
    """The smallest layout that holds ``n_levels`` codes (base-3 for ternary)."""
    if n_levels == 3:
        return "t5"
    for name in ("u1", "u2", "u3", "u4", "u6", "u8"):
        if n_levels <= LAYOUT_LEVELS[name]:
            return name
    raise LowbitError(f"cannot pack {n_levels} levels into at most 8 bits")


def _group_shape(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte group of ``bits``-bit codes: (8, 3) for u3, (4, 3) for
    u6, (8 / bits, 1) for u1/u2/u4 and (1, 1) for u8."""
    per = math.lcm(bits, 8) // bits
    return per, bits * per // 8


def row_bytes(layout: str, cols: int) -> int:
    if layout == "t5":
        return -(-cols // 5)
    per, n_bytes = _group_shape(LAYOUT_BITS[layout])
    return n_bytes * -(-cols // per)


def layout_bits_per_code(layout: str) -> float:
    return 1.6 if layout == "t5" else float(LAYOUT_BITS[layout])


def pack_codes(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack uint8 codes (rows, cols) into uint8 (rows, row_bytes(layout, cols))."""
    if layout not in LAYOUT_LEVELS:
        raise LowbitError(f"unknown packing layout {layout!r}: choose one of {', '.join(LAYOUT_LEVELS)}")
    codes = codes.to(torch.uint8)
    if codes.numel() and int(codes.max()) >= LAYOUT_LEVELS[layout]:
        raise LowbitError(f"codes up to {int(codes.max())} do not fit layout {layout}")
    rows, cols = codes.shape
    if layout == "t5":
        c = _pad_cols(codes, 5).reshape(rows, -(-cols // 5), 5).to(torch.int32)
        weights = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
        return (c * weights).sum(-1).to(torch.uint8)
    bits = LAYOUT_BITS[layout]
    if bits == 8:
        return codes.clone()
    per, n_bytes = _group_shape(bits)  # codes per group of n_bytes bytes
    c = _pad_cols(codes, per).reshape(rows, -(-cols // per), per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    word = (c << shifts).sum(-1)  # up to 24 bits for u3 and u6
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(n_bytes)], -1)
    return out.reshape(rows, row_bytes(layout, cols)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, layout: str, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes (rows, cols)."""
    if layout not in LAYOUT_LEVELS:
        raise LowbitError(f"unknown packing layout {layout!r}")
    rows = packed.shape[0]
    if packed.shape[1] != row_bytes(layout, cols):
        raise LowbitError(
            f"packed tensor has {packed.shape[1]} bytes per row, layout {layout} with {cols} columns needs "
            f"{row_bytes(layout, cols)}: the file is corrupted or was written by another version"
        )
    p = packed.to(torch.int32)
    if layout == "t5":
        digits = torch.stack([(p // 3**i) % 3 for i in range(5)], -1)
        return digits.reshape(rows, packed.shape[1] * 5)[:, :cols].to(torch.uint8)
    bits = LAYOUT_BITS[layout]
    if bits == 8:
        return packed.clone()
    per, n_bytes = _group_shape(bits)
    b = p.reshape(rows, packed.shape[1] // n_bytes, n_bytes)
    word = sum(b[..., i] << (8 * i) for i in range(n_bytes))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(rows, b.shape[1] * per)[:, :cols].to(torch.uint8)


def _pad_cols(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-codes.shape[1]) % multiple
    return torch.nn.functional.pad(codes, (0, pad)) if pad else codes


def packed_nbytes(layout: str, rows: int, cols: int) -> int:
    return rows * row_bytes(layout, cols)

