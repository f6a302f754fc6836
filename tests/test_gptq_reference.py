"""lowbit's GPTQ against a short, independent, textbook GPTQ written here.

The reference follows the paper (Frantar et al. 2023, arXiv:2210.17323; docs/methods.md, "GPTQ")
literally: ``H = 2 X X^T / n``, dead inputs zeroed, ~1% diagonal damping, the upper Cholesky
factor ``U`` of ``H^-1``, then one column at a time: quantize, divide the error by ``U_ii`` and
subtract it times row ``i`` of ``U`` from every later column. No lazy-batch blocks. Groups take
their scale when their first column is reached (from the updated weights), or, with act-order,
from the original weights before any update ("static groups").

The grid is re-implemented here too, to be the one lowbit uses (docs/methods.md, "LSQ: 3, 4 and
8-bit", "SEQ: ternary and 2-bit", "Scale search (MSE clip)"): ParetoQ's LSQ at 4 bits and SEQ at
2 bits, the scale from max|W| (optionally shrunk by the MSE clip search), each step rounded to
fp16. With ``block_size`` covering all columns lowbit performs the same float operations as the
reference, so the results must be identical; with smaller blocks (the lazy-batch regrouping) they
must agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.ptq.gptq import gptq_quantize_weight
from lowbit.quant.quantizers import make_quantizer

MSE_RATIOS = torch.linspace(1.0, 0.2, 40).tolist()


# ---------------------------------------------------------------------------- reference grid


class Grid:
    """Independent re-statement of lowbit's LSQ (4-bit) / SEQ (2-bit) grid for one group of columns."""

    def __init__(self, bits: int):
        self.bits = bits

    def init_alpha(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.abs().amax(dim=1, keepdim=True)
        return amax / 7 if self.bits == 4 else amax  # LSQ: max|W| / (2^(b-1) - 1); SEQ: max|W|

    def step_per_alpha(self) -> float:
        return 1.0 if self.bits == 4 else 0.5

    def quantize(self, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        x = w / alpha
        if self.bits == 4:  # levels alpha * {-8, ..., 7}
            return alpha * torch.clamp(torch.round(x), -8, 7)
        # SEQ 2-bit: levels alpha * {-3/4, -1/4, 1/4, 3/4}, input clipped at +-0.99
        return alpha * ((torch.round(torch.clamp(x, -0.99, 0.99) * 2 - 0.5) + 0.5) / 2)

    def scales(self, w: torch.Tensor, search: str) -> torch.Tensor:
        """Per-row alpha (rows, 1) for the group ``w`` (rows, g), its step exact in fp16."""
        alpha = self.init_alpha(w).clamp_min(1e-8)
        if search == "mse":
            errs = torch.stack([((self.quantize(w, alpha * r) - w) ** 2).sum(1) for r in MSE_RATIOS], 1)
            best = errs.argmin(1)  # first ratio with the smallest error
            alpha = alpha * torch.tensor(MSE_RATIOS)[best].unsqueeze(1)
        c = self.step_per_alpha()
        return (alpha * c).half().float() / c


def rtn_reference(weight: torch.Tensor, grid: Grid, group: int | None, search: str) -> torch.Tensor:
    """Round-to-nearest on the same grid: every group's scale from the original weights, no updates."""
    g = group or weight.shape[1]
    out = torch.empty_like(weight)
    for j in range(0, weight.shape[1], g):
        w = weight[:, j : j + g]
        out[:, j : j + g] = grid.quantize(w, grid.scales(w, search))
    return out


# ---------------------------------------------------------------------------- reference GPTQ


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X X^T / n`` for layer inputs ``x`` (n tokens, in_features)."""
    return 2.0 * x.t() @ x / x.shape[0]


def gptq_reference(weight, H, grid: Grid, group: int | None, damp: float, act_order: bool, search: str):
    """Textbook GPTQ, one column at a time. Returns the quantized weight (rows, cols)."""
    W = weight.float().clone()
    H = H.clone()
    cols = W.shape[1]
    g = group or cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = act_order or group is None
    alphas = {}
    if static:  # every group's scale from the original weights, before any update
        for j in range(0, cols, g):
            alphas[j // g] = grid.scales(W[:, j : j + g], search)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(cols):
        col = int(perm[i])
        if not static and col % g == 0:  # the group starts here: scale from the updated weights
            alphas[col // g] = grid.scales(W[:, i : i + g], search)
        w = W[:, i : i + 1]
        q = grid.quantize(w, alphas[col // g])
        Q[:, i] = q[:, 0]
        err = (w[:, 0] - q[:, 0]) / U[i, i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
    return Q[:, torch.argsort(perm)]


# ---------------------------------------------------------------------------- cases


def layer(rows: int, cols: int, seed: int, dead: tuple[int, ...] = ()):
    """A random weight and correlated calibration inputs (n = 4 * cols tokens)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=gen) @ mix
    scale = torch.rand(cols, generator=gen) * 2 + 0.1  # inputs of unequal size, so act-order matters
    x = x * scale
    x[:, list(dead)] = 0.0
    return weight, x


def lowbit_gptq(weight, H, bits, group, damp, act_order, search, block_size):
    quantizer = make_quantizer(bits, "auto", group)  # LSQ at 4 bits, SEQ at 2 bits
    assert quantizer.name == ("lsq" if bits == 4 else "seq")
    q, alpha, zero = gptq_quantize_weight(
        weight, H, quantizer, damp=damp, act_order=act_order, block_size=block_size, scale_search=search
    )
    return q, alpha, zero, quantizer


CASES = [  # rows, cols, bits, group, act_order, search, dead inputs
    (16, 64, 4, None, False, "none", ()),
    (16, 64, 4, None, True, "none", ()),
    (32, 96, 4, 32, False, "none", ()),
    (32, 96, 4, 32, True, "none", ()),
    (32, 96, 2, 32, False, "none", ()),
    (16, 64, 2, 32, True, "none", ()),
    (32, 96, 4, 32, False, "mse", ()),
    (32, 96, 2, 32, True, "mse", ()),
    (16, 64, 4, 16, False, "none", (3, 40)),
    (16, 80, 4, 32, True, "none", (0,)),  # a shorter last group
]


@pytest.mark.parametrize("rows,cols,bits,group,act_order,search,dead", CASES)
def test_gptq_matches_textbook_reference_exactly(rows, cols, bits, group, act_order, search, dead):
    weight, x = layer(rows, cols, seed=rows + cols + bits, dead=dead)
    H = hessian(x)
    expected = gptq_reference(weight, H, Grid(bits), group, 0.01, act_order, search)
    q, alpha, zero, quantizer = lowbit_gptq(weight, H, bits, group, 0.01, act_order, search, block_size=cols)
    assert torch.equal(q, expected)
    # the returned scales describe the same grid: re-quantizing the result changes nothing
    g = group or cols
    for j in range(0, cols, g):
        block = q[:, j : j + g]
        again = quantizer.fake_quantize_with(block, alpha[:, j // g : j // g + 1], zero[:, j // g : j // g + 1])
        assert torch.equal(again, block)
    if dead:
        assert torch.all(q[:, list(dead)] == 0)


@pytest.mark.parametrize("group,act_order", [(None, False), (64, False), (64, True)])
def test_gptq_lazy_batches_agree_with_reference(group, act_order):
    """Blocks of 128 columns (the default) over 320 columns: the same arithmetic regrouped, so the
    float32 updates of later columns differ only by rounding; on the grid the results agree except
    where a weight lies within rounding of a decision boundary (none with these seeds)."""
    weight, x = layer(24, 320, seed=7)
    H = hessian(x)
    expected = gptq_reference(weight, H, Grid(4), group, 0.01, act_order, "none")
    q, *_ = lowbit_gptq(weight, H, 4, group, 0.01, act_order, "none", block_size=128)
    step = weight.abs().max() / 7
    mismatched = (q - expected).abs() > 1e-4 * step
    assert mismatched.float().mean() < 0.005, f"{int(mismatched.sum())} of {q.numel()} weights differ"


@pytest.mark.parametrize("rows,cols,bits,group,act_order", [
    (16, 64, 4, None, False), (32, 96, 4, 32, False), (32, 96, 4, 32, True), (32, 96, 2, 32, False),
])  # fmt: skip
def test_gptq_output_error_below_rtn_on_same_grid(rows, cols, bits, group, act_order):
    """On its calibration inputs GPTQ's layer output error ||(W - Q) X^T||^2 is below RTN's."""
    weight, x = layer(rows, cols, seed=100 + rows + cols)
    H = hessian(x)
    q, *_ = lowbit_gptq(weight, H, bits, group, 0.01, act_order, "none", block_size=128)
    rtn_q = rtn_reference(weight, Grid(bits), group, "none")

    def out_err(wq):
        return float((((weight - wq) @ x.t()) ** 2).sum())

    assert out_err(q) < 0.9 * out_err(rtn_q), (out_err(q), out_err(rtn_q))
    # and RTN here is lowbit's own round-to-nearest on that grid
    quantizer = make_quantizer(bits, "auto", group)
    quantizer.initialize(weight, search="none")
    quantizer.round_scales_()
    assert torch.equal(quantizer(weight), rtn_q)
