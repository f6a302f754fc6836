"""The C kernels and PackedLinear against the PyTorch reference, for every layout, group shape and batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.quant.packing import LAYOUT_LEVELS, pack_codes, row_bytes
from lowbit.quant.quantizers import QuantizedWeight, make_quantizer
from lowbit.runtime import kernels, packed_linear
from lowbit.runtime.packed_linear import KERNEL_MAX_BATCH, PackedLinear, compact_scale, kernel_layout

HAVE_KERNELS = kernels.available()
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="lowbit kernels unavailable (no C compiler)")
ISAS = ["portable", "avx2"] if HAVE_KERNELS and kernels.isa() == "avx2" else ["portable"]
LAYOUTS = ["u1", "u2", "u3", "u4", "u8", "t5"]
# (rows, cols, group_size): per-channel, per-tensor, groups with a shorter last group, groups the
# AVX2 units do not divide (decoded-row path), groups of 40 (t5 units), odd sizes.
SHAPES = [
    (5, 64, None),
    (7, 100, 0),
    (9, 200, 64),
    (4, 576, 128),
    (6, 96, 32),
    (3, 45, 8),
    (5, 83, 40),
    (4, 50, 12),
    (1, 7, None),
]
BATCHES = (1, 2, 3, 5, 9)


def random_quantized(
    rows: int,
    cols: int,
    n_levels: int,
    group_size: int | None,
    seed: int = 0,
    zero_kind: str = "per-group",
    fp16_steps: bool = True,
) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if not group_size else -(-cols // group_size)
    srows = 1 if group_size == 0 else rows
    codes = torch.randint(0, n_levels, (rows, cols), generator=g, dtype=torch.uint8)
    step = torch.rand(srows, n_groups, generator=g) * 0.1 + 0.01
    if fp16_steps:
        step = step.half().float()
    if zero_kind == "per-group":
        zero = torch.randint(0, n_levels, (srows, n_groups), generator=g).float()
    else:
        zero = torch.full((srows, n_groups), (n_levels - 1) / 2)
    return QuantizedWeight(codes, step, zero, group_size, n_levels, 2.0, "test")


def reference(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None):
    """float64 result and a per-output error scale (the sum of |terms| of both sums the kernel forms)."""
    y = x.double() @ qw.dequantize().double().T
    if bias is not None:
        y = y + bias.double()
    full = torch.broadcast_shapes(qw.step.shape, qw.zero.shape)
    mag = QuantizedWeight(
        qw.codes,
        qw.step.abs().expand(full),
        -qw.zero.abs().expand(full),
        qw.group_size,
        qw.n_levels,
        qw.bits,
        qw.quantizer,
    ).dequantize()
    scale = x.double().abs() @ mag.double().T + (0 if bias is None else bias.double().abs())
    return y, scale


def assert_close(y: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None):
    ref, scale = reference(qw, x, bias)
    err = (y.double() - ref).abs()
    assert bool((err <= 1e-5 * scale + 1e-6).all()), f"max relative error {(err / (scale + 1e-30)).max():.2e}"


def struct(qw: QuantizedWeight, layout: str, bias: torch.Tensor | None = None, step=None, zero=None):
    packed = pack_codes(qw.codes, layout)
    step = qw.step if step is None else step
    zero = qw.zero if zero is None else zero
    return kernels.weight_struct(packed, layout, qw.codes.shape[1], qw.group_size, step, zero, bias), (
        packed,
        step,
        zero,
    )


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows, cols, group_size", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_matches_reference(layout, rows, cols, group_size, isa):
    n_levels = LAYOUT_LEVELS[layout]
    qw = random_quantized(rows, cols, n_levels, group_size, seed=rows * cols)
    bias = torch.randn(rows)
    w, keep = struct(qw, layout, bias)
    for batch in BATCHES:
        x = torch.randn(batch, cols)
        assert_close(kernels.linear(x, w, isa=isa), qw, x, bias)
    w_nobias, keep2 = struct(qw, layout)
    x = torch.randn(2, cols)
    assert_close(kernels.linear(x, w_nobias, isa=isa), qw, x, None)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["u2", "u4", "u8"])
def test_scale_storage_types(layout, isa):
    """fp16 / fp32 / uint8 zeros, fp16 / fp32 steps, broadcast (1, 1) zeros."""
    n_levels = LAYOUT_LEVELS[layout]
    qw = random_quantized(6, 130, n_levels, 32, seed=3)
    x = torch.randn(3, 130)
    for step in (qw.step, qw.step.half()):
        for zero in (qw.zero, qw.zero.half(), qw.zero.to(torch.uint8)):
            w, keep = struct(qw, layout, step=step, zero=zero)
            assert_close(kernels.linear(x, w, isa=isa), qw, x, None)
    const = random_quantized(6, 130, n_levels, 32, seed=4, zero_kind="constant")
    w, keep = struct(const, layout, zero=const.zero[:1, :1].contiguous())
    assert_close(kernels.linear(x, w, isa=isa), const, x, None)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
def test_c_dequantize_is_bit_exact(layout, monkeypatch):
    """On every code path (forced by argument, or by LOWBIT_ISA=portable): the same arithmetic."""
    for rows, cols, group_size in SHAPES:
        qw = random_quantized(rows, cols, LAYOUT_LEVELS[layout], group_size, seed=cols)
        w, keep = struct(qw, layout)
        want = qw.dequantize()
        assert torch.equal(kernels.dequantize(w), want)
        for isa in ISAS:
            assert torch.equal(kernels.dequantize(w, isa=isa), want), isa
        monkeypatch.setenv("LOWBIT_ISA", "portable")
        assert torch.equal(kernels.dequantize(w, rows=(0, rows // 2)), want[: rows // 2])
        monkeypatch.delenv("LOWBIT_ISA")


@needs_kernels
def test_half_to_float_exhaustive():
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    got, want = kernels.half_to_float(halves), halves.float()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@needs_kernels
def test_threads_do_not_change_the_result():
    qw = random_quantized(64, 512, 4, 128, seed=1)
    w, keep = struct(qw, "u2")
    x = torch.randn(3, 512)
    try:
        kernels.set_num_threads(1)
        one = kernels.linear(x, w)
        kernels.set_num_threads(2)
        two = kernels.linear(x, w)
    finally:
        kernels.set_num_threads(None)
    assert torch.equal(one, two)  # rows are independent: the same sums in the same order
    with pytest.raises(LowbitError):
        kernels.set_num_threads(0)


def test_weight_struct_validation():
    qw = random_quantized(4, 32, 4, None)
    packed = pack_codes(qw.codes, "u2")
    with pytest.raises(LowbitError, match="packed weight"):
        kernels.weight_struct(packed[:, :-1], "u2", 32, None, qw.step, qw.zero)
    with pytest.raises(LowbitError, match="does not fit"):
        kernels.weight_struct(packed, "u2", 32, 8, torch.ones(4, 3), qw.zero)
    with pytest.raises(LowbitError, match="no kernel"):
        kernels.weight_struct(packed, "u5", 32, None, qw.step, qw.zero)
    with pytest.raises(LowbitError, match="bias"):
        kernels.weight_struct(packed, "u2", 32, None, qw.step, qw.zero, torch.zeros(3))


# ---------------------------------------------------------------------------- PackedLinear

QUANTIZERS = [
    (1, "auto", None),
    (1.58, "auto", None),
    (1.58, "absmean", None),
    (2, "auto", 64),
    (2, "minmax", 48),
    (3, "auto", 32),
    (3, "minmax", None),
    (4, "auto", 32),
    (4, "minmax", 128),
    (8, "auto", None),
]


def quantized_layer(bits, name, group_size, rows=24, cols=200, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    q = make_quantizer(bits, name, group_size)
    q.initialize(w)
    q.round_scales_()
    return q.quantize(w), torch.randn(rows)


@pytest.mark.parametrize("bits, name, group_size", QUANTIZERS)
def test_packed_linear_from_quantized(bits, name, group_size):
    qw, bias = quantized_layer(bits, name, group_size)
    layouts = [None, "t5"] if qw.n_levels == 3 else [None]
    for layout in layouts:
        layer = PackedLinear.from_quantized(qw, bias, layout=layout)
        assert layer.layout == (layout or kernel_layout(qw.n_levels))
        assert torch.equal(layer.dequantize(), qw.dequantize())
        assert layer.step.dtype == torch.float16  # round_scales_ made fp16 exact
        x = torch.randn(2, 3, 200)
        y = layer(x)
        assert y.shape == (2, 3, 24)
        assert_close(y.reshape(6, 24), qw, x.reshape(6, 200), bias)
        assert_close(layer.forward_reference(x).reshape(6, 24), qw, x.reshape(6, 200), bias)
        expected = sum(t.numel() * t.element_size() for t in (layer.packed, layer.step, layer.zero, layer.bias))
        assert layer.nbytes() == expected
        assert layer.packed.shape == (24, row_bytes(layer.layout, 200))


def test_scales_stay_exact():
    """Steps fp16 only when exact, zeros collapse to one value when constant."""
    qw = random_quantized(8, 64, 16, 32, fp16_steps=False, zero_kind="constant")
    layer = PackedLinear.from_quantized(qw)
    assert layer.step.dtype == torch.float32
    assert layer.zero.shape == (1, 1) and layer.zero.dtype == torch.float16  # 7.5
    assert torch.equal(layer.dequantize(), qw.dequantize())
    assert compact_scale(torch.tensor([[3.0, 200.0]]), allow_uint8=True).dtype == torch.uint8
    assert compact_scale(torch.tensor([[3.0, 300.0]]), allow_uint8=True).dtype == torch.float16
    assert compact_scale(torch.tensor([[0.1]])).dtype == torch.float32


@needs_kernels
def test_packed_linear_batch_paths(monkeypatch):
    """Small batches run the matvec kernel, large ones dequantize blocks + GEMM; all agree with the reference."""
    qw, bias = quantized_layer(2, "auto", 64, rows=40, cols=256)
    layer = PackedLinear.from_quantized(qw, bias)
    for batch in (1, KERNEL_MAX_BATCH, KERNEL_MAX_BATCH + 1, 70):
        x = torch.randn(batch, 256)
        assert layer.uses_kernel(x)
        assert_close(layer(x), qw, x, bias)
    monkeypatch.setattr(packed_linear, "DEQUANT_BLOCK_FLOATS", 7 * 256)  # blocks of 7 rows, a shorter last one
    x = torch.randn(50, 3, 256)
    assert_close(layer(x).reshape(150, 40), qw, x.reshape(150, 256), bias)
    no_bias = PackedLinear.from_quantized(qw)
    assert_close(no_bias(x[:, 0]), qw, x[:, 0], None)
    assert torch.equal(kernels.dequantize(layer._kernel_weight(x), rows=(5, 19)), qw.dequantize()[5:19])


def test_reference_paths(monkeypatch):
    qw, bias = quantized_layer(4, "auto", 32)
    layer = PackedLinear.from_quantized(qw, bias)
    x = torch.randn(3, 200)
    want = layer.forward_reference(x)
    # float64 input: reference path in float64
    y64 = layer(x.double())
    assert y64.dtype == torch.float64
    assert torch.allclose(y64.float(), want, atol=1e-4)
    # an input that needs a gradient goes through autograd
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, qw.dequantize().sum(0).expand(3, -1), atol=1e-5)
    # LOWBIT_KERNELS=0 switches the kernels off
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    assert not layer.uses_kernel(x)
    assert torch.equal(layer(x), want)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_load_failed", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    qw, bias = quantized_layer(2, "auto", None, rows=8, cols=64)
    layer = PackedLinear.from_quantized(qw, bias)
    x = torch.randn(2, 64)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        assert not kernels.available()
    assert kernels.isa() is None
    assert not layer.uses_kernel(x)
    assert_close(layer(x), qw, x, bias)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        layer(x)
        assert kernels.load() is None


def test_compile_cache_is_keyed_and_atomic(monkeypatch, tmp_path):
    """The library lands in $LOWBIT_CACHE/<sha>/liblowbit.so, built once from every source, no temp
    files left; a change to any source or header gets a new folder."""
    from lowbit.runtime.kernels import build

    cc = build.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    source, other, header = tmp_path / "tiny.c", tmp_path / "other.c", tmp_path / "tiny.h"
    header.write_text("#define LB_ANSWER 42\n")
    source.write_text('#include "tiny.h"\nint lb_answer(void) { return LB_ANSWER; }\n')
    other.write_text("int lb_other(void) { return 7; }\n")
    monkeypatch.setattr(build, "SOURCES", (source, other))
    monkeypatch.setattr(build, "HEADERS", (header,))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    flags = ["-O1", "-fPIC", "-shared"]
    path = build.compile_library(cc, flags)
    assert path.name == "liblowbit.so" and path.parent.parent == tmp_path / "cache"
    assert os.listdir(path.parent) == ["liblowbit.so"]
    import ctypes

    lib = ctypes.CDLL(str(path))
    assert lib.lb_answer() == 42 and lib.lb_other() == 7  # every source is compiled in
    mtime = path.stat().st_mtime_ns
    assert build.compile_library(cc, flags) == path and path.stat().st_mtime_ns == mtime
    seen = {path}
    for changed, text in ((source, "int lb_answer(void) { return 43; }\n"), (other, "int lb_other(void) { return 8; }\n"),
                          (header, "#define LB_ANSWER 41\n")):
        changed.write_text(text)
        new = build.library_path(cc, flags)
        assert new not in seen, changed.name  # a new source gets a new folder
        seen.add(new)


def test_library_is_built_from_every_source_file():
    """The shipped kernels: every .c / .h of the package folder is compiled / hashed."""
    folder = Path(kernels.__file__).parent
    assert set(kernels.SOURCES) == set(folder.glob("*.c")) and len(kernels.SOURCES) > 1
    assert set(kernels.HEADERS) == set(folder.glob("*.h")) and len(kernels.HEADERS) > 1


@needs_kernels
def test_struct_mirrors_are_checked_against_c():
    """At load the C struct sizes and field offsets are compared with the ctypes mirrors; a mirror
    that drifts (a missing or moved field) is a clear error."""
    import ctypes

    lib = kernels.load()
    n = kernels.check_struct_layouts(lib)
    assert n >= 2 + len(kernels._Weight._fields_)  # two sizes and the offsets

    class ShortWeight(ctypes.Structure):  # lb_weight without its trailing bias pointer
        _fields_ = kernels._Weight._fields_[:-1]

    with pytest.raises(LowbitError, match=r"lb_weight.*bias"):
        kernels.check_struct_layouts(lib, {**kernels.MIRRORS, "lb_weight": ShortWeight})

    class SwappedLayer(ctypes.Structure):  # eps1 and q8 swapped: same size, wrong offsets
        fields = list(kernels._Layer._fields_)
        i, j = [k for k, (name, _) in enumerate(fields) if name in ("eps1", "q8")]
        fields[i], fields[j] = fields[j], fields[i]
        _fields_ = fields

    with pytest.raises(LowbitError, match=r"offset of lb_layer\.eps1"):
        kernels.check_struct_layouts(lib, {**kernels.MIRRORS, "lb_layer": SwappedLayer})


@needs_kernels
@settings(max_examples=80, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    rows=st.integers(1, 9),
    cols=st.integers(1, 150),
    group=st.sampled_from([None, 0, 8, 16, 24, 32, 40, 64, 80]),
    batch=st.integers(1, 7),
    isa=st.sampled_from(ISAS),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_shapes(layout, rows, cols, group, batch, isa, seed):
    group = group if group is None or group <= cols else None
    qw = random_quantized(rows, cols, LAYOUT_LEVELS[layout], group, seed=seed)
    bias = torch.randn(rows)
    w, keep = struct(qw, layout, bias)
    x = torch.randn(batch, cols)
    assert_close(kernels.linear(x, w, isa=isa), qw, x, bias)
