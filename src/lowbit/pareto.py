"""Size-quality Pareto sweeps: quantize a model many ways, measure every point, report the frontier.

A sweep is bit-widths x methods x granularities (x models), plus one full-precision reference
point per model. Quality follows METHODS.md section 4: every point of a model is measured on the
same eval windows against the same full-precision log-probs, which are computed once per model
and kept in memory (:class:`lowbit.evaluation.CachedReference`), so the reference model runs once per sweep, not
once per point. Points are ranked by KL to the reference; perplexity is shown beside it.

Every finished point is appended to ``DIR/results.jsonl`` as one JSON line, written with a single
``write`` and fsync'd. A point's key is the hash of its settings (model, method, grid, eval and
calibration text with their content hashes, token counts, seed), so re-running a sweep skips the
points already stored and a killed sweep loses at most the point in progress. A torn last line
(a kill during the write) is ignored on read and cut off before the next append.

The report (``results.md``, ``pareto.png``, ``report.html``) is rebuilt from the stored points.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import gc
import hashlib
import html
import importlib
import io
import json
import math
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.evaluation import CachedReference, cache_reference, evaluate
from lowbit.fsio import atomic_write, fsync_dir
from lowbit.quantizers import QUANTIZERS, paretoq_quantizer_name, parse_bits

RESULTS_FILE = "results.jsonl"
LOCK_FILE = ".pareto.lock"
KEY_VERSION = 1
METHODS = ("rtn", "gptq", "qat")
# Chosen so that the default sweep (FP + RTN and GPTQ at 4/3/2 bits, per-channel and g128) of the
# 135M default model finishes inside 20 minutes on a 2-core CPU. Measured there on one thread
# (CPU time): eval ~3.7 s per 1k tokens (the reference pass ~2.8 s), RTN ~10 s, GPTQ 80-95 s at
# 8192 calibration tokens: ~16.5 min for the 13 points on one core; 16384 + 16384 would be ~27.
DEFAULT_EVAL_TOKENS = 8192
DEFAULT_CALIB_TOKENS = 8192
MB = 1e6

_MODEL_NOTES = {
    "smollm2-135m": (
        "SmolLM2-135M's weights were de-quantized from a Q4_1 GGUF (blocks of 32, scale + min), so 4-bit "
        "settings on a matching grid (group 32, asymmetric) are flattered by construction; per-channel and "
        "group-128 points are the fairer method comparison."
    ),
}


@dataclass
class SweepSpec:
    """What a Pareto sweep measures. ``models``, ``bits``, ``methods`` and ``group_sizes`` enumerate
    the points; every other field that changes a point's numbers is part of its key.

    ``group_sizes``: None is per-channel; ``max_tokens`` None evaluates the whole text.
    QAT points run only when ``qat_steps > 0`` and ``"qat"`` is in ``methods``: they train with
    :func:`lowbit.qat.train` on ``qat_data`` in windows of ``seq_len``; ``qat_settings`` passes
    further ``lowbit.qat.TrainConfig`` fields (batch_size, lr, loss, ...).
    """

    models: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    bits: list[float] = field(default_factory=lambda: [4.0, 3.0, 2.0])
    methods: list[str] = field(default_factory=lambda: ["rtn", "gptq"])
    group_sizes: list[int | None] = field(default_factory=lambda: [None, 128])
    data: str = "wiki-eval"
    calib: str = "wiki-calib"
    max_tokens: int | None = DEFAULT_EVAL_TOKENS
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0
    quantizer: str = "auto"
    scale_search: str = "mse"
    hp_dtype: str = "float16"
    damp: float = 0.01
    act_order: bool = False
    qat_steps: int = 0
    qat_data: str = "wiki-train"
    # the short-budget recipe measured in benchmarks/results/qat.md (the paper's lr 2e-5 is for 120k steps)
    qat_settings: dict = field(default_factory=lambda: {"lr": 1e-3, "scale_lr": 1e-3, "batch_size": 2})

    def __post_init__(self):
        self.models = [self.models] if isinstance(self.models, str) else list(dict.fromkeys(self.models))
        if not self.models:
            raise LowbitError("a sweep needs at least one model")
        self.bits = sorted({parse_bits(b) for b in self.bits}, reverse=True)
        if not self.bits:
            raise LowbitError("a sweep needs at least one bit-width")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise LowbitError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        self.methods = list(dict.fromkeys(self.methods))
        self.group_sizes = [None if g in ("channel", "per-channel", "none", 0) else g for g in self.group_sizes]
        for g in self.group_sizes:
            if g is not None and (not isinstance(g, int) or g < 1):
                raise LowbitError(f"group size must be a positive integer or None (per-channel), got {g!r}")
        if not self.group_sizes:
            raise LowbitError("a sweep needs at least one granularity (per-channel or a group size)")
        self.group_sizes = list(dict.fromkeys(self.group_sizes))
        if self.quantizer != "auto" and self.quantizer not in QUANTIZERS:
            raise LowbitError(f"unknown quantizer {self.quantizer!r}: choose auto or one of {', '.join(QUANTIZERS)}")
        for name in ("calib_tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise LowbitError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise LowbitError(f"max_tokens ({self.max_tokens}) must hold at least one window of seq_len {self.seq_len}")
        if self.qat_steps < 0:
            raise LowbitError(f"qat_steps must be >= 0, got {self.qat_steps}")

    @classmethod
    def from_dict(cls, d: dict) -> SweepSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LowbitError(f"unknown sweep setting(s) {sorted(unknown)}: use {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def quantized_methods(self) -> list[str]:
        """The methods whose points run: QAT only with a step budget."""
        return [m for m in self.methods if m != "qat" or self.qat_steps > 0]


# ---------------------------------------------------------------- points and keys


def model_ref(spec: str) -> str:
    """How a model is named in a point's key: a built-in name, or the absolute path."""
    from lowbit.models import NAMED_MODELS

    if spec in NAMED_MODELS:
        return spec
    return str(Path(spec).expanduser().resolve())


