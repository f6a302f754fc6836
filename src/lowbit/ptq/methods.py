"""Quantization methods as typed settings behind one verb.

``lowbit.quantize(model, config, method=RTN() | GPTQ(calib_tokens=65536) | "gptq")``: the
:class:`~lowbit.quant.surgery.QuantConfig` says *what* to quantize (bits, grid, groups, layers), the
method object says *how* (and with which data). Every method is a dataclass registered under a
name; the CLI, the Pareto sweep and QAT's ``--init`` build methods through :func:`make_method`,
so a new method (rotations, block-wise distillation, a budget planner) is one class plus
``@register_method``, with its command-line options generated from its fields
(:mod:`lowbit.options`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.lazy import load_object
from lowbit.options import parse_positive_int
from lowbit.quant.surgery import QuantConfig


class Method(Protocol):
    """A way to quantize a model in place: ``apply`` returns what the method reports (may be {})."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "post-training" (minutes, calibration data at most) or "training"

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict: ...


class StreamedMethod(Method, Protocol):
    """A method that also quantizes a checkpoint one decoder block at a time (:mod:`lowbit.ptq.streaming`)
    declares ``streamable = True`` and the hooks the block runner calls, so the runner never asks
    which method it runs. A method that plans first (the byte budget) declares ``stream_plan``
    instead: it returns the plan, whose ``planned_run`` is the method and config the blocks then run."""

    streamable: ClassVar[bool]

    def stream_windows(self, model: nn.Module, tokenizer) -> torch.Tensor | None:
        """Calibration windows whose block inputs the runner captures, or None for a method without data."""

    def quantize_block(self, scope: nn.Module, block: nn.Module, linears: dict, config: QuantConfig, store) -> None:
        """Quantize one materialised block's ``linears`` (full names under ``scope``); a method with
        data advances ``store`` (the block inputs) through the quantized block."""

    def quantize_rest(self, model: nn.Module, config: QuantConfig) -> None:
        """Quantize what lies outside the decoder blocks (embedding and head, where ``config`` says so)."""


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
        target = load_object(target)
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


def streamable_methods() -> list[str]:
    """The registered methods that can quantize a checkpoint one block at a time."""
    return [n for n in method_names() if getattr(method_class(n), "streamable", False)]


def run_record(model_spec: str, method: Method, seconds: float, report: dict | None = None,
               rotation: dict | None = None, streamed: bool = False) -> dict:
    """What a quantized folder's ``lowbit.json`` records of the run that made it (``info``), built
    the same way for an in-memory and a streamed run."""
    from lowbit.eval.models import model_id, reference_identity

    info = {
        **reference_identity(model_spec),
        "base_model_id": model_id(model_spec),
        "method": method.name,
        "quantize_seconds": round(seconds, 2),
        "settings": method_settings(method),
    }
    if streamed:
        info["streamed"] = True
    if report:  # what the method reports (a byte budget's plan)
        info["report"] = report
    if rotation:
        info["rotation"] = rotation
    return info


