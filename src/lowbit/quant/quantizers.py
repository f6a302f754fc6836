"""Weight quantizers for 1 to 8 bits (1, 1.58, 2, 3, 4, 6, 8): one interface for PTQ, QAT, packing and export.

Every quantizer maps a weight matrix ``W`` (out, in) to integer codes ``u`` in
``[0, n_levels)`` and back with one affine rule per group::

    W_q = step * (u - zero)        step = alpha * step_per_alpha

``alpha`` is the (learnable) scale of one output row or one group of ``g`` consecutive
inputs of a row; ``zero`` is a constant of the grid (SEQ, LSQ, binary) or a per-group
integer (asymmetric min-max). The fake-quant forward is computed with the very same
expression as :meth:`QuantizedWeight.dequantize`, so codes x scales reproduce it exactly.

Gradients (docs/methods.md, "Gradients (STE and LSQ)"; ParetoQ, Liu et al. 2025, arXiv:2502.02631;
LSQ, Esser et al. 2020, arXiv:1902.08153): straight-through for ``W`` inside the clip range and
zero outside; for ``alpha`` the LSQ form, ``q - W/alpha`` inside the range and the clip bound
outside, obtained by autograd through an STE round.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.options import parse_group_size

SUPPORTED_BITS = (1.0, 1.58, 2.0, 3.0, 4.0, 6.0, 8.0)
# seq clips just inside +-1 so that the edge level is never rounded past (ParetoQ reference code;
# docs/methods.md, "SEQ: ternary and 2-bit").
SEQ_CLIP = 0.99


def parse_bits(value: str | float | int) -> float:
    """Parse a bit-width given as 1, 1.58, "ternary", 2, 3, 4, 6 or 8."""
    text = str(value).strip().lower()
    if text in ("ternary", "1.58"):
        return 1.58
    if text in ("binary",):
        return 1.0
    try:
        bits = float(text)
    except ValueError:
        bits = math.nan
    if bits not in SUPPORTED_BITS:
        hint = " (write 1.58 or 'ternary' for ternary weights)" if 1.4 < bits < 1.7 else ""
        raise LowbitError(
            f"unsupported bit-width {value!r}: choose one of 1, 1.58 (or 'ternary'), 2, 3, 4, 6, 8{hint}"
        )
    return bits


def parse_bits_option(text: str) -> float:
    """``--bits``: 1, 1.58 (or ternary), 2, 3, 4, 6 or 8, checked when the command line is read."""
    try:
        return parse_bits(text)
    except LowbitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_override(text: str) -> tuple[str, dict]:
    """``--override PATTERN=BITS[:GROUP]`` -> ``(pattern, {"bits": ..., "group_size": ...})``."""
    pattern, sep, value = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"override must look like 'model.layers.0.*=8' or 'PATTERN=4:64', got {text!r}")
    bits, _, group = value.partition(":")
    spec: dict = {"bits": parse_bits_option(bits)}
    if group:
        spec["group_size"] = parse_group_size(group)
    return pattern, spec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is taken as 1 (straight-through estimator)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.round(x)
    return x + (torch.round(x) - x).detach()


def group_view(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reshape (out, in) to (out, n_groups, g), zero-padding a shorter last group.

    Returns the view, a boolean mask of real (non-padded) entries and the group length.
    ``group_size=None`` means one group per row (per-channel); ``0`` means per-tensor.
    """
    rows, cols = w.shape
    if group_size is None:
        g = cols
    elif group_size == 0:
        return w.reshape(1, 1, rows * cols), torch.ones(1, 1, rows * cols, dtype=torch.bool), rows * cols
    else:
        g = group_size
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    mask = torch.ones(cols, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return w.reshape(rows, n_groups, g), mask.reshape(1, n_groups, g), g


def ungroup(wg: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`group_view`: back to (out, in), dropping the padding."""
    rows, cols = shape
    return wg.reshape(rows, -1)[:, :cols]


def check_group_size(group_size: int | None, in_features: int) -> None:
    if group_size is None or group_size == 0:
        return
    if not isinstance(group_size, int) or group_size < 1:
        raise LowbitError(f"group size must be a positive integer, got {group_size!r}")
    if group_size > in_features:
        raise LowbitError(
            f"group size {group_size} is larger than the row length {in_features}: "
            "use a smaller group size or per-channel (no --group-size)"
        )


def _masked_abs_mean(wg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(wg.dtype)
    return (wg.abs() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)


def _abs_mean_init(self, wg: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``init_alpha`` of the quantizers whose scale is the mean absolute weight (binary, BitNet absmean)."""
    alpha = _masked_abs_mean(wg, mask)
    return alpha, torch.full_like(alpha, self.grid_zero)


def _masked_abs_max(wg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (wg.abs() * mask).amax(-1, keepdim=True)


@dataclass
class QuantizedWeight:
    """The exact integer view of a quantized matrix: ``W = step * (codes - zero)`` per group.

    ``codes``: uint8 (out, in) in ``[0, n_levels)``; ``step`` and ``zero``: float32
    (out or 1, n_groups or 1); ``group_size``: None per-channel, 0 per-tensor, else g.
    """

    codes: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor
    group_size: int | None
    n_levels: int
    bits: float
    quantizer: str

    def dequantize(self) -> torch.Tensor:
        wg, _, _ = group_view(self.codes.to(self.step.dtype), self.group_size)
        w = self.step.unsqueeze(-1) * (wg - self.zero.unsqueeze(-1))
        return ungroup(w, self.codes.shape)

    @property
    def storage_bits(self) -> int:
        """Bits per code when packed at true width (ternary counts as 2 in a simple layout)."""
        return max(1, math.ceil(math.log2(self.n_levels)))


def alpha_for_step(step: torch.Tensor, step_per_alpha: float) -> torch.Tensor:
    """The alpha whose ``alpha * step_per_alpha`` is exactly ``step`` (nudged by ulps if needed)."""
    alpha = step.float() / step_per_alpha
    for _ in range(8):
        diff = alpha * step_per_alpha - step
        if not bool(diff.any()):
            break
        down = torch.nextafter(alpha, torch.full_like(alpha, -math.inf))
        up = torch.nextafter(alpha, torch.full_like(alpha, math.inf))
        alpha = torch.where(diff > 0, down, torch.where(diff < 0, up, alpha))
    return alpha


class Quantizer(nn.Module):
    """Base class. Subclasses define the grid; the base handles groups, scales and gradients.

    Subclasses set ``name``, ``n_levels`` and implement :meth:`init_alpha`,
    :meth:`to_codes` (normalized weights -> unsigned real codes, STE-differentiable)
    and the grid constants ``step_per_alpha`` and ``grid_zero``.
    """

    name = "base"
    symmetric_zero = True  # zero is a grid constant; False for min-max (per-group zero)

    def __init__(self, bits: float, group_size: int | None = None):
        super().__init__()
        self.bits = float(bits)
        self.group_size = group_size
        self.alpha = nn.Parameter(torch.empty(0))
        self.register_buffer("zero", torch.empty(0))
        self.initialized = False

    # grid description -------------------------------------------------------------
    n_levels: int = 0
    step_per_alpha: float = 1.0
    grid_zero: float = 0.0

    def init_alpha(self, wg: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (alpha, zero) for grouped weights (R, G, g); both shaped (R, G, 1)."""
        raise NotImplementedError

    def to_codes(self, x: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Unsigned codes (as floats, STE-rounded) from normalized weights x = W / alpha."""
        raise NotImplementedError

    # shared machinery ---------------------------------------------------------------
    def extra_repr(self) -> str:
        g = {None: "per-channel", 0: "per-tensor"}.get(self.group_size, f"group={self.group_size}")
        return f"bits={self.bits:g}, {g}"

    @torch.no_grad()
    def initialize(self, w: torch.Tensor, search: str = "none", grid: int = 40) -> None:
        """Set alpha (and zero) from ``w``; ``search='mse'`` shrinks alpha per group to the
        value minimising the squared rounding error (grid search over ratios 1 .. 0.2)."""
        check_group_size(self.group_size, w.shape[1])
        w = w.detach().float()
        wg, mask, _ = group_view(w, self.group_size)
        alpha, zero = self.init_alpha(wg, mask)
        alpha = alpha.clamp_min(1e-8)
        if search == "mse":
            alpha, zero = self._mse_search(wg, mask, alpha, zero, grid)
        elif search != "none":
            raise LowbitError(f"unknown scale search {search!r}: use 'none' or 'mse'")
        self.alpha = nn.Parameter(alpha.squeeze(-1).to(w.device))
        self.zero = zero.squeeze(-1).to(w.device)
        self.initialized = True

    def _mse_search(self, wg, mask, alpha, zero, grid, chunk: int = 64):
        """Per-group grid search of alpha * ratio, ratio in [1, 0.2], minimising squared error
        (docs/methods.md, "Scale search (MSE clip)").

        Rows are processed in small chunks so that the temporaries stay in cache.
        """
        ratios = torch.linspace(1.0, 0.2, grid).tolist()
        best_alpha, best_zero = alpha.clone(), zero.clone()
        m = mask.to(wg.dtype)
        for r0 in range(0, wg.shape[0], chunk):
            w_c = wg[r0 : r0 + chunk]
            a_c = alpha[r0 : r0 + chunk] if alpha.shape[0] > 1 else alpha
            z_c = zero[r0 : r0 + chunk] if zero.shape[0] > 1 else zero
            best_err = torch.full_like(a_c.expand(w_c.shape[0], -1, -1), math.inf)
            b_a, b_z = a_c.expand_as(best_err).clone(), z_c.expand_as(best_err).clone()
            for ratio in ratios:
                a = a_c * ratio
                z = self.rescale_zero(z_c, ratio)
                err = (((self._decode(self.to_codes(w_c / a, z), a, z) - w_c) ** 2) * m).sum(-1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                b_a = torch.where(better, a, b_a)
                b_z = torch.where(better, z, b_z)
            if alpha.shape[0] > 1:
                best_alpha[r0 : r0 + chunk], best_zero[r0 : r0 + chunk] = b_a, b_z
            else:
                best_alpha, best_zero = b_a, b_z
        return best_alpha, best_zero

    def rescale_zero(self, zero: torch.Tensor, ratio: float) -> torch.Tensor:
        return zero

    def _decode(self, u: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (alpha * self.step_per_alpha) * (u - zero)

    def _alpha_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.initialized:
            raise LowbitError("quantizer used before initialize(weight) was called")
        return self.alpha.unsqueeze(-1), self.zero.unsqueeze(-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight with STE / LSQ gradients."""
        alpha, zero = self._alpha_zero()
        wg, _, _ = group_view(w, self.group_size)
        u = self.to_codes(wg / alpha, zero)
        return ungroup(self._decode(u, alpha, zero), w.shape)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """Exact integer codes and per-group step/zero of ``w`` under the current scales."""
        alpha, zero = self._alpha_zero()
        wg, _, _ = group_view(w.detach().float(), self.group_size)
        u = self.to_codes(wg / alpha.float(), zero)
        codes = ungroup(u, w.shape).to(torch.uint8)
        step = (alpha.float() * self.step_per_alpha).squeeze(-1)
        zero_full = zero.float().squeeze(-1).expand_as(step).contiguous()
        return QuantizedWeight(codes, step.contiguous(), zero_full, self.group_size,
                               self.n_levels, self.bits, self.name)

    def representable_alpha(self, alpha: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """alpha such that the step ``alpha * step_per_alpha`` is exact in ``dtype`` (best effort
        for step_per_alpha = 2/3, where alpha*c need not round-trip at once)."""
        alpha = alpha.detach().float()
        for _ in range(4):
            step = alpha * self.step_per_alpha
            rounded = step.to(dtype).float().clamp_min(torch.finfo(dtype).tiny)
            if torch.equal(rounded, step):
                break
            alpha = rounded / self.step_per_alpha
        return alpha

    @torch.no_grad()
    def round_scales_(self, dtype: torch.dtype = torch.float16) -> None:
        """Make the steps exactly representable in ``dtype`` (so packed fp16 scales lose nothing)."""
        self.alpha.copy_(self.representable_alpha(self.alpha, dtype))

    @torch.no_grad()
    def group_scales(self, w: torch.Tensor, search: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, zero), each (rows, 1), treating every row of ``w`` as one group (used by GPTQ)."""
        wg, mask = w.float().unsqueeze(1), torch.ones(1, 1, w.shape[1], dtype=torch.bool, device=w.device)
        alpha, zero = self.init_alpha(wg, mask)
        alpha = alpha.clamp_min(1e-8)
        if search == "mse":
            alpha, zero = self._mse_search(wg, mask, alpha, zero, 40)
        return self.representable_alpha(alpha.squeeze(-1)), zero.squeeze(-1)

    def fake_quantize_with(self, w: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Quantize ``w`` (rows, k) with explicit per-row (alpha, zero) broadcast over k."""
        return self._decode(self.to_codes(w / alpha, zero), alpha, zero)

    @torch.no_grad()
    def set_scales(self, alpha: torch.Tensor, zero: torch.Tensor) -> None:
        """Install (rows, n_groups) scales computed elsewhere (GPTQ)."""
        self.alpha = nn.Parameter(alpha.float().contiguous())
        self.zero = zero.float().contiguous()
        self.initialized = True


class BinaryQuantizer(Quantizer):
    """1-bit: ``W_q = alpha * sign(W)``, alpha initialised to mean|W| (ParetoQ; docs/methods.md, "Binary (1-bit)")."""

    name = "binary"
    n_levels = 2
    step_per_alpha = 2.0
    grid_zero = 0.5

    def __init__(self, bits: float = 1.0, group_size: int | None = None):
        if bits != 1:
            raise LowbitError(f"the binary quantizer is 1-bit, not {bits:g}: use --bits 1, or another quantizer")
        super().__init__(bits, group_size)

    init_alpha = _abs_mean_init

    def to_codes(self, x, zero):
        # u in {0, 1}; 2*alpha*(u - 0.5) = +-alpha. x = 0 maps to +alpha (sign convention >= 0).
        xc = torch.clamp(x, -1.0, 1.0)
        hard = (x >= 0).to(x.dtype)
        return xc * 0.5 + 0.5 + (hard - (xc * 0.5 + 0.5)).detach()


class StretchedElasticQuantizer(Quantizer):
    """Stretched elastic quantization (SEQ, ParetoQ) for ternary (1.58-bit) and 2-bit.

    Ternary: ``W_q/alpha in {-2/3, 0, 2/3}``; 2-bit: ``{-3/4, -1/4, 1/4, 3/4}``.
    alpha is initialised to max|W| of the group and the input clipped at +-0.99
    (docs/methods.md, "SEQ: ternary and 2-bit").
    """

    name = "seq"

    def __init__(self, bits: float, group_size: int | None = None):
        super().__init__(bits, group_size)
        if bits == 1.58:
            self.n_levels, self.step_per_alpha, self.grid_zero = 3, 2.0 / 3.0, 1.0
        elif bits == 2:
            self.n_levels, self.step_per_alpha, self.grid_zero = 4, 0.5, 1.5
        else:
            raise LowbitError(f"SEQ supports 1.58 (ternary) and 2 bits, not {bits:g}")

    def init_alpha(self, wg, mask):
        alpha = _masked_abs_max(wg, mask)
        return alpha, torch.full_like(alpha, self.grid_zero)

    def to_codes(self, x, zero):
        xc = torch.clamp(x, -SEQ_CLIP, SEQ_CLIP)
        if self.n_levels == 3:
            return round_ste(xc * 1.5) + 1.0
        return round_ste(xc * 2.0 - 0.5) + 2.0


class LSQQuantizer(Quantizer):
    """Learned step size (LSQ) for 3/4/6/8 bits: ``W_q = alpha * clip(round(W/alpha), -2^(b-1), 2^(b-1)-1)``.

    alpha initialised to max|W| / (2^(b-1) - 1) (ParetoQ reference code; docs/methods.md, "LSQ: 3, 4 and 8-bit";
    6-bit is the same grid with 64 levels).
    """

    name = "lsq"

    def __init__(self, bits: float, group_size: int | None = None):
        super().__init__(bits, group_size)
        if bits not in (2, 3, 4, 6, 8):
            raise LowbitError(f"LSQ supports 2, 3, 4, 6 and 8 bits, not {bits:g}")
        b = int(bits)
        self.n_levels = 2**b
        self.grid_zero = float(2 ** (b - 1))
        self.qmax = 2 ** (b - 1) - 1

    def init_alpha(self, wg, mask):
        alpha = _masked_abs_max(wg, mask) / self.qmax
        return alpha, torch.full_like(alpha, self.grid_zero)

    def to_codes(self, x, zero):
        return round_ste(torch.clamp(x, -self.grid_zero, self.qmax)) + self.grid_zero


class AbsMeanTernaryQuantizer(Quantizer):
    """BitNet b1.58 absmean (Ma et al. 2024, arXiv:2402.17764): ``round(clip(W / mean|W|, -1, 1))``
    with one scale per tensor by default (docs/methods.md, "BitNet b1.58 absmean")."""

    name = "absmean"
    n_levels = 3
    step_per_alpha = 1.0
    grid_zero = 1.0

    def __init__(self, bits: float = 1.58, group_size: int | None = 0):
        if bits != 1.58:
            raise LowbitError(f"BitNet absmean is ternary (1.58 bits), not {bits:g}")
        super().__init__(bits, group_size)

    init_alpha = _abs_mean_init

    def to_codes(self, x, zero):
        return round_ste(torch.clamp(x, -1.0, 1.0)) + 1.0


class MinMaxQuantizer(Quantizer):
    """Asymmetric round-to-nearest: step = (max - min) / (2^b - 1), integer zero point per group
    (docs/methods.md, "Round-to-nearest: min-max and abs-max")."""

    name = "minmax"
    symmetric_zero = False
    step_per_alpha = 1.0

    def __init__(self, bits: float, group_size: int | None = None):
        super().__init__(bits, group_size)
        if bits not in (1, 2, 3, 4, 6, 8):
            raise LowbitError(f"min-max supports 1, 2, 3, 4, 6 and 8 bits, not {bits:g}")
        self.n_levels = 2 ** int(bits)

    def init_alpha(self, wg, mask):
        big = torch.finfo(wg.dtype).max
        wmax = torch.where(mask, wg, -big).amax(-1, keepdim=True).clamp_min(0)
        wmin = torch.where(mask, wg, big).amin(-1, keepdim=True).clamp_max(0)
        alpha = ((wmax - wmin) / (self.n_levels - 1)).clamp_min(1e-8)
        zero = torch.round(-wmin / alpha).clamp(0, self.n_levels - 1)
        return alpha, zero

    def to_codes(self, x, zero):
        return torch.clamp(round_ste(x) + zero, 0, self.n_levels - 1)


class AbsMaxQuantizer(Quantizer):
    """Symmetric round-to-nearest: step = max|W| / (2^(b-1) - 1), codes in [-(2^(b-1)-1), 2^(b-1)-1]
    (docs/methods.md, "Round-to-nearest: min-max and abs-max")."""

    name = "absmax"

    def __init__(self, bits: float, group_size: int | None = None):
        super().__init__(bits, group_size)
        if bits not in (2, 3, 4, 6, 8):
            raise LowbitError(f"abs-max supports 2, 3, 4, 6 and 8 bits, not {bits:g}")
        self.qmax = 2 ** (int(bits) - 1) - 1
        self.n_levels = 2 * self.qmax + 1
        self.grid_zero = float(self.qmax)

    def init_alpha(self, wg, mask):
        alpha = _masked_abs_max(wg, mask) / self.qmax
        return alpha, torch.full_like(alpha, self.grid_zero)

    def to_codes(self, x, zero):
        return round_ste(torch.clamp(x, -self.qmax, self.qmax)) + self.grid_zero


QUANTIZERS: dict[str, type[Quantizer]] = {
    "binary": BinaryQuantizer,
    "seq": StretchedElasticQuantizer,
    "lsq": LSQQuantizer,
    "absmean": AbsMeanTernaryQuantizer,
    "minmax": MinMaxQuantizer,
    "absmax": AbsMaxQuantizer,
}


def paretoq_quantizer_name(bits: float) -> str:
    """The ParetoQ choice per bit-width: binary, SEQ for 1.58/2 bits, LSQ for 3/4/6/8 bits."""
    return {1.0: "binary", 1.58: "seq", 2.0: "seq"}.get(bits, "lsq")


def make_quantizer(bits: float | str, quantizer: str = "auto", group_size: int | None = None) -> Quantizer:
    """Build a quantizer; ``quantizer='auto'`` picks the ParetoQ quantizer for the bit-width."""
    bits = parse_bits(bits)
    name = paretoq_quantizer_name(bits) if quantizer == "auto" else quantizer
    if name not in QUANTIZERS:
        raise LowbitError(f"unknown quantizer {quantizer!r}: choose auto or one of {', '.join(QUANTIZERS)}")
    if name == "absmean":
        return AbsMeanTernaryQuantizer(bits, 0 if group_size is None else group_size)
    return QUANTIZERS[name](bits, group_size)
