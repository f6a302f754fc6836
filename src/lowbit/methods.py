"""Quantization methods as typed settings behind one verb.

``lowbit.quantize(model, config, method=RTN() | GPTQ(calib_tokens=65536) | "gptq")``: the
:class:`~lowbit.surgery.QuantConfig` says *what* to quantize (bits, grid, groups, layers), the
method object says *how* (and with which data). Every method is a dataclass registered under a
name; the CLI, the Pareto sweep and QAT's ``--init`` build methods through :func:`make_method`,
so a new method (rotations, block-wise distillation, a budget planner) is one class plus
``@register_method``, with its command-line options generated from its fields
(:mod:`lowbit.options`).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from torch import nn

from lowbit.errors import LowbitError
from lowbit.options import parse_positive_int
from lowbit.surgery import QuantConfig


class Method(Protocol):
    """A way to quantize a model in place: ``apply`` returns what the method reports (may be {})."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "post-training" (minutes, calibration data at most) or "training"

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict: ...


_REGISTRY: dict[str, type | str] = {}
_KINDS: dict[str, str] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a dataclass with a ``name``, a ``kind`` and ``apply``) available by name."""
    _REGISTRY[cls.name] = cls
    _KINDS[cls.name] = getattr(cls, "kind", "post-training")
    return cls


def register_lazy(name: str, target: str, kind: str) -> None:
    """Register a method whose class lives in a module imported on first use (``"module:Class"``)."""
    _REGISTRY.setdefault(name, target)
    _KINDS.setdefault(name, kind)


def method_names(kind: str | None = None) -> list[str]:
    """Registered method names, optionally only those of one ``kind`` ("post-training", "training")."""
    return [n for n in _REGISTRY if kind is None or _KINDS[n] == kind]


def method_class(name: str) -> type:
    target = _REGISTRY.get(name)
    if target is None:
        raise LowbitError(f"unknown method {name!r}: use one of {', '.join(_REGISTRY)}")
    if isinstance(target, str):
        module, _, cls_name = target.partition(":")
        target = getattr(importlib.import_module(module), cls_name)
        _REGISTRY[name] = target
    return target


def make_method(name: str | Method, **settings) -> Method:
    """The method ``name`` with those of ``settings`` that are its fields (others are ignored, so one
    settings dict can configure any method); a method object passes through unchanged."""
    if not isinstance(name, str):
        return name
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in known})


def method_settings(method: Method) -> dict:
    """A method's fields as a plain dict (recorded in a folder's ``lowbit.json``)."""
    return dataclasses.asdict(method)


def calibration_windows(tokenizer, text: str, tokens: int, seq_len: int, sample: str = "first", seed: int = 0):
    """Calibration windows as every calibrated method reads them, each starting with BOS where the
    tokenizer adds one (as evaluation does): the first ``tokens`` tokens of ``text`` in windows of
    ``seq_len`` (``sample="first"``), or ``tokens // seq_len`` windows drawn at random (seeded) from
    the whole text cut into windows (``sample="random"``, as llmcompressor and GPTQ's authors sample)."""
    import torch

    from lowbit.data import get_text, tokenize_windows, tokenizer_adds_bos

    if tokenizer is None:
        raise LowbitError("a calibrated method needs the model's tokenizer to read its calibration text")
    bos = tokenizer_adds_bos(tokenizer)
    if sample == "first":
        return tokenize_windows(tokenizer, get_text(text), seq_len, max_tokens=tokens, bos=bos)
    if sample != "random":
        raise LowbitError(f"unknown calibration sampling {sample!r}: use first or random")
    windows = tokenize_windows(tokenizer, get_text(text), seq_len, bos=bos)
    n = max(1, tokens // seq_len)
    if n > len(windows):
        raise LowbitError(
            f"{text} holds {len(windows)} windows of {seq_len} tokens, fewer than the {n} asked for "
            f"(calib_tokens {tokens}): use a longer text (e.g. wiki-train) or fewer calibration tokens"
        )
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n]
    return windows[pick.sort().values]


@register_method
@dataclass(frozen=True)
class RTN:
    """Round-to-nearest: scales from the weights alone (``QuantConfig.scale_search``), no data."""

    name: ClassVar[str] = "rtn"
    kind: ClassVar[str] = "post-training"
    data_parallel: ClassVar[bool] = True  # under torchrun every rank computes the same, rank 0 writes

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        from lowbit.ptq import rtn

        rtn(model, config)
        return {}


@register_method
@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022) one decoder block at a time on calibration windows of ``calib``."""

    name: ClassVar[str] = "gptq"
    kind: ClassVar[str] = "post-training"
    data_parallel: ClassVar[bool] = True  # under torchrun the ranks split the calibration batches

    calib: str = field(default="wiki-calib", metadata={"help": "calibration text: wiki-calib, news or a text file"})
    calib_tokens: int = field(default=16384, metadata={"help": "calibration tokens", "parse": parse_positive_int})
    seq_len: int = field(default=512, metadata={"help": "calibration window length", "parse": parse_positive_int})
    act_order: bool = field(
        default=True,
        metadata={"help": "quantize columns by decreasing Hessian diagonal, group scales fixed first (static groups)"},
    )
    damp: float = field(default=0.01, metadata={"help": "diagonal damping, fraction of mean diag(H)"})
    sequential: bool = field(
        default=False, metadata={"help": "true sequential: quantize a block's linears stage by stage (q/k/v, o, ...)"}
    )
    sample: str = field(
        default="first",
        metadata={"help": "calibration windows: the first calib_tokens of the text, or random windows of all of it",
                  "choices": ("first", "random")},
    )
    seed: int = field(default=0, metadata={"help": "seed of --sample random"})

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        from lowbit.models import check_seq_len
        from lowbit.ptq import gptq
        from lowbit.rotation import rotate_for_

        check_seq_len(model, self.seq_len, "--seq-len")
        ids = calibration_windows(tokenizer, self.calib, self.calib_tokens, self.seq_len, self.sample, self.seed)
        rotate_for_(model, config, calib=ids, progress=progress)  # a learned rotation reads the same windows
        gptq(model, config, ids, act_order=self.act_order, damp=self.damp, progress=progress,
             sequential=self.sequential)
        return {}


register_lazy("qat", "lowbit.qat:QAT", kind="training")
SWEEPABLE = ("rtn", "gptq", "qat")  # methods a bits x group sweep can run (a byte budget chooses its own bits)
register_lazy("budget", "lowbit.planner:Budget", kind="post-training")
register_lazy("auto", "lowbit.auto:Auto", kind="post-training")
register_lazy("blockap", "lowbit.blockwise:BlockAP", kind="post-training")
