"""Model surgery: swap a causal LM's linear layers (and optionally its embeddings) for quantized ones.

One :class:`QuantConfig` describes *what* to quantize; :func:`quantize_model` applies it. PTQ,
QAT, packing and export all read the same :class:`QuantizedLinear` modules.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.options import parse_count, parse_group_size
from lowbit.quant.quantizers import (
    Quantizer,
    check_group_size,
    make_quantizer,
    parse_bits,
    parse_bits_option,
    parse_override,
)

ROTATION_FIELDS = ("rotate", "rotation_steps", "rotation_lr")  # what lowbit train leaves to lowbit quantize
HP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LayerSpec:
    """How one layer is quantized."""

    bits: float
    quantizer: str = "auto"
    group_size: int | None = None


@dataclass
class QuantConfig:
    """What to quantize: a default spec, name patterns, and per-pattern overrides (mixed precision).

    ``include``/``exclude`` are fnmatch patterns over module names (``model.layers.*.mlp.*``).
    The embedding and output head stay in high precision unless ``quantize_embeddings``.
    ``overrides`` maps a pattern to a dict of LayerSpec fields; the last matching pattern wins.
    High-precision tensors are stored (and evaluated) in ``hp_dtype``.
    """

    bits: float = field(metadata={"help": "1, 1.58 (or ternary), 2, 3, 4, 6 or 8", "parse": parse_bits_option})
    quantizer: str = field(
        default="auto", metadata={"help": "auto (ParetoQ family), binary, seq, lsq, absmean, minmax, absmax"}
    )
    group_size: int | None = field(
        default=None, metadata={"help": "inputs per scale (default: per channel)", "parse": parse_group_size}
    )
    include: list[str] = field(
        default_factory=lambda: ["*"], metadata={"help": "module name patterns to quantize (default all linears)"}
    )
    exclude: list[str] = field(default_factory=list, metadata={"help": "module name patterns to keep in high precision"})
    quantize_embeddings: bool = field(default=False, metadata={"help": "also quantize embedding and output head"})
    overrides: dict[str, dict] = field(
        default_factory=dict,
        metadata={
            "help": "PATTERN=BITS[:GROUP], repeatable",
            "flag": "--override",
            "parse": parse_override,
            "append": True,
            "collect": dict,
        },
    )
    scale_search: str = field(
        default="mse", metadata={"help": "MSE clip search for scales (default mse)", "choices": ("mse", "none")}
    )
    rotate: bool = field(
        default=False,
        metadata={"help": "fold a random Hadamard rotation of the residual stream and of each head into the weights "
                  "first (QuaRot-style incoherence; Llama-style RMSNorm models; unties the output head)"},
    )
    rotation_steps: int = field(
        default=0,
        metadata={"help": "with --rotate: learn the rotation for N steps on the calibration text (SpinQuant-style, "
                  "weight-only); 0 keeps the random Hadamard", "parse": parse_count},
    )
    rotation_lr: float = field(
        default=0.01, metadata={"help": "with --rotation-steps: Adam learning rate of the rotation (Cayley parameters)"}
    )
    ternary_storage: str = field(
        default="t5",
        metadata={"help": "how ternary codes are stored: t5 (5 per byte, 1.6 bits: the smallest file; the packed "
                  "runtime unpacks them to 2-bit codes in memory) or u2 (2 bits: read in place, resident memory = "
                  "stored bytes)", "choices": ("t5", "u2")},
    )
    hp_dtype: str = field(default="float16", metadata={"cli": False})

    def __post_init__(self):
        self.bits = parse_bits(self.bits)
        if self.hp_dtype not in HP_DTYPES:
            raise LowbitError(f"hp_dtype must be one of {', '.join(HP_DTYPES)}, not {self.hp_dtype!r}")
        if self.ternary_storage not in ("t5", "u2"):
            raise LowbitError(f"ternary_storage must be t5 or u2, not {self.ternary_storage!r}")
        for pattern, spec in self.overrides.items():
            unknown = set(spec) - {"bits", "quantizer", "group_size"}
            if unknown:
                raise LowbitError(f"override {pattern!r} has unknown keys {sorted(unknown)}: use bits, quantizer, group_size")
            if "bits" in spec:
                spec["bits"] = parse_bits(spec["bits"])
        self._check_rotation()
        self._check_quantizers()

    def _check_rotation(self) -> None:
        if not isinstance(self.rotation_steps, int) or self.rotation_steps < 0:
            raise LowbitError(f"rotation_steps must be an integer >= 0, not {self.rotation_steps!r}")
        if self.rotation_steps and not self.rotate:
            raise LowbitError("rotation_steps learns the rotation that --rotate folds: add --rotate, or drop --rotation-steps")
        if not (isinstance(self.rotation_lr, (int, float)) and math.isfinite(self.rotation_lr) and self.rotation_lr > 0):
            raise LowbitError(f"rotation_lr must be a positive number, not {self.rotation_lr!r}")

    def _check_quantizers(self) -> None:
        """Refuse, before any work, a quantizer that cannot give the bit-width asked for (the default
        spec and each override on top of it); make_quantizer raises the one-line error."""
        base = LayerSpec(self.bits, self.quantizer, self.group_size)
        for spec in [base] + [LayerSpec(**{**asdict(base), **fields}) for fields in self.overrides.values()]:
            make_quantizer(spec.bits, spec.quantizer, spec.group_size)

    def spec_for(self, name: str) -> LayerSpec | None:
        """The LayerSpec for module ``name``, or None if it stays in high precision."""
        if not any(fnmatch.fnmatch(name, p) for p in self.include):
            return None
        if any(fnmatch.fnmatch(name, p) for p in self.exclude):
            return None
        spec = LayerSpec(self.bits, self.quantizer, self.group_size)
        for pattern, fields in self.overrides.items():
            if fnmatch.fnmatch(name, pattern):
                spec = LayerSpec(**{**asdict(spec), **fields})
        return spec

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(**d)


class QuantizedLinear(nn.Module):
    """``nn.Linear`` whose weight passes through a fake-quant :class:`Quantizer` in forward."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, quantizer: Quantizer):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.quantizer = quantizer

    def quantized_weight(self) -> torch.Tensor:
        return self.quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` with a fake-quantized table (one scale per token row or group)."""

    def __init__(self, embedding: nn.Embedding, quantizer: Quantizer):
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.quantizer = quantizer
        self.num_embeddings, self.embedding_dim = embedding.weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.quantizer(self.weight), self.padding_idx)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return ()
    return (Conv1D,)


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of an nn.Linear or a GPT-2 Conv1D (whose weight is (in, out))."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, *_conv1d_class()))


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (and input embedding) modules of a causal LM."""
    names = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is out or module is inp:
            names.add(name)
    return names


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, config: QuantConfig, initialize: bool = True) -> nn.Module:
    """Swap linear layers for :class:`QuantizedLinear` in place, following ``config``.

    With ``initialize`` the scales are set from the current weights (``config.scale_search``);
    high-precision parameters are rounded to ``config.hp_dtype`` so that evaluation sees what
    will be stored. Returns the model, with ``model.lowbit_config`` set.
    """
    if getattr(model, "lowbit_config", None) is not None:
        raise LowbitError("this model is already quantized: load the full-precision model instead")
    if initialize and config.rotate and getattr(model, "lowbit_rotation", None) is None:
        raise LowbitError(
            "QuantConfig(rotate=True) but the model is not rotated: quantize it through a method "
            "(lowbit.quantize(model, config, method), or method.apply), which rotates it once before its first look "
            "at the weights, or call lowbit.quant.rotation_learn.rotate_for_(model, config) first"
        )
    heads = output_head_names(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    targets: list[tuple[str, nn.Module, LayerSpec]] = []
    for name, module in model.named_modules():
        if name in heads:
            continue
        if is_linear(module):
            spec = config.spec_for(name)
            if spec is not None:
                targets.append((name, module, spec))
    if not targets and not config.quantize_embeddings:
        raise LowbitError("no linear layer matched the include/exclude patterns: nothing to quantize")
    for name, module, spec in targets:
        weight, bias = linear_weight(module)
        check_group_size(spec.group_size, weight.shape[1])
        if not isinstance(module, nn.Linear):  # Conv1D: store as (out, in)
            weight = nn.Parameter(weight.detach().contiguous(), requires_grad=module.weight.requires_grad)
        quantizer = make_quantizer(spec.bits, spec.quantizer, spec.group_size)
        if initialize:
            quantizer.initialize(weight, search=config.scale_search)
        set_module(model, name, QuantizedLinear(weight, bias, quantizer))
    if config.quantize_embeddings:
        _quantize_embeddings(model, config, in_emb, out_emb, tied, initialize)
    round_high_precision_(model, HP_DTYPES[config.hp_dtype])
    model.lowbit_config = config
    return model


def _quantize_embeddings(model, config, in_emb, out_emb, tied, initialize):
    spec = LayerSpec(config.bits, config.quantizer, config.group_size)
    for pattern, fields in config.overrides.items():
        if pattern in ("embeddings", "lm_head"):
            spec = LayerSpec(**{**asdict(spec), **fields})
    names = {m: n for n, m in model.named_modules()}
    q_in = make_quantizer(spec.bits, spec.quantizer, spec.group_size)
    if initialize:
        q_in.initialize(in_emb.weight, search=config.scale_search)
    set_module(model, names[in_emb], QuantizedEmbedding(in_emb, q_in))
    if out_emb is not None and isinstance(out_emb, nn.Linear):
        q_out = q_in if tied else make_quantizer(spec.bits, spec.quantizer, spec.group_size)
        if initialize and not tied:
            q_out.initialize(out_emb.weight, search=config.scale_search)
        set_module(model, names[out_emb], QuantizedLinear(out_emb.weight, out_emb.bias, q_out))


@torch.no_grad()
def round_high_precision_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every high-precision parameter to ``dtype`` (kept as float32) and quantizer steps to fp16."""
    if dtype == torch.float32:
        return
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.round_scales_(torch.float16)
    for name, p in model.named_parameters():
        if ".quantizer." in name or (name.endswith(".weight") and _is_quantized_weight(model, name)):
            continue
        if p.dtype == torch.float32:
            if not p.is_contiguous():
                p.copy_(p.to(dtype).float())
                continue
            for part in p.view(-1).split(1 << 22):  # 16 MB at a time: no second copy of a 0.5 GB embedding
                part.copy_(part.to(dtype).float())


def _is_quantized_weight(model: nn.Module, param_name: str) -> bool:
    owner = model.get_submodule(param_name.rpartition(".")[0])
    return isinstance(owner, (QuantizedLinear, QuantizedEmbedding))


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear | QuantizedEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]


@torch.no_grad()
def snap_weights_(model: nn.Module) -> None:
    """Replace every quantized module's float weight by its quantized value (idempotent).

    After this, codes x scales reproduce the weight exactly and the fake-quant is a no-op.
    """
    for _, module in quantized_modules(model):
        module.weight.copy_(module.quantizer(module.weight))