def text_fingerprint(name: str) -> str:
    """SHA-256 (16 hex digits) of a text's content, so that a changed text file changes the keys."""
    from lowbit.data import get_text

    return hashlib.sha256(get_text(name).encode("utf-8")).hexdigest()[:16]


def point_key(settings: dict) -> str:
    """Stable key of a point: the hash of its settings (canonical JSON)."""
    blob = json.dumps({"key_version": KEY_VERSION, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


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
                if method == "gptq":
                    settings.update(
                        calib=spec.calib,
                        calib_sha256=fingerprints[spec.calib],
                        calib_tokens=spec.calib_tokens,
                        damp=spec.damp,
                        act_order=spec.act_order,
                    )
                if method == "qat":
                    settings.update(
                        qat_data=spec.qat_data,
                        qat_data_sha256=fingerprints[spec.qat_data],
                        qat_steps=spec.qat_steps,
                        qat_settings=spec.qat_settings,
                    )
                points.append(settings)
    return points


def point_label(p: dict) -> str:
    """Human name of a point: ``GPTQ 3-bit g128``, ``RTN 2-bit per-channel``, ``FP32``."""
    if p["method"] == "fp":
        return f"FP{int(p['bits'])}"
    gran = "per-channel" if p["group_size"] is None else f"g{p['group_size']}"
    return f"{p['method'].upper()} {p['bits']:g}-bit {gran}"


# ---------------------------------------------------------------- results store


class ResultStore:
    """``DIR/results.jsonl``: one JSON object per finished point, appended atomically per line.

    Each line is written by one ``os.write`` on an ``O_APPEND`` descriptor and fsync'd. A last
    line without its newline (a kill during the write) is ignored by :meth:`read` and cut off by
    :meth:`repair` before new lines are appended. Use as a context manager: it holds an exclusive
    lock on ``DIR`` so that two sweeps never write the same store.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS_FILE
        self._lock_fd: int | None = None

    def __enter__(self) -> ResultStore:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise LowbitError(
                f"another lowbit pareto sweep is writing {self.folder}: wait for it or use another --out"
            ) from exc
        self._lock_fd = fd
        self.repair()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def read(self) -> dict[str, dict]:
        """Finished points by key (the first occurrence wins); a torn or corrupt line is skipped."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if not data.endswith(b"\n"):
            lines = lines[:-1]  # torn last line: the point was not finished
        points: dict[str, dict] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = record["key"]
            except (ValueError, KeyError, TypeError):
                print(f"lowbit: warning: {self.path}:{number} is not a result line, skipped", file=sys.stderr)
                continue
            points.setdefault(key, record)
        return points

    def repair(self) -> int:
        """Cut a torn last line off the file; returns the number of bytes removed."""
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(data) - keep

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.folder)


# ---------------------------------------------------------------- QAT hook


def qat_trainer() -> Callable:
    """``lowbit.qat.train``, or a LowbitError saying QAT is not available.

    Called as ``train(model, config, tokenizer=..., data=..., steps=..., seq_len=..., seed=...,
    progress=..., **qat_settings)``: it quantizes ``model`` in place (teacher: a frozen copy of
    the full-precision model) and returns its loss record.
    """
    try:
        module = importlib.import_module("lowbit.qat")
    except ModuleNotFoundError as exc:
        if exc.name != "lowbit.qat":
            raise
        raise LowbitError(
            "QAT not available: this lowbit has no lowbit.qat module yet; drop 'qat' from --methods "
            "(or give --qat-steps 0) to sweep post-training methods only"
        ) from exc
    train = getattr(module, "train", None)
    if not callable(train):
        raise LowbitError("QAT not available: lowbit.qat has no train() function for the sweep to call")
    return train


# ---------------------------------------------------------------- the sweep


@dataclass
class _ModelContext:
    """Everything a model's points share: the reference model, tokenizer and reference cache."""

    spec: str
    reference: nn.Module
    tokenizer: object
    cache: CachedReference
    eval_sha256: str
    bos: bool
    reference_seconds: float


def _load_context(model_spec: str, spec: SweepSpec, progress: bool) -> _ModelContext:
    from lowbit.api import load
    from lowbit.data import get_text, tokenize_windows, tokenizer_adds_bos

    reference, tokenizer, meta = load(model_spec)
    if meta is not None:
        raise LowbitError(f"{model_spec} is already quantized: a sweep starts from the full-precision model")
    bos = tokenizer_adds_bos(tokenizer)  # as `lowbit eval` and GPTQ calibration do
    windows = tokenize_windows(tokenizer, get_text(spec.data), spec.seq_len, max_tokens=spec.max_tokens, bos=bos)
    _check_cache_memory(windows, reference)
    eval_sha = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = cache_reference(reference, windows, spec.batch_size, progress=progress)
    return _ModelContext(model_spec, reference, tokenizer, cache, eval_sha, bos, time.perf_counter() - t0)


def free_memory() -> int | None:
    """Free physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _check_cache_memory(windows: torch.Tensor, reference: nn.Module) -> None:
    """Refuse a reference cache larger than half the free memory (e.g. ``--max-tokens 0``)."""
    vocab = getattr(reference.config, "vocab_size", None) or reference.get_output_embeddings().weight.shape[0]
    need = windows.shape[0] * (windows.shape[1] - 1) * vocab * 4
    free = free_memory()
    if free is not None and need > free / 2:
        raise LowbitError(
            f"the reference log-probs of {windows.numel():,} eval tokens need {need / 2**30:.2f} GiB "
            f"(vocab {vocab:,}) and only {free / 2**30:.2f} GiB is free: lower --max-tokens"
        )


def _quantize(model: nn.Module, settings: dict, spec: SweepSpec, ctx: _ModelContext, progress: bool) -> dict:
    """Quantize ``model`` in place as ``settings`` say; returns what the method reports (QAT: losses)."""
    from lowbit.api import quantize
    from lowbit.surgery import QuantConfig

    config = QuantConfig(
        bits=settings["bits"],
        quantizer=spec.quantizer,
        group_size=settings["group_size"],
        scale_search=spec.scale_search,
        hp_dtype=spec.hp_dtype,
    )
    method = settings["method"]
    if method == "rtn":
        quantize(model, config, "rtn")
        return {}
    if method == "gptq":
        quantize(
            model,
            config,
            "gptq",
            tokenizer=ctx.tokenizer,
            calib=spec.calib,
            calib_tokens=spec.calib_tokens,
            seq_len=spec.seq_len,
            act_order=spec.act_order,
            damp=spec.damp,
            progress=progress,
        )
        return {}
    if method == "qat":
        record = qat_trainer()(
            model,
            config,
            tokenizer=ctx.tokenizer,
            data=spec.qat_data,
            steps=spec.qat_steps,
            seq_len=spec.seq_len,
            seed=spec.seed,
            progress=progress,
            **{"warmup": min(4, spec.qat_steps - 1), **spec.qat_settings},
        )
        keep = ("steps", "train_tokens", "train_seconds", "first_loss", "final_loss", "data")
        return {"qat": {k: record[k] for k in keep if k in record}}
    raise LowbitError(f"unknown method {method!r}")  # pragma: no cover - plan_points emits only the above


def _versions() -> dict:
    import transformers

    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def measure_point(settings: dict, spec: SweepSpec, ctx: _ModelContext, progress: bool = True) -> dict:
    """Quantize a copy of the reference model as ``settings`` say and measure it: one result record."""
    from lowbit.evaluation import size_account
    from lowbit.models import model_id

    t_start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    quantize_seconds, reported = 0.0, {}
    if settings["method"] == "fp":
        model = ctx.reference
        quality = dict(ctx.cache.result)
        eval_seconds = ctx.reference_seconds
        bits = float(8 * next(model.parameters()).element_size())
        extra = {"bits": bits, "quantizer": None, "group_size": None}
    else:
        model = copy.deepcopy(ctx.reference)
        t0 = time.perf_counter()
        reported = _quantize(model, settings, spec, ctx, progress)
        quantize_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():
            quality = evaluate(model, ctx.cache.windows, reference=ctx.cache, progress=progress)
        eval_seconds = time.perf_counter() - t0
        extra = {k: settings[k] for k in ("bits", "quantizer", "group_size")}
    size = size_account(model)
    record = {
        "key": point_key(settings),
        "model": model_id(ctx.spec),
        "method": settings["method"],
        **extra,
        **size,
        **quality,
        "eval_tokens_sha256": ctx.eval_sha256,
        "eval_bos": ctx.bos,
        "seed": settings["seed"],
        "quantize_seconds": round(quantize_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "seconds": round(time.perf_counter() - t_start + (eval_seconds if settings["method"] == "fp" else 0.0), 3),
        **reported,
        "settings": settings,
        "versions": _versions(),
    }
    return record


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike[str],
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) a sweep into folder ``out`` and write its report. Returns a summary dict.

    Points already in ``out/results.jsonl`` are skipped; a model whose points are all stored is
    not even loaded.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    if "qat" in spec.methods:
        if spec.qat_steps > 0:
            qat_trainer()  # fail before any compute if QAT cannot run
        else:
            log("pareto: 'qat' skipped: QAT points need a training budget (--qat-steps N > 0)")
    names = {spec.data}
    if "gptq" in spec.quantized_methods():
        names.add(spec.calib)
    if "qat" in spec.quantized_methods():
        names.add(spec.qat_data)
    fingerprints = {name: text_fingerprint(name) for name in names}
    run_id = uuid.uuid4().hex[:12]
    t_sweep = time.perf_counter()
    computed, skipped = 0, 0
    with ResultStore(out) as store:
        done = store.read()
        planned: list[dict] = []
        for model_spec in spec.models:
            plan = plan_points(spec, model_spec, fingerprints)
            planned.extend(plan)
            todo = [p for p in plan if point_key(p) not in done]
            skipped += len(plan) - len(todo)
            if not todo:
                log(f"pareto: {model_spec}: all {len(plan)} points already in {store.path}")
                continue
            log(f"pareto: {model_spec}: {len(todo)} of {len(plan)} points to compute (run {run_id})")
            ctx = _load_context(model_spec, spec, progress)
            log(
                f"pareto: {model_spec}: reference log-probs cached ({ctx.cache.result['tokens']} tokens, "
                f"{ctx.cache.nbytes / 2**30:.2f} GiB, {ctx.reference_seconds:.0f} s)"
            )
            for index, settings in enumerate(todo, 1):
                record = measure_point(settings, spec, ctx, progress=progress)
                record["run_id"] = run_id
                record["computed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                store.append(record)
                done[record["key"]] = record
                computed += 1
                log(
                    f"pareto: [{index}/{len(todo)}] {record['model']} {point_label(record)}: "
                    f"{_fmt_mb(record['total_bytes'])} MB, KL {record['kl_to_reference']:.4g}, "
                    f"ppl {record['perplexity']:.4g} ({record['seconds']:.0f} s)"
                )
            del ctx
            gc.collect()
        records = [done[point_key(p)] for p in planned]
    paths = write_report(records, spec, out)
    frontier = [r for r in records if r["frontier"]]
    return {
        "out": str(out),
        "points": len(records),
        "computed": computed,
        "skipped": skipped,
        "run_id": run_id,
        "seconds": round(time.perf_counter() - t_sweep, 1),
        **paths,
        "frontier": [f"{r['model']} {point_label(r)}" for r in frontier],
        "summary": summary_lines(records),
    }


# ---------------------------------------------------------------- frontier and report


def mark_frontier(records: list[dict]) -> list[dict]:
    """Set ``record["frontier"]``: True when no other point of the same model has <= bytes and
    <= KL with one of them strictly less. Returns the records sorted by model, then KL."""
    for r in records:
        r["frontier"] = not any(
            o is not r
            and o["model"] == r["model"]
            and o["total_bytes"] <= r["total_bytes"]
            and o["kl_to_reference"] <= r["kl_to_reference"]
            and (o["total_bytes"] < r["total_bytes"] or o["kl_to_reference"] < r["kl_to_reference"])
            for o in records
        )
    order = list(dict.fromkeys(r["model"] for r in records))
    return sorted(records, key=lambda r: (order.index(r["model"]), r["kl_to_reference"], r["total_bytes"]))


def _models(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in records))


def _fmt_mb(n_bytes: int) -> str:
    return f"{n_bytes / MB:.4g}"


def _fmt_ppl(ppl: float) -> str:
    return f"{ppl:.2f}" if ppl < 1e4 else f"{ppl:.3g}"


def summary_lines(records: list[dict]) -> list[str]:
    """Plain-language reading of the sweep: the best point under each size, and method match-ups."""
    lines: list[str] = []
    for model in _models(records):
        rows = [r for r in records if r["model"] == model]
        fp = next((r for r in rows if r["method"] == "fp"), None)
        quant = [r for r in rows if r["method"] != "fp"]
        if fp is not None:
            hp = sorted({r["settings"].get("hp_dtype", "?") for r in quant if "settings" in r})
            kept = f" (the quantized points keep their high-precision tensors in {', '.join(hp)})" if hp else ""
            lines.append(
                f"{model}: the full-precision reference ({point_label(fp)}, as loaded) takes "
                f"{_fmt_mb(fp['total_bytes'])} MB and has perplexity {_fmt_ppl(fp['perplexity'])}{kept}."
            )
        for r in sorted((r for r in quant if r["frontier"]), key=lambda r: r["total_bytes"]):
            collapsed = fp is not None and r["perplexity"] > 10 * fp["perplexity"]
            lines.append(
                f"{model}: at <= {_fmt_mb(r['total_bytes'])} MB the best point is {point_label(r)} "
                f"({r['bits_per_weight']:.2f} bits/weight): KL {r['kl_to_reference']:.4g}, "
                f"perplexity {_fmt_ppl(r['perplexity'])}, top-1 agreement {100 * r['top1_agreement']:.1f}%"
                + (" - but the model has collapsed (perplexity over 10x the reference)." if collapsed else ".")
            )
        methods = list(dict.fromkeys(r["method"] for r in quant))
        for i, a in enumerate(methods):
            for b in methods[i + 1 :]:
                pairs = []
                for ra in (r for r in quant if r["method"] == a):
                    rb = next(
                        (
                            r
                            for r in quant
                            if r["method"] == b and r["bits"] == ra["bits"] and r["group_size"] == ra["group_size"]
                        ),
                        None,
                    )
                    if rb is not None:
                        pairs.append((ra, rb))
                if pairs:
                    wins = sum(ra["kl_to_reference"] < rb["kl_to_reference"] for ra, rb in pairs)
                    lead, n = (a, wins) if wins * 2 >= len(pairs) else (b, len(pairs) - wins)
                    other = b if lead == a else a
                    lines.append(
                        f"{model}: {lead.upper()} has lower KL than {other.upper()} in {n} of {len(pairs)} matched "
                        "settings (same bits and granularity, hence about the same size)."
                    )
        dominated = [r for r in quant if not r["frontier"]]
        if dominated:
            lines.append(
                f"{model}: {len(dominated)} of {len(quant)} quantized points are dominated (another point is no "
                f"larger and has no higher KL): {', '.join(point_label(r) for r in sorted(dominated, key=lambda r: r['total_bytes']))}."
            )
        if model in _MODEL_NOTES:
            lines.append(f"{model}: note: {_MODEL_NOTES[model]}")
    return lines


_COLUMNS = [
    ("rank", "Rank"),
    ("model", "Model"),
    ("label", "Setting"),
    ("quantizer", "Quantizer"),
    ("size_mb", "Size (MB)"),
    ("total_bytes", "Bytes"),
    ("bits_per_weight", "Bits/weight"),
    ("bits_per_weight_linear", "Bits/weight (linears)"),
    ("kl_to_reference", "KL to FP"),
    ("top1_agreement", "Top-1 agreement"),
    ("perplexity", "Perplexity"),
    ("seconds", "Seconds"),
    ("frontier", "Frontier"),
]


def table_rows(records: list[dict]) -> list[dict[str, str]]:
    """Formatted table cells, ranked by KL within each model (records from :func:`mark_frontier`)."""
    rows, rank = [], {}
    for r in records:
        rank[r["model"]] = rank.get(r["model"], 0) + 1
        bpwl = r.get("bits_per_weight_linear")
        rows.append(
            {
                "rank": str(rank[r["model"]]),
                "model": r["model"],
                "label": point_label(r),
                "quantizer": r["quantizer"] or "-",
                "size_mb": _fmt_mb(r["total_bytes"]),
                "total_bytes": f"{r['total_bytes']:,}",
                "bits_per_weight": f"{r['bits_per_weight']:.3f}",
                "bits_per_weight_linear": "-" if bpwl is None else f"{bpwl:.3f}",
                "kl_to_reference": f"{r['kl_to_reference']:.4g}",
                "top1_agreement": f"{100 * r['top1_agreement']:.2f}%",
                "perplexity": f"{r['perplexity']:.3f}" if r["perplexity"] < 1e4 else f"{r['perplexity']:.4g}",
                "seconds": f"{r['seconds']:.1f}",
                "frontier": "yes" if r["frontier"] else "",
            }
        )
    return rows


def markdown_table(records: list[dict]) -> str:
    rows = table_rows(records)
    head = "| " + " | ".join(title for _, title in _COLUMNS) + " |"
    rule = (
        "|"
        + "|".join("---:" if key not in ("model", "label", "quantizer", "frontier") else "---" for key, _ in _COLUMNS)
        + "|"
    )
    body = ["| " + " | ".join(row[key] for key, _ in _COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _eval_description(records: list[dict], spec: SweepSpec) -> list[str]:
    from lowbit.data import describe_text

    def describe(name: str) -> str:
        try:
            return describe_text(name)
        except LowbitError as exc:
            return f"{name} ({exc})"

    lines = []
    for model in _models(records):
        fp = next((r for r in records if r["model"] == model), None)
        lines.append(
            f"{model}: {fp['tokens']:,} predicted tokens in {fp['windows']} non-overlapping windows of "
            f"{fp['seq_len']} tokens{' (each starting with BOS)' if fp.get('eval_bos') else ''} "
            f"(eval token hash {fp['eval_tokens_sha256']})."
        )
    text = [f"Eval text: {spec.data} - {describe(spec.data)}.", *lines]
    if "gptq" in spec.quantized_methods():
        text.append(
            f"GPTQ calibration text: {spec.calib} - {describe(spec.calib)}; first {spec.calib_tokens:,} tokens "
            f"in windows of {spec.seq_len}."
        )
    if "qat" in spec.quantized_methods():
        text.append(
            f"QAT training text: {spec.qat_data}; {spec.qat_steps} steps in windows of {spec.seq_len} "
            f"(further settings: {json.dumps(spec.qat_settings) if spec.qat_settings else 'lowbit.qat defaults'})."
        )
    return text


def markdown_report(records: list[dict], spec: SweepSpec) -> str:
    parts = [
        "# lowbit pareto results",
        "",
        "Ranked by KL to the full-precision model (mean over predicted tokens); perplexity beside it. "
        "Size: every byte needed to run the model (packed codes, scales, zero points, high-precision tensors). "
        "MB = 10^6 bytes.",
        "",
        *[f"- {line}" for line in _eval_description(records, spec)],
        "",
        markdown_table(records),
        "",
        *[f"- {line}" for line in summary_lines(records)],
        "",
    ]
    return "\n".join(parts)


_METHOD_STYLE = {
    "rtn": {"marker": "o", "color": "#1f77b4"},
    "gptq": {"marker": "s", "color": "#d62728"},
    "qat": {"marker": "^", "color": "#2ca02c"},
}
_LINESTYLES = ["-", "--", ":", "-."]


def plot_pareto(records: list[dict], path: str | os.PathLike[str]) -> None:
    """Quality vs size, one row per model: KL (log) and perplexity against total MB (log)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ticks = FuncFormatter(_log_tick)

    models = _models(records)
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.8 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        rows = [r for r in records if r["model"] == model]
        quant = [r for r in rows if r["method"] != "fp"]
        fp = next((r for r in rows if r["method"] == "fp"), None)
        granularities = list(dict.fromkeys(r["group_size"] for r in quant))
        ax_kl, ax_ppl = axes[row]
        for ax, metric in ((ax_kl, "kl_to_reference"), (ax_ppl, "perplexity")):
            for method in dict.fromkeys(r["method"] for r in quant):
                style = _METHOD_STYLE.get(method, {"marker": "D", "color": "#555555"})
                for gi, g in enumerate(granularities):
                    pts = sorted(
                        (r for r in quant if r["method"] == method and r["group_size"] == g),
                        key=lambda r: r["total_bytes"],
                    )
                    pts = [r for r in pts if metric != "kl_to_reference" or r[metric] > 0]
                    if not pts:
                        continue
                    gran = "per-channel" if g is None else f"g{g}"
                    ax.plot(
                        [r["total_bytes"] / MB for r in pts],
                        [r[metric] for r in pts],
                        linestyle=_LINESTYLES[gi % len(_LINESTYLES)],
                        marker=style["marker"],
                        color=style["color"],
                        markersize=7,
                        alpha=0.85,
                        label=f"{method.upper()} {gran}",
                    )
                    for r in pts:
                        ax.annotate(
                            f"{r['bits']:g}b",
                            (r["total_bytes"] / MB, r[metric]),
                            textcoords="offset points",
                            xytext=(5, 4),
                            fontsize=8,
                        )
            front = sorted(
                (r for r in quant if r["frontier"] and (metric != "kl_to_reference" or r[metric] > 0)),
                key=lambda r: r["total_bytes"],
            )
            if front:
                ax.plot(
                    [r["total_bytes"] / MB for r in front],
                    [r[metric] for r in front],
                    linestyle="none",
                    marker="o",
                    markersize=15,
                    markerfacecolor="none",
                    markeredgecolor="black",
                    markeredgewidth=1.6,
                    label="Pareto frontier (by KL)",
                )
                if metric == "kl_to_reference":
                    ax.step(
                        [r["total_bytes"] / MB for r in front],
                        [r[metric] for r in front],
                        where="post",
                        color="black",
                        linewidth=1,
                        alpha=0.5,
                    )
            if fp is not None:
                if metric == "perplexity":
                    ax.plot(
                        [fp["total_bytes"] / MB],
                        [fp["perplexity"]],
                        marker="*",
                        markersize=16,
                        color="#ff9900",
                        markeredgecolor="black",
                        linestyle="none",
                        label=f"{point_label(fp)} reference",
                    )
                    ax.axhline(fp["perplexity"], color="#ff9900", linestyle=":", linewidth=1)
                else:
                    ax.axvline(
                        fp["total_bytes"] / MB,
                        color="#ff9900",
                        linestyle=":",
                        linewidth=1.5,
                        label=f"{point_label(fp)} reference size (KL 0)",
                    )
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticks)
            ax.xaxis.set_minor_formatter(ticks)
            ax.set_xlabel("total model size (MB, all bytes needed to run; log scale)")
            ax.grid(True, which="both", alpha=0.3)
        ax_kl.set_yscale("log")
        ax_kl.set_ylabel("KL to full precision (nats/token, log scale)")
        ppl = [r["perplexity"] for r in rows]
        if max(ppl) > 3 * min(ppl):  # wide range (e.g. a collapsed 2-bit point): log scale
            ax_ppl.set_yscale("log")
            ax_ppl.yaxis.set_major_formatter(ticks)
            ax_ppl.yaxis.set_minor_formatter(ticks if max(ppl) < 30 * min(ppl) else NullFormatter())
            ax_ppl.set_ylabel("perplexity (log scale)")
        else:
            ax_ppl.set_ylabel("perplexity")
        tokens = rows[0]["tokens"]
        ax_kl.set_title(f"{model}: KL to full precision vs size ({tokens:,} tokens)")
        ax_ppl.set_title(f"{model}: perplexity vs size ({tokens:,} tokens)")
        ax_kl.legend(fontsize=8, loc="best")
        ax_ppl.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_tick(value: float, _pos=None) -> str:
    """Plain numbers on a log axis, labelled only at 1, 2, 3 and 5 times a power of ten."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if any(abs(mantissa - m) < 1e-6 for m in (1, 2, 3, 5)) else ""


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; }
td.text { text-align: left; }
tr.frontier td { background: #eef7ee; font-weight: 600; }
tr.fp td { background: #fff6e5; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.9em; }
"""


