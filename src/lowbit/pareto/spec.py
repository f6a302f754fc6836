"""What a sweep measures: :class:`SweepSpec`, the points it plans, and the keys that name them.

A point's key is the hash of its settings (model, method, grid, eval and calibration text with
their content hashes, token counts, seed), so a results store recognises a point it already holds
whatever run measured it. Keys and settings are part of the stored records: changing how they are
built makes every stored point unknown.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.options import (
    known_fields,
    parse_bits_option,
    parse_count,
    parse_group_size,
    parse_positive_int,
)
from lowbit.peers import PEER_NAMES
from lowbit.ptq.methods import SWEEPABLE
from lowbit.quant.quantizers import QUANTIZERS, paretoq_quantizer_name, parse_bits

KEY_VERSION = 1
# Chosen so that the default sweep (FP + RTN and GPTQ at 4/3/2 bits, per-channel and g128) of the
# 135M default model finishes inside 20 minutes on a 2-core CPU. Measured there on one thread
# (CPU time): eval ~3.7 s per 1k tokens (the reference pass ~2.8 s), RTN ~10 s, GPTQ 80-95 s at
# 8192 calibration tokens: ~16.5 min for the 13 points on one core; 16384 + 16384 would be ~27.
DEFAULT_EVAL_TOKENS = 8192
DEFAULT_CALIB_TOKENS = 8192


def _opt(help_text: str, **meta) -> dict:
    """Field metadata for :func:`lowbit.options.add_options`; the help texts name their own defaults."""
    return {"help": help_text, "show_default": False, **meta}


_OFF_CLI = {"cli": False}


@dataclass
class SweepSpec:
    """What a Pareto sweep measures. ``models``, ``bits``, ``methods`` and ``group_sizes`` enumerate
    the points; every other field that changes a point's numbers is part of its key.

    ``group_sizes``: None is per-channel; ``max_tokens`` None evaluates the whole text.
    QAT points run only when ``qat_steps > 0`` and ``"qat"`` is in ``methods``: they train with the
    ``qat`` method of :mod:`lowbit.ptq.methods` on ``qat_data`` in windows of ``seq_len``;
    ``qat_settings`` passes further ``lowbit.train.TrainConfig`` fields (batch_size, lr, loss, ...).
    """

    models: list[str] = field(
        default_factory=lambda: ["smollm2-135m"],
        metadata=_opt("models to sweep (default smollm2-135m)", flag="--model", parse=str, metavar="MODEL"),
    )
    bits: list[float] = field(
        default_factory=lambda: [4.0, 3.0, 2.0], metadata=_opt("bit-widths (default 4 3 2)", parse=parse_bits_option)
    )
    methods: list[str] = field(
        default_factory=lambda: ["rtn", "gptq"],
        metadata=_opt("default rtn gptq; qat runs only with --qat-steps N > 0", choices=SWEEPABLE),
    )
    group_sizes: list[int | None] = field(
        default_factory=lambda: [None, 128],
        metadata=_opt("'channel' and/or group sizes (default channel 128)", parse=parse_group_size),
    )
    data: str = field(default="wiki-eval", metadata=_opt("eval text: wiki-eval (default), news or a text file"))
    calib: str = field(
        default="wiki-calib", metadata=_opt("GPTQ calibration text: wiki-calib (default), news or a text file")
    )
    max_tokens: int | None = field(
        default=DEFAULT_EVAL_TOKENS,
        metadata=_opt(f"eval tokens (default {DEFAULT_EVAL_TOKENS}; 0: the whole text)", parse=parse_count, metavar="N"),
    )
    calib_tokens: int = field(
        default=DEFAULT_CALIB_TOKENS,
        metadata=_opt(
            f"GPTQ calibration tokens (default {DEFAULT_CALIB_TOKENS})", parse=parse_positive_int, metavar="N"
        ),
    )
    seq_len: int = field(
        default=512, metadata=_opt("window length for eval and calibration (default 512)", parse=parse_positive_int)
    )
    batch_size: int = field(default=4, metadata=_opt("eval batch size (default 4)", parse=parse_positive_int))
    seed: int = field(default=0, metadata=_opt("torch seed set before every point (default 0)", parse=int))
    quantizer: str = field(default="auto", metadata=_OFF_CLI)
    scale_search: str = field(default="mse", metadata=_OFF_CLI)
    hp_dtype: str = field(default="float16", metadata=_OFF_CLI)
    damp: float = field(default=0.01, metadata=_OFF_CLI)
    act_order: bool = field(default=False, metadata=_OFF_CLI)
    # further GPTQ fields (lowbit.ptq.methods.GPTQ: sequential, sample, ...); in a point's key only when given
    gptq_settings: dict = field(default_factory=dict, metadata=_OFF_CLI)
    qat_steps: int = field(
        default=0, metadata=_opt("QAT training steps; QAT points run only when > 0", parse=parse_count, metavar="N")
    )
    qat_data: str = field(default="wiki-train", metadata=_OFF_CLI)
    # the short-budget recipe measured in benchmarks/results/qat.md (the paper's lr 2e-5 is for 120k steps)
    qat_settings: dict = field(
        default_factory=lambda: {"lr": 1e-3, "scale_lr": 1e-3, "batch_size": 2}, metadata=_OFF_CLI
    )
    # other tools measured beside lowbit (lowbit.peers); peer_settings: {peer: {field: value}}
    peers: list[str] = field(
        default_factory=list, metadata=_opt("other tools to measure beside lowbit", choices=PEER_NAMES, metavar="PEER")
    )
    peer_settings: dict = field(default_factory=dict, metadata=_OFF_CLI)

    def __post_init__(self):
        for name in ("models", "bits", "methods", "group_sizes"):  # one value where a list is expected
            if not isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, [getattr(self, name)])
        self.models = list(dict.fromkeys(self.models))
        if not self.models:
            raise LowbitError("a sweep needs at least one model")
        self.bits = sorted({parse_bits(b) for b in self.bits}, reverse=True)
        if not self.bits:
            raise LowbitError("a sweep needs at least one bit-width")
        known = SWEEPABLE
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise LowbitError(f"unknown method(s) {unknown}: choose from {', '.join(known)}")
        self.methods = list(dict.fromkeys(self.methods))
        self._check_group_sizes()
        if self.quantizer != "auto" and self.quantizer not in QUANTIZERS:
            raise LowbitError(f"unknown quantizer {self.quantizer!r}: choose auto or one of {', '.join(QUANTIZERS)}")
        for name in ("calib_tokens", "seq_len", "batch_size"):
            minimum = 2 if name == "seq_len" else 1
            if getattr(self, name) < minimum:
                flag = "--" + name.replace("_", "-")
                raise LowbitError(f"{name} ({flag}) must be an integer >= {minimum}, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise LowbitError(f"max_tokens ({self.max_tokens}) must hold at least one window of seq_len {self.seq_len}")
        if self.qat_steps < 0:
            raise LowbitError(f"qat_steps must be >= 0, got {self.qat_steps}")

    def _check_group_sizes(self) -> None:
        self.group_sizes = [None if g in ("channel", "per-channel", "none") else g for g in self.group_sizes]
        for g in self.group_sizes:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
                raise LowbitError(f"group size must be a positive integer or 'channel' (per-channel), got {g!r}")
        if not self.group_sizes:
            raise LowbitError("a sweep needs at least one granularity (per-channel or a group size)")
        self.group_sizes = list(dict.fromkeys(self.group_sizes))

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        return cls(**known_fields(cls, d, "sweep"))

    def to_dict(self) -> dict:
        return asdict(self)

    def quantized_methods(self) -> list[str]:
        """The methods whose points run: QAT only with a step budget."""
        return [m for m in self.methods if m != "qat" or self.qat_steps > 0]

    def text_names(self) -> set[str]:
        """The texts whose content is part of the keys: eval, and calibration/training where used."""
        names = {self.data}
        if "gptq" in self.quantized_methods():
            names.add(self.calib)
        if "qat" in self.quantized_methods():
            names.add(self.qat_data)
        return names


# ---------------------------------------------------------------- points and keys


def model_ref(spec: str) -> str:
    """How a model is named in a point's key: a built-in name, or the absolute path."""
    from lowbit.eval.models import NAMED_MODELS

    if spec in NAMED_MODELS:
        return spec
    return str(Path(spec).expanduser().resolve())


