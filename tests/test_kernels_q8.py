"""The int8-activation kernels (``kernels.linear_q8``) against an independent PyTorch oracle.

The oracle quantizes the activations the way the kernel documents (per block of 32 columns,
d = max|x| / 127, q = round(x * (1 / d)), half to even) and multiplies d * q with the dequantized
weight in float64: integer sums are exact in the kernel, so only float32 scaling differs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.quant.packing import LAYOUT_LEVELS
from lowbit.runtime import kernels
from lowbit.runtime.packed_linear import PackedLinear
from test_kernels import assert_close, random_quantized, struct

HAVE_KERNELS = kernels.available()
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="lowbit kernels unavailable (no C compiler)")
Q8_ISAS = [name for name in kernels.Q8_ISA_NAMES.values() if HAVE_KERNELS and kernels.q8_isa_ok(name)]
Q8_LAYOUTS = ["u1", "u2", "u4", "u8"]
# per-channel, per-tensor, groups of whole 32-byte units, groups inside a unit (2-8 per unit),
# rows that end inside a unit, several units per group
SHAPES = [
    (5, 64, None),
    (7, 100, 0),
    (9, 200, 64),
    (4, 576, 128),
    (6, 96, 32),
    (3, 45, 8),
    (3, 300, 32),
    (4, 700, 256),
    (2, 1000, None),
    (5, 130, 16),
]


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """d * q per block of 32 columns, computed as the kernel documents (float32)."""
    batch, cols = x.shape
    pad = -cols % 32
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(batch, -1, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (d * q).reshape(batch, -1)[:, :cols]


def supported(layout: str, cols: int, group_size: int | None) -> bool:
    """The documented rule of kernels.q8_supported, restated."""
    cpb = {"u1": 8, "u2": 4, "u4": 2, "u8": 1}.get(layout)
    if cpb is None:
        return False
    g = cols if not group_size else min(group_size, cols)
    unit = 32 * cpb
    return g == cols or g % unit == 0 or (unit % g == 0 and g % (4 * cpb) == 0)


@needs_kernels
@pytest.mark.parametrize("isa", Q8_ISAS)
@pytest.mark.parametrize("rows, cols, group_size", SHAPES)
@pytest.mark.parametrize("layout", Q8_LAYOUTS)
def test_q8_matches_oracle(layout, rows, cols, group_size, isa):
    n_levels = LAYOUT_LEVELS[layout]
    qw = random_quantized(rows, cols, n_levels, group_size, seed=rows * cols + 1)
    bias = torch.randn(rows)
    w, keep = struct(qw, layout, bias)
    assert kernels.q8_supported(w) == supported(layout, cols, group_size)
    if not supported(layout, cols, group_size):
        with pytest.raises(LowbitError, match="int8-activation path"):
            kernels.linear_q8(torch.randn(1, cols), w, isa=isa)
        return
    for batch in (1, 2, 5):
        x = torch.randn(batch, cols) * torch.logspace(-2, 1, cols)  # blocks of very different scale
        y = kernels.linear_q8(x, w, isa=isa)
        assert_close(y, qw, q8_activations(x), bias)


@needs_kernels
@pytest.mark.parametrize("isa", Q8_ISAS)
def test_q8_scale_storage_and_zero_input(isa):
    """fp16 / fp32 / uint8 zeros, broadcast zero; an all-zero input block gives exactly the bias."""
    qw = random_quantized(6, 256, 4, 64, seed=3)
    x = torch.randn(3, 256)
    x[1] = 0.0
    x[2, :32] = 0.0
    xq = q8_activations(x)
    for step in (qw.step, qw.step.half()):
        for zero in (qw.zero, qw.zero.half(), qw.zero.to(torch.uint8)):
            w, keep = struct(qw, "u2", step=step, zero=zero)
            assert_close(kernels.linear_q8(x, w, isa=isa), qw, xq, None)
    bias = torch.randn(6)
    w, keep = struct(qw, "u2", bias)
    assert torch.equal(kernels.linear_q8(x, w, isa=isa)[1], bias)


@needs_kernels
def test_q8_isas_agree_and_error_is_activation_rounding():
    """The 256-bit vector paths give the same numbers (integer sums are exact; the float scaling runs
    in the same order), the 512-bit one the same up to float32 summation order (16 lanes, not 8),
    and the distance to the float kernel is what int8 rounding of x explains."""
    qw = random_quantized(64, 576, 3, None, seed=7, zero_kind="constant")
    w, keep = struct(qw, "u2")
    x = torch.randn(4, 576)
    outs = {isa: kernels.linear_q8(x, w, isa=isa) for isa in Q8_ISAS}
    vector = [isa for isa in Q8_ISAS if isa not in ("portable", "avx512vnni-zmm")]
    for isa in vector[1:]:
        assert torch.equal(outs[isa], outs[vector[0]]), isa
    if "avx512vnni-zmm" in outs and vector:
        assert torch.allclose(outs["avx512vnni-zmm"], outs[vector[0]], rtol=1e-5, atol=1e-5)
    exact = kernels.linear(x, w)
    rel = (outs[Q8_ISAS[-1]] - exact).norm() / exact.norm()
    bound = (q8_activations(x) - x).norm() / x.norm()  # relative rounding error of the input
    assert 0 < rel < 3 * bound < 0.05


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    layout=st.sampled_from(Q8_LAYOUTS),
    rows=st.integers(1, 9),
    cols=st.integers(1, 600),
    group=st.sampled_from([None, 0, 8, 16, 32, 64, 128, 256]),
    batch=st.integers(1, 5),
    isa=st.sampled_from(Q8_ISAS or ["portable"]),
    seed=st.integers(0, 2**16),
)
def test_q8_random_shapes(layout, rows, cols, group, batch, isa, seed):
    group = group if group is None or group <= cols else None
    qw = random_quantized(rows, cols, LAYOUT_LEVELS[layout], group, seed=seed)
    bias = torch.randn(rows)
    w, keep = struct(qw, layout, bias)
    if not kernels.q8_supported(w):
        assert not supported(layout, cols, group)
        return
    x = torch.randn(batch, cols)
    assert_close(kernels.linear_q8(x, w, isa=isa), qw, q8_activations(x), bias)


@needs_kernels
def test_packed_linear_int8_activations():
    """activations="int8" runs linear_q8 for small batches; u3 (no int8 kernel) and large batches
    run the float paths on the rounded input, so every path means the same; "float" is exact."""
    qw = random_quantized(40, 256, 4, 128, seed=11)
    layer = PackedLinear.from_quantized(qw, layout="u2")
    x = torch.randn(3, 256)
    assert layer.activations == "float"
    assert_close(layer(x), qw, x, None)
    layer.activations = "int8"
    assert layer.uses_int8(x)
    assert_close(layer(x), qw, q8_activations(x), None)
    big = torch.randn(kernels.q8_batch_limit(16) + 1, 256)  # above the int8 kernel's batch limit
    assert not layer.uses_int8(big)
    mid = torch.randn(kernels.q8_batch_limit(16), 256)  # at the limit: the int8 kernel (several inputs per tile)
    assert layer.uses_int8(mid)
    assert_close(layer(mid), qw, q8_activations(mid), None)
    assert_close(layer(big), qw, q8_activations(big), None)  # GEMM path, same rounding
    layer.activations = "float"
    assert_close(layer(big), qw, big, None)
    qw3 = random_quantized(8, 64, 8, None, seed=2)
    u3 = PackedLinear.from_quantized(qw3, layout="u3")
    u3.activations = "int8"
    x3 = torch.randn(2, 64)
    assert not u3.uses_int8(x3)
    assert_close(u3(x3), qw3, q8_activations(x3), None)  # float kernel on the rounded input
    with pytest.raises(LowbitError, match="activations"):
        layer.activations = "int4"


def test_q8_round_matches_oracle():
    from lowbit.runtime.packed_linear import q8_round

    x = torch.randn(3, 5, 70) * torch.logspace(-3, 2, 70)
    assert torch.equal(q8_round(x), q8_activations(x.reshape(-1, 70)).reshape(3, 5, 70))


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "portable"])
@pytest.mark.parametrize("cols", [32, 70, 576])
def test_c_q8_round_is_bit_identical(isa, cols):
    """kernels.q8_round (the large-batch paths' activation rounding, in C) equals the PyTorch
    definition bit for bit, zero blocks, ties and widths that are not a multiple of 32 included."""
    from lowbit.runtime.packed_linear import q8_round

    if isa == "avx2" and not kernels.q8_isa_ok("avx2"):
        pytest.skip("no AVX2")
    x = torch.randn(37, cols) * torch.logspace(-4, 3, 37)[:, None]
    x[0] = 0.0
    x[1, :32] = torch.arange(32) * 0.5  # d = 31/254: many values land on .5 ties after scaling
    x[2, 5] = 1e30  # one huge value: the rest of its block rounds to 0
    got = kernels.q8_round(x, isa=isa)
    assert torch.equal(got, q8_round(x))


@needs_kernels
@pytest.mark.parametrize("layout", Q8_LAYOUTS)
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_zmm_several_inputs_equal_one_at_a_time(layout, group):
    """On the 512-bit path, 4 or more inputs run the several-input tile (each unit decoded once for
    4 inputs; u1 keeps the one-input tile): bit-identical to one input per call, tail inputs
    included (9 = 2 x 4 + 1), rows in pairs including an odd last row (37)."""
    if "avx512vnni-zmm" not in Q8_ISAS:
        pytest.skip("no AVX512-VNNI + BW on this CPU")
    levels = {"u1": 2, "u2": 4, "u4": 16, "u8": 256}[layout]
    qw = random_quantized(37, 384, levels, group, seed=5)
    w, keep = struct(qw, layout)
    if not kernels.q8_supported(w):
        pytest.skip("layout/group not taken by the int8 path")
    x = torch.randn(9, 384)
    together = kernels.linear_q8(x, w, isa="avx512vnni-zmm")
    alone = torch.cat([kernels.linear_q8(x[i : i + 1], w, isa="avx512vnni-zmm") for i in range(9)])
    assert torch.equal(together, alone)
    assert_close(together, qw, q8_activations(x), None)
