"""What a sweep measures: :class:`SweepSpec`, the points it plans, and the keys that name them.

A point's key is the hash of its settings (model, method, grid, eval and calibration text with
their content hashes, token counts, seed), so a results store recognises a point it already holds
whatever run measured it. Keys and settings are part of the stored records: changing how they are
built makes every stored point unknown.

Each method a sweep can run declares its points: a classmethod ``sweep_settings(spec, fingerprints)``
on its class (:mod:`lowbit.ptq.methods`) returning, per point, the settings for
:func:`~lowbit.ptq.methods.make_method` and the settings the point adds to its key
(:func:`method_points`); ``fingerprints`` maps text names to :func:`text_fingerprint`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.eval.data import text_fingerprint
from lowbit.options import (
    known_fields,
    parse_count,
    parse_finite_float,
    parse_group_size,
    parse_positive_int,
)
from lowbit.peers import PEER_NAMES
from lowbit.ptq.methods import method_class, method_names
from lowbit.quant.quantizers import QUANTIZERS, paretoq_quantizer_name, parse_bits, parse_bits_option

KEY_VERSION = 1
# Eval and calibration tokens of the default sweep, chosen so that the main command (every default
# point of the 135M default model, llama.cpp's included) finishes in about a quarter of an hour on a
# 2-core CPU. Every point pays for its eval tokens, only the GPTQ and byte-budget runs for their
# calibration tokens, and GPTQ loses more to fewer calibration tokens than the comparison loses to
# fewer eval windows (all points are scored on the same windows against the same reference).
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_CALIB_TOKENS = 8192


def sweep_method_names() -> tuple[str, ...]:
    """The registered methods a sweep can run: those whose class declares ``sweep_settings``."""
    return tuple(n for n in method_names() if callable(getattr(method_class(n), "sweep_settings", None)))


@functools.cache
def llama_cpp_available() -> bool:
    """Whether llama-cpp-python imports here (the default sweep measures llama.cpp's types only then)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or a build whose shared library does not load
        return False
    return True


def default_peers() -> list[str]:
    """The peers of the default sweep: llama.cpp's own types where llama-cpp-python is installed
    (the comparison users ask for first, and it runs offline in this process); none otherwise."""
    return ["llama.cpp"] if llama_cpp_available() else []


def _opt(help_text: str, **meta) -> dict:
    """Field metadata for :func:`lowbit.options.add_options`; the help texts name their own defaults."""
    return {"help": help_text, "show_default": False, **meta}


_OFF_CLI = {"cli": False}


@dataclass
class SweepSpec:
    """What a Pareto sweep measures. ``models`` and ``methods`` enumerate the points, each method over
    its own grid (its ``sweep_settings``): RTN, GPTQ and QAT over ``bits`` x ``group_sizes``, the
    byte budget (``auto``) over ``budget_bpw``; every other field that changes a point's numbers is
    part of its key. ``peers`` adds other tools' points (:mod:`lowbit.peers`).

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
    # The byte budget (auto) beside uniform RTN and GPTQ: lowbit at its best next to the baselines.
    methods: list[str] = field(
        default_factory=lambda: ["rtn", "gptq", "auto"],
        metadata=_opt(
            "default rtn gptq auto (auto: one byte-budget point per --budget-bpw); qat runs only with "
            "--qat-steps N > 0",
            choices=sweep_method_names(),
        ),
    )
    # Group 128 only: per-channel scales collapse the default model below 4 bits, and those points
    # cost as much time as g128 ones; the default spends it on the byte-budget points instead.
    group_sizes: list[int | None] = field(
        default_factory=lambda: [128],
        metadata=_opt("'channel' and/or group sizes (default 128)", parse=parse_group_size),
    )
    # Half a bit above each uniform width (the budgets of the README's byte-budget table), so every
    # budget point has a uniform GPTQ g128 point just below it in size to be compared with.
    budget_bpw: list[float] = field(
        default_factory=lambda: [4.5, 3.5, 2.5],
        metadata=_opt(
            "byte-budget points (method auto, as lowbit quantize --budget-bpw X runs without a time budget): "
            "bits per weight over the decoder linears as stored (default 4.5 3.5 2.5)",
            parse=parse_finite_float,
            metavar="BPW",
        ),
    )
    data: str = field(default="wiki-eval", metadata=_opt("eval text: wiki-eval (default), news or a text file"))
    calib: str = field(
        default="wiki-calib",
        metadata=_opt("calibration text of the GPTQ and byte-budget points: wiki-calib (default), news or a file"),
    )
    max_tokens: int | None = field(
        default=DEFAULT_EVAL_TOKENS,
        metadata=_opt(f"eval tokens (default {DEFAULT_EVAL_TOKENS}; 0: the whole text)", parse=parse_count, metavar="N"),
    )
    calib_tokens: int = field(
        default=DEFAULT_CALIB_TOKENS,
        metadata=_opt(
            f"calibration tokens of the GPTQ and byte-budget points (default {DEFAULT_CALIB_TOKENS})",
            parse=parse_positive_int,
            metavar="N",
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
        default_factory=default_peers,
        metadata=_opt(
            "other tools to measure beside lowbit: llama.cpp, llmcompressor, or none (default llama.cpp where "
            "llama-cpp-python is installed, none otherwise)",
            choices=(*PEER_NAMES, "none"),
            metavar="PEER",
        ),
    )
    peer_settings: dict = field(default_factory=dict, metadata=_OFF_CLI)

    def __post_init__(self):
        for name in ("models", "bits", "methods", "group_sizes", "budget_bpw", "peers"):  # one value for a list
            if not isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, [getattr(self, name)])
        self.models = list(dict.fromkeys(self.models))
        if not self.models:
            raise LowbitError("a sweep needs at least one model")
        self.bits = sorted({parse_bits(b) for b in self.bits}, reverse=True)
        if not self.bits:
            raise LowbitError("a sweep needs at least one bit-width")
        known = sweep_method_names()
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise LowbitError(f"unknown method(s) {unknown}: choose from {', '.join(known)}")
        self.methods = list(dict.fromkeys(self.methods))
        self._check_group_sizes()
        self._check_budgets()
        self.peers = [p for p in dict.fromkeys(self.peers) if p != "none"]
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

    def _check_budgets(self) -> None:
        for b in self.budget_bpw:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 < b < 16:
                raise LowbitError(
                    f"budget of {b!r} bits per weight (--budget-bpw): give a number above 0 and below 16 "
                    "(16 is full precision)"
                )
        self.budget_bpw = sorted({float(b) for b in self.budget_bpw}, reverse=True)

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        return cls(**known_fields(cls, d, "sweep"))

    def to_dict(self) -> dict:
        return asdict(self)

    def uniform_points(self) -> list[dict]:
        """What each point of a uniform method (one width everywhere: RTN, GPTQ, QAT) adds to its key,
        bits (high to low) x granularity: the grid part of its ``sweep_settings``."""
        return [
            {
                "bits": bits,
                "quantizer": paretoq_quantizer_name(bits) if self.quantizer == "auto" else self.quantizer,
                "group_size": group_size,
                "scale_search": self.scale_search,
                "hp_dtype": self.hp_dtype,
            }
            for bits in self.bits
            for group_size in self.group_sizes
        ]

    def quantized_methods(self) -> list[str]:
        """The methods that have points to run (QAT only with a step budget, auto only with budgets)."""
        return [m for m in self.methods if method_class(m).sweep_settings(self, _TextNames())]

    def calibrated(self) -> bool:
        """Whether any point reads the calibration text ``calib`` (GPTQ's and the byte budget's do)."""
        return any(keyed.get("calib") == self.calib for _, _, keyed in method_points(self, _TextNames()))

    def text_names(self) -> set[str]:
        """The texts whose content is part of the keys: eval, and those the methods' points name
        (calibration, training): the texts whose fingerprints their ``sweep_settings`` read."""
        names = _TextNames({self.data: ""})
        method_points(self, names)
        return set(names)


class _TextNames(dict):
    """Stands in for the fingerprints while finding which texts a sweep's keys name: records every
    name asked for (without reading the text)."""

    def __missing__(self, name: str) -> str:
        self[name] = ""
        return ""


# ---------------------------------------------------------------- points and keys


def model_ref(spec: str) -> str:
    """How a model is named in a point's key: a built-in name, or the absolute path."""
    from lowbit.eval.models import NAMED_MODELS

    if spec in NAMED_MODELS:
        return spec
    return str(Path(spec).expanduser().resolve())


def text_fingerprints(spec: SweepSpec) -> dict[str, str]:
    """:func:`text_fingerprint` of every text the sweep's keys name."""
    return {name: text_fingerprint(name) for name in spec.text_names()}


def point_key(settings: dict) -> str:
    """Stable key of a point: the hash of its settings (canonical JSON)."""
    blob = json.dumps({"key_version": KEY_VERSION, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# The settings every point of a model shares (its full-precision point's), in every key.
COMMON_SETTINGS = ("model", "data", "data_sha256", "max_tokens", "seq_len", "batch_size", "seed")


def method_points(spec: SweepSpec, fingerprints: dict[str, str]) -> list[tuple[str, dict, dict]]:
    """Every quantized point as ``(method, settings for make_method, settings added to its key)``,
    methods in ``spec.methods`` order, each method's points as its class's ``sweep_settings`` lists them."""
    return [
        (name, made, keyed)
        for name in spec.methods
        for made, keyed in method_class(name).sweep_settings(spec, fingerprints)
    ]


def plan_points(spec: SweepSpec, model: str, fingerprints: dict[str, str]) -> list[dict]:
    """Settings of every point of ``model``: the full-precision reference first, then each method's
    points (:func:`method_points`). ``fingerprints`` maps text names to :func:`text_fingerprint`."""
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
    points += [{**common, "method": name, **keyed} for name, _, keyed in method_points(spec, fingerprints)]
    return points


def method_key(settings: dict) -> str:
    """The key of a point's method alone: its settings without those all of a model's points share
    (:data:`COMMON_SETTINGS`), so one key names the method object of that point in every model."""
    return point_key({k: v for k, v in settings.items() if k not in COMMON_SETTINGS})


def point_label(p: dict) -> str:
    """Human name of a point: ``GPTQ 3-bit g128``, ``RTN 2-bit per-channel``, ``FP32``,
    ``budget 3.5 b/w (rotated)`` (a byte-budget point; rotated where its record says so)."""
    if p["method"] == "fp":
        return f"FP{int(p['bits'])}"
    if p["method"] == "peer":
        return f"{p['peer']} {p['peer_type']}"
    if p.get("budget_bpw") is not None:
        return f"budget {p['budget_bpw']:g} b/w" + (" (rotated)" if p.get("rotated") else "")
    gran = "per-channel" if p["group_size"] is None else f"g{p['group_size']}"
    return f"{p['method'].upper()} {p['bits']:g}-bit {gran}"
