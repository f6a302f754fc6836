"""Property tests for lowbit.quant.packing: every layout round-trips every code it can hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.quant.packing import (
    LAYOUT_LEVELS,
    default_layout,
    layout_bits_per_code,
    pack_codes,
    packed_nbytes,
    row_bytes,
    unpack_codes,
)

LAYOUTS = sorted(LAYOUT_LEVELS)


def random_codes(rows: int, cols: int, levels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (rows, cols), generator=g, dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), rows=st.integers(0, 7), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_round_trip(layout, rows, cols, seed):
    codes = random_codes(rows, cols, LAYOUT_LEVELS[layout], seed)
    packed = pack_codes(codes, layout)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, row_bytes(layout, cols))
    assert torch.equal(unpack_codes(packed, layout, cols), codes)


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), rows=st.integers(1, 5), cols=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_rows_are_packed_independently(layout, rows, cols, seed):
    """Row r's bytes depend on row r only (kernels split work by rows)."""
    codes = random_codes(rows, cols, LAYOUT_LEVELS[layout], seed)
    packed = pack_codes(codes, layout)
    for r in range(rows):
        assert torch.equal(pack_codes(codes[r : r + 1], layout)[0], packed[r])


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), cols=st.integers(1, 200))
def test_size_matches_bits_per_code(layout, cols):
    """Packed rows are never larger than the nominal bits per code allow (plus one padded group)."""
    per_group = {"u3": 8, "u6": 4, "t5": 5}.get(layout, 1)
    bound = (cols + per_group) * layout_bits_per_code(layout) / 8 + 1
    assert row_bytes(layout, cols) <= bound
    assert packed_nbytes(layout, 3, cols) == 3 * row_bytes(layout, cols)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_matrix(layout):
    codes = torch.zeros(0, 9, dtype=torch.uint8)
    assert unpack_codes(pack_codes(codes, layout), layout, 9).shape == (0, 9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_extreme_codes(layout):
    top = LAYOUT_LEVELS[layout] - 1
    for value in (0, top):
        codes = torch.full((2, 13), value, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, layout), layout, 13), codes)


def test_known_bytes():
    """The documented little-endian order inside a byte."""
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), "u2").tolist() == [[0b00111001]]
    assert pack_codes(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), "u4").tolist() == [[0x5A]]
    assert pack_codes(torch.tensor([[1, 0, 2, 1, 2]], dtype=torch.uint8), "t5").tolist() == [[1 + 2 * 9 + 27 + 2 * 81]]
    assert pack_codes(torch.tensor([[1] + [0] * 7], dtype=torch.uint8), "u1").tolist() == [[1]]
    # u6: 4 codes in a 24-bit little-endian word, code i at bits 6i: 1 | 2 << 6 | 3 << 12 | 63 << 18 = 0xFC3081
    assert pack_codes(torch.tensor([[1, 2, 3, 63]], dtype=torch.uint8), "u6").tolist() == [[0x81, 0x30, 0xFC]]
    assert row_bytes("u6", 5) == 6 and row_bytes("u6", 64) == 48  # whole 3-byte groups: 6 bits per code


@pytest.mark.parametrize(
    "levels, layout",
    [(2, "u1"), (3, "t5"), (4, "u2"), (7, "u3"), (8, "u3"), (16, "u4"), (15, "u4"), (63, "u6"), (64, "u6"), (65, "u8"),
     (256, "u8")],  # fmt: skip
)
def test_default_layout(levels, layout):
    assert default_layout(levels) == layout


def test_errors():
    with pytest.raises(LowbitError, match="do not fit"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), "u2")
    with pytest.raises(LowbitError, match="unknown packing layout"):
        pack_codes(torch.zeros(1, 1, dtype=torch.uint8), "u5")
    with pytest.raises(LowbitError, match="bytes per row"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), "u2", 4)
    with pytest.raises(LowbitError):
        default_layout(257)