def html_report(records: list[dict], spec: SweepSpec, png: bytes) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(title)}</th>" for _, title in _COLUMNS)
    body = []
    for row, r in zip(table_rows(records), records, strict=True):
        cls = "fp" if r["method"] == "fp" else ("frontier" if r["frontier"] else "")
        cells = "".join(
            f'<td class="text">{esc(row[k])}</td>'
            if k in ("model", "label", "quantizer", "frontier")
            else f"<td>{esc(row[k])}</td>"
            for k, _ in _COLUMNS
        )
        body.append(f'<tr class="{cls}" data-key="{esc(r["key"])}">{cells}</tr>')
    summary = "".join(f"<li>{esc(line)}</li>" for line in summary_lines(records))
    evaluation = "".join(f"<li>{esc(line)}</li>" for line in _eval_description(records, spec))
    versions = records[0].get("versions", {}) if records else {}
    settings = "\n".join(
        f'<tr><td class="text">{esc(k)}</td><td class="text"><code>{esc(json.dumps(v))}</code></td></tr>'
        for k, v in spec.to_dict().items()
    )
    img = base64.b64encode(png).decode("ascii")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lowbit pareto report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>lowbit pareto: size vs quality</h1>
<p class="note">Generated {esc(generated)} by lowbit {esc(__version__)} from {len(records)} points.
Size counts every byte needed to run the model (packed codes, scales, zero points and every tensor
left in high precision); MB = 10<sup>6</sup> bytes. Points are ranked by KL to the full-precision model
(mean over predicted tokens), the steadier yardstick on a small eval text; perplexity is shown beside it.
A point is on the frontier when no other point of the same model is as small or smaller with KL as low or lower.</p>
<h2>Summary</h2>
<ul id="summary">{summary}</ul>
<h2>Plot</h2>
<img id="pareto-plot" alt="KL to full precision and perplexity vs total model size" src="data:image/png;base64,{img}">
<h2>Results</h2>
<table id="results">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<h2>Evaluation</h2>
<ul id="evaluation">{evaluation}</ul>
<h2>Settings</h2>
<table id="settings">
{settings}
</table>
<p class="note">Software: {esc(json.dumps(versions))}</p>
</body>
</html>
"""


def write_report(records: list[dict], spec: SweepSpec, out: str | os.PathLike[str]) -> dict:
    """Write ``results.md``, ``pareto.png`` and ``report.html`` into ``out``; returns their paths.

    Frontier flags are (re)computed on ``records``, which come back sorted by model then KL.
    """
    out = Path(out)
    records[:] = mark_frontier(records)
    png_path, html_path, md_path = out / "pareto.png", out / "report.html", out / "results.md"
    buffer = io.BytesIO()
    plot_pareto(records, buffer)
    png = buffer.getvalue()
    atomic_write(png_path, png)
    atomic_write(html_path, html_report(records, spec, png).encode("utf-8"))
    atomic_write(md_path, markdown_report(records, spec).encode("utf-8"))
    return {
        "results": str(out / RESULTS_FILE),
        "report": str(html_path),
        "plot": str(png_path),
        "markdown": str(md_path),
    }
