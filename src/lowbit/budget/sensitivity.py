"""What each layer costs and loses at each quantization setting: the tables a byte budget is planned on.

Bytes are counted the way :func:`lowbit.store.folder.build_state` stores a layer (packed codes at their layout's
width, fp16 steps, uint8 zero points for min-max grids), so a plan's predicted size is the size
:func:`lowbit.eval.evaluation.size_account` reports for the quantized model.

Loss is predicted from the diagonal of the empirical Fisher information of the next-token loss,
``F = E[g * g]`` over calibration windows, as a second-order estimate of the loss increase when a
layer's weights move by the rounding error ``dW = W - Q_s(W)``: ``0.5 * sum(F * dW**2)`` (the
Fisher-weighted error of SqueezeLLM, Kim et al. 2023, arXiv:2306.07629; a diagonal stand-in for the
Hessian sensitivity of HAWQ-V2, Dong et al. 2020, arXiv:1911.03852). ``Q_s`` is round-to-nearest at
setting ``s`` with the scales lowbit would choose (``QuantConfig.scale_search``), so the estimates of
different layers and settings are in the same unit (nats per token) and can be added. Rows are
quantized independently (every grid here has its scales per row or per group within a row), so the
sum is estimated on evenly spaced rows and scaled up: the same rows for every setting of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.options import parse_group_size
from lowbit.quant.packing import default_layout, packed_nbytes
from lowbit.quant.quantizers import QUANTIZERS, check_group_size, make_quantizer, parse_bits

SAMPLE_ROWS = 128  # rows per layer the rounding error is measured on (at least 1/8 of them; all if fewer)
STEP_BYTES = 2  # steps are stored as fp16 (quantizers round them so that fp16 is exact)
ZERO_BYTES = 1  # min-max zero points are stored as uint8


@dataclass(frozen=True)
class Setting:
    """One candidate way to store a layer: bit-width, group size (None: one scale per row) and grid."""

    bits: float
    group_size: int | None
    quantizer: str = "auto"

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``BITS:GROUP:GRID``, e.g. ``4:64:minmax`` or ``3:channel:auto`` (GRID defaults to auto)."""
        parts = str(text).split(":")
        if len(parts) not in (2, 3):
            raise LowbitError(f"candidate {text!r} must look like BITS:GROUP[:GRID], e.g. 4:64:minmax or 8:channel")
        try:
            group = parse_group_size(parts[1])
        except Exception as exc:  # argparse.ArgumentTypeError: one line for the user
            raise LowbitError(f"candidate {text!r}: {exc}") from exc
        grid = parts[2] if len(parts) == 3 else "auto"
        if grid == "absmean":
            raise LowbitError(f"candidate {text!r}: absmean has one scale per tensor, which the planner does not offer")
        if grid != "auto" and grid not in QUANTIZERS:
            raise LowbitError(f"candidate {text!r}: grid must be auto or one of {', '.join(QUANTIZERS)}")
        setting = cls(parse_bits(parts[0]), group, grid)
        setting.make_quantizer()  # refuses combinations no quantizer supports (minmax 1.58, ...)
        return setting

    def __str__(self) -> str:
        return f"{self.bits:g}:{self.group_size or 'channel'}:{self.quantizer}"

    def spec(self) -> dict:
        """The setting as a QuantConfig override (``LayerSpec`` fields)."""
        return {"bits": self.bits, "quantizer": self.quantizer, "group_size": self.group_size}

    def make_quantizer(self):
        return make_quantizer(self.bits, self.quantizer, self.group_size)

    def fits(self, cols: int) -> bool:
        """Whether a layer with rows of ``cols`` inputs can take this setting."""
        try:
            check_group_size(self.group_size, cols)
        except LowbitError:
            return False
        return True

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes a (rows, cols) layer takes in the folder at this setting (codes, steps, zero points)."""
        q = self.make_quantizer()
        g = q.group_size
        n_groups = 1 if g == 0 else rows * (1 if g is None else -(-cols // g))
        scales = n_groups * (STEP_BYTES + (0 if q.symmetric_zero else ZERO_BYTES))
        return packed_nbytes(default_layout(q.n_levels), rows, cols) + scales


def fisher_diagonal(model: nn.Module, windows: torch.Tensor, weights: dict[str, nn.Parameter], progress: bool = True):
    """Diagonal empirical Fisher of the next-token loss for each tensor in ``weights``: the mean over
    ``windows`` (one backward pass each) of the squared gradient of the window's summed token loss,
    divided by the tokens per window, i.e. per-token units if token gradients are independent."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    targets = {id(p) for p in weights.values()}
    for p in params:
        p.requires_grad_(id(p) in targets)
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in weights.items()}
    tokens = windows.shape[1] - 1
    try:
        with torch.enable_grad():
            for ids in tqdm(windows, desc="Fisher", disable=not progress, unit="window"):
                logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
                loss = nn.functional.cross_entropy(logits, ids[1:], reduction="sum")
                grads = torch.autograd.grad(loss, list(weights.values()))
                for (name, _), g in zip(weights.items(), grads, strict=True):
                    fisher[name].add_(g.float().square())
    finally:
        for p, flag in zip(params, was, strict=True):
            p.requires_grad_(flag)
    n = len(windows) * tokens
    return {name: f.div_(n) for name, f in fisher.items()}


@torch.no_grad()
def predicted_increase(weight: torch.Tensor, fisher: torch.Tensor, setting: Setting, scale_search: str) -> float:
    """``0.5 * sum(F * (W - Q(W))**2)``: the loss increase predicted for round-to-nearest at ``setting``."""
    w = weight.detach().float()
    q = setting.make_quantizer()
    q.initialize(w, search=scale_search)
    q.round_scales_()
    return 0.5 * float((fisher * (w - q(w)).square()).sum())


def _sample_rows(weight: torch.Tensor, fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Evenly spaced rows of (weight, Fisher) and the factor that scales their sum to the whole layer."""
    rows = weight.shape[0]
    keep = min(rows, max(SAMPLE_ROWS, rows // 8))
    idx = torch.linspace(0, rows - 1, keep).round().long().unique()
    return weight.detach()[idx], fisher[idx], rows / len(idx)


@dataclass
class LayerTable:
    """One planned item (a decoder linear, or the embedding with its head): its candidates' bytes and
    predicted loss increase; ``params`` counts its weights once."""

    name: str
    params: int
    settings: list[Setting]
    nbytes: list[int]
    loss: list[float]


def layer_table(
    name: str, tensors: list[tuple[torch.Tensor, torch.Tensor]], candidates: list[Setting], scale_search: str
) -> LayerTable:
    """The table of one item stored as ``tensors`` ((weight, fisher) pairs sharing one setting: the
    untied embedding and head), over the candidates its row length allows. Per-tensor grids (group
    size 0) are not row-separable and are not offered (``Setting.parse`` accepts no group 0)."""
    cols = tensors[0][0].shape[1]
    fitting = [s for s in candidates if s.fits(cols)]
    if not fitting:
        raise LowbitError(f"no candidate setting fits {name} (rows of {cols}): add a smaller group size")
    nbytes = [sum(s.nbytes(*w.shape) for w, _ in tensors) for s in fitting]
    samples = [_sample_rows(w, f) for w, f in tensors]
    loss = [sum(scale * predicted_increase(w, f, s, scale_search) for w, f, scale in samples) for s in fitting]
    params = sum(w.numel() for w, _ in tensors)
    return LayerTable(name, params, fitting, nbytes, loss)