def text_fingerprint(name: str) -> str:
    """SHA-256 (16 hex digits) of a text's content, so that a changed text file changes the keys."""
    from lowbit.eval.data import get_text

    return hashlib.sha256(get_text(name).encode("utf-8")).hexdigest()[:16]


def text_fingerprints(spec: SweepSpec) -> dict[str, str]:
    """:func:`text_fingerprint` of every text the sweep's keys name."""
    return {name: text_fingerprint(name) for name in spec.text_names()}


def point_key(settings: dict) -> str:
    """Stable key of a point: the hash of its settings (canonical JSON)."""
    blob = json.dumps({"key_version": KEY_VERSION, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _method_settings(spec: SweepSpec, method: str, fingerprints: dict[str, str]) -> dict:
    """The settings a method adds to its points' keys: its data (with content hash) and budget."""
    if method == "gptq":
        return {
            "calib": spec.calib,
            "calib_sha256": fingerprints[spec.calib],
            "calib_tokens": spec.calib_tokens,
            "damp": spec.damp,
            "act_order": spec.act_order,
            **({"gptq_settings": spec.gptq_settings} if spec.gptq_settings else {}),
        }
    if method == "qat":
        return {
            "qat_data": spec.qat_data,
            "qat_data_sha256": fingerprints[spec.qat_data],
            "qat_steps": spec.qat_steps,
            "qat_settings": spec.qat_settings,
        }
    return {}


def plan_points(spec: SweepSpec, model: str, fingerprints: dict[str, str]) -> list[dict]:
    """Settings of every point of ``model``: the full-precision reference first, then
    method x bits x granularity. ``fingerprints`` maps text names to :func:`text_fingerprint`."""
    common = {
        "model": model_ref(model),
        "data": spec.data,
        "data_sha256": fingerprints[spec.data],
        "max_tokens": spec.max_tokens,
        "seq_len": spec.seq_len,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
    }
    points = [{**common, "method": "fp"}]
    for method in spec.quantized_methods():
        for bits in spec.bits:
            for group_size in spec.group_sizes:
                settings = {
                    **common,
                    "method": method,
                    "bits": bits,
                    "quantizer": paretoq_quantizer_name(bits) if spec.quantizer == "auto" else spec.quantizer,
                    "group_size": group_size,
                    "scale_search": spec.scale_search,
                    "hp_dtype": spec.hp_dtype,
                }
                settings.update(_method_settings(spec, method, fingerprints))
                points.append(settings)
    return points


def point_label(p: dict) -> str:
    """Human name of a point: ``GPTQ 3-bit g128``, ``RTN 2-bit per-channel``, ``FP32``."""
    if p["method"] == "fp":
        return f"FP{int(p['bits'])}"
    if p["method"] == "peer":
        return f"{p['peer']} {p['peer_type']}"
    gran = "per-channel" if p["group_size"] is None else f"g{p['group_size']}"
    return f"{p['method'].upper()} {p['bits']:g}-bit {gran}"
