"""``PackedLinear``: a linear layer that keeps its weight packed at the true bit-width and runs on it.

The module holds the codes in a :mod:`lowbit.quant.packing` layout (row-major: u1, u2, u3, u4, u6, u8 or
t5; ``self.layout`` says which), the per-group steps in fp16 (fp32 when fp16 would change a
value) and the zero points (one value when they are all equal, else per group; uint8 when they
are small integers), so that ``step * (code - zero)`` reproduces ``QuantizedWeight.dequantize``
bit for bit.

``forward`` on float32 CPU inputs calls the C kernels of :mod:`lowbit.runtime.kernels`, which read the
packed bytes directly (no repacking, no float weight in memory): batches up to
``KERNEL_MAX_BATCH`` rows run the matvec kernel (with ``activations="int8"``, the int8-activation
kernel where the layout has one: x rounded to int8 per block of 32 columns, integer dot
products, as llama.cpp's CPU matvec does; the default "float" is exact); larger batches dequantize a few MB of rows at a
time into one reused float32 buffer with the C decoder and multiply it with a GEMM. Other devices and dtypes, inputs that need a gradient, a missing compiler or
``LOWBIT_KERNELS=0`` take the pure-PyTorch reference path: unpack -> dequantize -> ``F.linear``; so
do layouts the kernels do not read (u6, 6-bit codes: :func:`lowbit.runtime.kernels.has_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.packing import LAYOUT_LEVELS, default_layout, layout_bits_per_code, pack_codes, unpack_codes
from lowbit.quant.quantizers import QuantizedWeight
from lowbit.runtime import kernels

# Above this many input rows, dequantize block by block and use a GEMM (see benchmarks/bench_matvec.py).
KERNEL_MAX_BATCH = 16
# Floats of dequantized weight per block of the large-batch path (1 Mi floats = 4 MB).
DEQUANT_BLOCK_FLOATS = 1 << 20
# How the matvec kernels take the activations: exact float32, or rounded to int8 per 32 columns.
ACTIVATIONS = ("float", "int8")


def q8_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded as the int8-activation kernel rounds it: per block of 32 features (last dim)
    ``d = max|x| / 127``, ``q = round(x * (1 / d))`` (half to even), returned as ``d * q`` in
    float32. The same float32 operations as the C code, so q and d agree bit for bit."""
    shape, cols = x.shape, x.shape[-1]
    x2 = x.reshape(-1, cols).float()
    pad = -cols % 32
    xb = F.pad(x2, (0, pad)).reshape(x2.shape[0], -1, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp_(-127, 127)
    return (d * q).reshape(x2.shape[0], -1)[:, :cols].reshape(shape)


def kernel_layout(n_levels: int) -> str:
    """The layout PackedLinear uses by default: the smallest one, except ternary in u2 (2 bits,
    decoded faster than t5's 1.6-bit base-3 bytes); pass ``layout="t5"`` for the smaller one."""
    return "u2" if n_levels == 3 else default_layout(n_levels)


def compact_scale(t: torch.Tensor, allow_uint8: bool = False) -> torch.Tensor:
    """The smallest exact storage of a float32 scale tensor: uint8 (small integers, if allowed),
    then fp16, else fp32 unchanged."""
    t = t.detach().float().contiguous()
    if allow_uint8 and t.numel() and bool(((t >= 0) & (t <= 255) & (t == t.round())).all()):
        return t.to(torch.uint8)
    half = t.half()
    if torch.equal(half.float(), t):
        return half
    return t


@dataclass(frozen=True, slots=True)
class KernelWeight:
    """The C description of a PackedLinear's buffers, with the buffers it was built from (kept
    alive: ``struct`` points into them)."""

    packed: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None
    data_ptr: int  # packed.data_ptr() when built: a changed storage means a new description
    struct: kernels._Weight | None  # None: the buffers cannot run the kernels (not on the CPU, ...)
    q8: bool  # whether the int8-activation kernel takes this weight

    def describes(self, packed, step, zero, bias) -> bool:
        return (
            self.packed is packed
            and self.step is step
            and self.zero is zero
            and self.bias is bias
            and self.data_ptr == packed.data_ptr()
        )


class PackedLinear(nn.Module):
    """``y = x @ W^T + bias`` with ``W = step * (code - zero)`` per group, codes packed at true width.

    Buffers: ``packed`` uint8 (out, row_bytes), ``step`` (out or 1, n_groups or 1) fp16/fp32,
    ``zero`` (1, 1) or like ``step`` (uint8/fp16/fp32), ``bias`` float32 (out,) or None.
    Build it with :meth:`from_quantized`.
    """

    def __init__(self, packed: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, in_features: int,
                 group_size: int | None, layout: str, n_levels: int, bits: float, quantizer: str,
                 bias: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if layout not in LAYOUT_LEVELS:
            raise LowbitError(f"unknown packing layout {layout!r}: choose one of {', '.join(LAYOUT_LEVELS)}")
        if n_levels > LAYOUT_LEVELS[layout]:
            raise LowbitError(f"{n_levels} levels do not fit layout {layout}")
        self.in_features = int(in_features)
        self.out_features = int(packed.shape[0])
        self.group_size = group_size
        self.layout = layout
        self.n_levels = int(n_levels)
        self.bits = float(bits)
        self.quantizer = quantizer
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("step", step.contiguous())
        self.register_buffer("zero", zero.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._weight_cache: KernelWeight | None = None
        self._activations = "float"
        kernels.check_weight(
            self.packed, layout, self.in_features, group_size, self.step, self.zero, self.bias
        )  # validates shapes and dtypes

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, layout: str | None = None
    ) -> PackedLinear:
        """Pack a :class:`QuantizedWeight` (layout: default :func:`kernel_layout`)."""
        layout = layout or kernel_layout(qw.n_levels)
        codes = qw.codes.detach().cpu()
        return cls.from_packed(
            pack_codes(codes, layout),
            qw.step.cpu(),
            qw.zero.cpu(),
            codes.shape[1],
            qw.group_size,
            layout,
            qw.n_levels,
            qw.bits,
            qw.quantizer,
            bias,
        )

    @property
    def activations(self) -> str:
        """"float" (exact) or "int8" (faster: see :func:`lowbit.runtime.kernels.linear_q8`)."""
        return self._activations

    @activations.setter
    def activations(self, value: str) -> None:
        if value not in ACTIVATIONS:
            raise LowbitError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {value!r}")
        self._activations = value

    @classmethod
    def concat(cls, layers: list[PackedLinear]) -> PackedLinear | None:
        """One layer computing ``cat([l(x) for l in layers], -1)`` (e.g. q/k/v projections that
        share their input), or None when their formats differ (layout, groups, scale storage)."""
        first = layers[0]
        same = all(
            m.in_features == first.in_features
            and m.layout == first.layout
            and m.group_size == first.group_size
            and m.n_levels == first.n_levels
            and m.activations == first.activations
            and m.step.dtype == first.step.dtype
            and m.zero.dtype == first.zero.dtype
            and m.step.shape[0] == m.out_features
            and (m.bias is None) == (first.bias is None)
            for m in layers
        )
        if not same:
            return None
        zeros = [m.zero for m in layers]
        if all(z.shape == (1, 1) for z in zeros) and all(torch.equal(z, zeros[0]) for z in zeros):
            zero = zeros[0].clone()
        elif all(z.shape[0] == m.out_features for z, m in zip(zeros, layers, strict=True)):
            zero = torch.cat([z.expand(m.out_features, -1) for z, m in zip(zeros, layers, strict=True)])
        else:
            return None
        out = cls(
            torch.cat([m.packed for m in layers]),
            torch.cat([m.step for m in layers]),
            zero,
            first.in_features,
            first.group_size,
            first.layout,
            first.n_levels,
            first.bits,
            first.quantizer,
            None if first.bias is None else torch.cat([m.bias for m in layers]),
        )
        out.activations = first.activations
        return out

    @classmethod
    def from_packed(cls, packed: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | float, in_features: int,
                    group_size: int | None, layout: str, n_levels: int, bits: float, quantizer: str,
                    bias: torch.Tensor | None = None) -> PackedLinear:  # fmt: skip
        """Build from codes already packed in ``layout`` (as a lowbit folder stores them), without
        unpacking (:meth:`from_quantized` packs, then comes here). The scales are stored in their
        smallest exact dtype (:func:`compact_scale`), a zero point shared by all groups as one
        value; ``zero`` may be one number. The buffers may share memory with the arguments."""
        step = compact_scale(step.float())
        zero = torch.full((1, 1), float(zero)) if not isinstance(zero, torch.Tensor) else zero.detach().float()
        if zero.numel() and bool((zero == zero.reshape(-1)[0]).all()):
            zero = zero.reshape(-1)[:1].reshape(1, 1)
        zero = compact_scale(zero, allow_uint8=True)
        if bias is not None:
            bias = bias.detach().float().cpu()
        return cls(packed.contiguous(), step, zero, in_features, group_size, layout, n_levels, bits, quantizer, bias)

    def with_layout(self, layout: str) -> PackedLinear:
        """The same weight with its codes repacked in ``layout`` (e.g. 6-bit codes in u8, which the
        int8 kernels read: exact, 8 bits per code instead of 6). Steps, zeros and bias are shared,
        the activations setting kept; ``self`` when it already is in ``layout``."""
        if layout == self.layout:
            return self
        if self.n_levels > LAYOUT_LEVELS.get(layout, 0):
            raise LowbitError(f"{self.n_levels} levels do not fit layout {layout}")
        codes = unpack_codes(self.packed.cpu(), self.layout, self.in_features)
        out = type(self)(
            pack_codes(codes, layout), self.step, self.zero, self.in_features, self.group_size, layout,
            self.n_levels, self.bits, self.quantizer, self.bias,
        )  # fmt: skip
        out.activations = self.activations
        return out

    # --------------------------------------------------------------------- views
    def extra_repr(self) -> str:
        g = {None: "per-channel", 0: "per-tensor"}.get(self.group_size, f"group={self.group_size}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
            f"layout={self.layout}, {g}, bias={self.bias is not None}"
        )

    def nbytes(self) -> int:
        """Bytes of every buffer this layer needs to run (packed codes, steps, zeros, bias)."""
        return sum(
            t.numel() * t.element_size() for t in (self.packed, self.step, self.zero, self.bias) if t is not None
        )

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight including scales and zeros (bias excluded)."""
        stored = self.nbytes() - (0 if self.bias is None else self.bias.numel() * 4)
        return 8.0 * stored / (self.out_features * self.in_features)

    @property
    def code_bits(self) -> float:
        return layout_bits_per_code(self.layout)

    def quantized_weight(self) -> QuantizedWeight:
        """The exact integer view back (codes unpacked, scales as float32)."""
        packed = self.packed.cpu()
        codes = unpack_codes(packed, self.layout, self.in_features)
        step, zero = self.step.float().cpu(), self.zero.float().cpu()
        shape = torch.broadcast_shapes(step.shape, zero.shape)
        return QuantizedWeight(
            codes,
            step.expand(shape).contiguous(),
            zero.expand(shape).contiguous(),
            self.group_size,
            self.n_levels,
            self.bits,
            self.quantizer,
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in), bit-exact with ``QuantizedWeight.dequantize``."""
        return self.quantized_weight().dequantize().to(self.packed.device)

    # --------------------------------------------------------------------- running
    def _kernel_weight(self, x: torch.Tensor) -> kernels._Weight | None:
        """The C description of the buffers if ``x`` can run the kernels, else None."""
        if (
            x.dtype != torch.float32
            or x.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled())
            or not kernels.available()
        ):
            return None
        return self.kernel_weight().struct

    def kernel_weight(self) -> KernelWeight:
        """The C description of the current buffers (call only when ``kernels.available()``). Cached;
        rebuilt when a buffer is replaced (``.to()``, assignment) or its storage changes."""
        buffers = self._buffers  # direct access: this runs once per layer per token
        packed, step, zero, bias = buffers["packed"], buffers["step"], buffers["zero"], buffers["bias"]
        cache = self._weight_cache
        if cache is None or not cache.describes(packed, step, zero, bias):
            usable = (
                packed.device.type == "cpu"
                and (bias is None or bias.dtype == torch.float32)
                and kernels.has_kernel(self.layout)
            )
            struct = (
                kernels.weight_struct(packed, self.layout, self.in_features, self.group_size, step, zero, bias)
                if usable
                else None
            )
            q8 = struct is not None and kernels.q8_supported(struct)
            cache = self._weight_cache = KernelWeight(packed, step, zero, bias, packed.data_ptr(), struct, q8)
        return cache

    def kernel_runs(self) -> bool:
        """Whether the kernels run this layer with its activations setting (for a float32 CPU input
        of at most ``KERNEL_MAX_BATCH`` rows): the float kernel, or the int8 one where it applies."""
        if not kernels.available():
            return False
        kw = self.kernel_weight()
        return kw.struct is not None and (self._activations != "int8" or kw.q8)

    def decode_fn(self):
        """A callable for 2-d contiguous float32 CPU inputs of at most ``KERNEL_MAX_BATCH`` rows that
        calls the kernel directly, skipping the module machinery and checks of ``forward`` (the
        decode loop calls every layer once per token). It snapshots the buffers and settings: get a
        new one after changing them. Falls back to ``self`` where the kernels do not apply."""
        if not self.kernel_runs():
            return self
        kw = self.kernel_weight()
        return kernels.bound_linear(kw.struct, self._activations == "int8", keep=kw)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the C kernels (else the PyTorch reference path)."""
        return self._kernel_weight(x) is not None

    def uses_int8(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the int8-activation kernel."""
        return (
            self._activations == "int8"
            and self._kernel_weight(x) is not None
            and self._weight_cache.q8
            and x.reshape(-1, self.in_features).shape[0] <= kernels.q8_batch_limit(KERNEL_MAX_BATCH)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + bias``; with ``activations="int8"`` every path computes ``q8_round(x) @ W^T
        + bias`` (the int8 kernel where it applies, else the float paths on the rounded input)."""
        if x.shape[-1] != self.in_features:
            raise LowbitError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        int8 = self._activations == "int8"
        weight = self._kernel_weight(x)
        if weight is None:
            return self.forward_reference(q8_round(x).to(x.dtype) if int8 else x)
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if int8 and self._weight_cache.q8 and x2.shape[0] <= kernels.q8_batch_limit(KERNEL_MAX_BATCH):
            y = kernels.run_unchecked(x2, weight, int8=True)
        elif x2.shape[0] <= KERNEL_MAX_BATCH:
            y = kernels.run_unchecked(kernels.q8_round(x2) if int8 else x2, weight, int8=False)
        else:
            y = self._forward_blocked(kernels.q8_round(x2) if int8 else x2, weight)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _forward_blocked(self, x: torch.Tensor, weight: kernels._Weight) -> torch.Tensor:
        """Large batches: dequantize ``DEQUANT_BLOCK_FLOATS`` of weight at a time into one reused
        buffer (cache-resident, never the whole float matrix) and multiply it with a GEMM that
        writes its columns of the output in place."""
        rows = max(1, min(self.out_features, DEQUANT_BLOCK_FLOATS // self.in_features))
        buf = torch.empty(rows, self.in_features)
        y = torch.empty(x.shape[0], self.out_features)
        for r0 in range(0, self.out_features, rows):
            r1 = min(r0 + rows, self.out_features)
            w = kernels.dequantize(weight, (r0, r1), out=buf[: r1 - r0])
            torch.mm(x, w.t(), out=y[:, r0:r1])
        bias = self._buffers["bias"]
        return y if bias is None else y.add_(bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: unpack -> dequantize -> ``F.linear`` (any device and float dtype)."""
        w = self.dequantize().to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)