def calibration_windows(tokenizer, text: str, tokens: int, seq_len: int, sample: str = "first", seed: int = 0):
    """Calibration windows as every calibrated method reads them, each starting with BOS where the
    tokenizer adds one (as evaluation does): the first ``tokens`` tokens of ``text`` in windows of
    ``seq_len`` (``sample="first"``), or ``tokens // seq_len`` windows drawn at random (seeded) from
    the whole text cut into windows (``sample="random"``, as llmcompressor and GPTQ's authors sample)."""
    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos

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
    streamable: ClassVar[bool] = True

    def apply(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        from lowbit.quant.rotation_learn import rotate_for_

        rotate_for_(model, config)
        return self.quantize(model, config, tokenizer, progress)

    def quantize(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True) -> dict:
        """:meth:`apply` on a model already rotated as ``config`` asks (what a planning method calls)."""
        from lowbit.ptq.gptq import rtn

        rtn(model, config)
        return {}

    def stream_windows(self, model: nn.Module, tokenizer) -> None:
        return None

    def quantize_block(self, scope: nn.Module, block: nn.Module, linears: dict, config: QuantConfig, store) -> None:
        if linears:
            self.quantize_rest(scope, config)

    def quantize_rest(self, model: nn.Module, config: QuantConfig) -> None:
        from lowbit.ptq.gptq import rtn

        rtn(model, config)

    @classmethod
    def sweep_settings(cls, spec, fingerprints: dict[str, str]) -> list[tuple[dict, dict]]:
        """A Pareto sweep's points of this method (:mod:`lowbit.pareto`), one per bit-width and
        granularity of ``spec``: (settings for :func:`make_method`, settings added to the point's key)."""
        return [({}, point) for point in spec.uniform_points()]


@register_method
@dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022) one decoder block at a time on calibration windows of ``calib``."""

    name: ClassVar[str] = "gptq"
    kind: ClassVar[str] = "post-training"
    data_parallel: ClassVar[bool] = True  # under torchrun the ranks split the calibration batches
    streamable: ClassVar[bool] = True

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
        from lowbit.quant.rotation_learn import rotate_for_

        ids = self.windows(model, tokenizer)
        rotate_for_(model, config, calib=ids, progress=progress)  # a learned rotation reads the same windows
        return self.quantize(model, config, tokenizer, progress, ids)

    def quantize(self, model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True,
                 ids: torch.Tensor | None = None) -> dict:
        """:meth:`apply` on a model already rotated as ``config`` asks (what a planning method calls)."""
        from lowbit.ptq.gptq import gptq

        ids = self.windows(model, tokenizer) if ids is None else ids
        gptq(model, config, ids, act_order=self.act_order, damp=self.damp, progress=progress,
             sequential=self.sequential)
        return {}

    def windows(self, model: nn.Module, tokenizer) -> torch.Tensor:
        """The calibration windows (checked against the model's context length)."""
        from lowbit.eval.models import check_seq_len

        check_seq_len(model, self.seq_len, "--seq-len")
        return calibration_windows(tokenizer, self.calib, self.calib_tokens, self.seq_len, self.sample, self.seed)

    def stream_windows(self, model: nn.Module, tokenizer) -> torch.Tensor:
        ids = self.windows(model, tokenizer)
        if ids.ndim != 2 or len(ids) == 0:
            raise LowbitError("GPTQ needs at least one calibration window of tokens")
        return ids

    def quantize_block(self, scope: nn.Module, block: nn.Module, linears: dict, config: QuantConfig, store) -> None:
        from lowbit.ptq.blocks import install_scales
        from lowbit.ptq.gptq import gptq_block

        results = gptq_block(block, linears, config, store, self.damp, self.act_order, self.sequential)
        if linears:
            install_scales(scope, config, results)

    def quantize_rest(self, model: nn.Module, config: QuantConfig) -> None:
        from lowbit.ptq.blocks import install_scales

        with torch.no_grad():  # as gptq ends: embeddings (if quantized) by round-to-nearest
            install_scales(model, config, {})

    @classmethod
    def sweep_settings(cls, spec, fingerprints: dict[str, str]) -> list[tuple[dict, dict]]:
        """A Pareto sweep's GPTQ points, one per bit-width and granularity, all calibrated on the sweep's
        ``calib`` text (its content hash from ``fingerprints`` in the key) with ``spec.gptq_settings``
        as further fields: (settings for :func:`make_method`, settings added to the point's key)."""
        made = {"calib": spec.calib, "calib_tokens": spec.calib_tokens, "seq_len": spec.seq_len,
                "act_order": spec.act_order, "damp": spec.damp, **spec.gptq_settings}  # fmt: skip
        keyed = {
            "calib": spec.calib,
            "calib_sha256": fingerprints[spec.calib],
            "calib_tokens": spec.calib_tokens,
            "damp": spec.damp,
            "act_order": spec.act_order,
            **({"gptq_settings": spec.gptq_settings} if spec.gptq_settings else {}),  # in the key only when given
        }
        return [(made, {**point, **keyed}) for point in spec.uniform_points()]


register_lazy("qat", "lowbit.train:QAT", kind="training")
register_lazy("budget", "lowbit.budget.planner:Budget", kind="post-training")
register_lazy("auto", "lowbit.budget.auto:Auto", kind="post-training")
register_lazy("blockap", "lowbit.train.blockap:BlockAP", kind="post-training")
