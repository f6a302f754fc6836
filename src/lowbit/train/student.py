"""The two models of a QAT run: the frozen full-precision teacher and the quantized student."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.models import load_model
from lowbit.ptq.methods import GPTQ
from lowbit.quant.quantizers import Quantizer
from lowbit.quant.rotation import install_saved_mixes_
from lowbit.quant.surgery import HP_DTYPES, QuantConfig, quantize_model, quantized_modules, round_high_precision_
from lowbit.store.folder import is_quantized_dir, load_quantized

if TYPE_CHECKING:
    from lowbit.train.config import TrainConfig

# QuantConfig fields that a quantized --init folder must share with the run (scale_search only
# matters for initial scales, which the folder already holds; hp_dtype is the folder's own)
_INIT_MUST_MATCH = ("bits", "quantizer", "group_size", "include", "exclude", "quantize_embeddings", "overrides")


def load_teacher(spec: str) -> tuple[nn.Module, object]:
    """The full-precision model (teacher and starting point) and its tokenizer."""
    if Path(spec).is_dir() and is_quantized_dir(spec):
        raise LowbitError(
            f"--model {spec} is a quantized folder, but QAT needs the full-precision model as teacher: "
            "pass the original model as --model and the quantized folder as --init"
        )
    teacher, tokenizer = load_model(spec)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


def _check_same_architecture(student: nn.Module, teacher: nn.Module, where: str) -> None:
    s = {k: tuple(v.shape) for k, v in student.state_dict().items() if ".quantizer." not in k and not k.endswith(".mix")}
    t = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    if s != t:
        raise LowbitError(f"{where} is not a quantized copy of the teacher model (weights differ in names or shapes)")


def _describe(config: QuantConfig, names) -> str:
    return ", ".join(f"{n}={getattr(config, n):g}" if n == "bits" else f"{n}={getattr(config, n)}" for n in names)


def _student_from_folder(teacher: nn.Module, cfg: TrainConfig) -> nn.Module:
    student, _, meta = load_quantized(cfg.init)
    saved = QuantConfig.from_dict(meta["quant_config"])
    differ = [n for n in _INIT_MUST_MATCH if getattr(saved, n) != getattr(cfg.quant, n)]
    if differ:
        raise LowbitError(
            f"--init {cfg.init} holds {_describe(saved, differ)}; this run asks for {_describe(cfg.quant, differ)}"
        )
    _check_same_architecture(student, teacher, f"--init {cfg.init}")
    return student


def build_student(teacher: nn.Module, tokenizer, cfg: TrainConfig, progress: bool = True) -> nn.Module:
    """The model to train: a quantized copy of the teacher, initialised by RTN (scales from
    ``quant.scale_search``, latent weights left in full precision), by GPTQ (``lowbit quantize
    --method gptq`` on ``cfg.calib``), or from a quantized folder."""
    if cfg.init == "rtn":
        return quantize_model(copy.deepcopy(teacher), cfg.quant)
    if cfg.init == "gptq":
        student = copy.deepcopy(teacher)
        method = GPTQ(calib=cfg.calib, calib_tokens=cfg.calib_tokens, seq_len=cfg.calib_seq_len)
        method.apply(student, cfg.quant, tokenizer, progress=progress)
        return student
    return _student_from_folder(teacher, cfg)


def student_skeleton(teacher: nn.Module, qconfig: QuantConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A quantized copy of the teacher whose scales have the shapes stored in ``state``."""
    student = copy.deepcopy(teacher)
    install_saved_mixes_(student, state)  # a rotated --init folder's final norm
    student = quantize_model(student, qconfig, initialize=False)
    for name, module in quantized_modules(student):
        module.quantizer.set_scales(state[f"{name}.quantizer.alpha"], state[f"{name}.quantizer.zero"])
    return student


def compile_quantizers_(model: nn.Module) -> None:
    """``torch.compile`` every quantizer's fake-quant forward: its ~10 elementwise passes over the
    weight (and their saved tensors) fuse into a few kernels, ~3x faster on CPU. Needs a C++
    compiler on CPU; each distinct weight shape compiles once (seconds)."""
    for _, module in quantized_modules(model):
        quantizer = module.quantizer
        if "forward" not in vars(quantizer):
            quantizer.forward = torch.compile(quantizer.forward, dynamic=False)


def uncompile_quantizers_(model: nn.Module) -> None:
    """Back to the eager fake-quant, the exact arithmetic that saving and evaluation use."""
    for _, module in quantized_modules(model):
        vars(module.quantizer).pop("forward", None)


@torch.no_grad()
def round_for_storage_(model: nn.Module) -> None:
    """Round scales to fp16-exact steps and high-precision tensors to the stored dtype, so that the
    saved folder evaluates exactly like the model in memory."""
    for module in model.modules():
        if isinstance(module, Quantizer):
            module.round_scales_(torch.float16)
    round_high_precision_(model, HP_DTYPES[model.lowbit_config.hp_dtype])
