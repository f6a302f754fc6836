"""Running a sweep: load each model once, cache its reference log-probs, measure every point.

Quality follows docs/methods.md ("Measuring"): every point of a model is measured on the same
eval windows against the same full-precision log-probs, computed once per model and kept in
memory (:func:`lowbit.eval.evaluation.cache_reference`), so the reference model runs once per sweep,
not once per point. Each finished point goes to the :class:`~lowbit.pareto.store.ResultStore`
before the next one starts, so a killed sweep loses at most the point in progress. Points whose
method class quantizes several together (``sweep_apply``: a sweep's byte budgets share their
rotation and sensitivities) are still stored one by one, as each is measured.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.eval.evaluation import CachedReference, cache_reference, evaluate, size_account
from lowbit.pareto.html import write_report
from lowbit.pareto.report import fmt_mb, summary_lines
from lowbit.pareto.spec import (
    SweepSpec,
    llama_cpp_available,
    method_key,
    method_points,
    plan_points,
    point_key,
    point_label,
    text_fingerprints,
)
from lowbit.pareto.store import ResultStore
from lowbit.ptq.methods import Method, make_method

# What a point's record keeps of its method's report: a training method's losses (the per-step
# metrics stay out), a pipeline's stages and what it skipped, a byte budget's plan in summary.
_REPORT_KEYS = ("steps", "train_tokens", "train_seconds", "first_loss", "final_loss", "data", "stages", "skipped")
_PLAN_KEYS = ("plan_summary", "plan_embeddings", "budget_bytes", "predicted_bits_per_weight_linear",
              "predicted_loss_increase")  # fmt: skip
# A planned method's placeholder width: the plan replaces every layer's (as lowbit quantize does).
_PLANNED_BITS = 4


def sweep_methods(spec: SweepSpec, fingerprints: dict[str, str]) -> dict[str, Method]:
    """The method of each quantized point, by :func:`~lowbit.pareto.spec.method_key` of its settings;
    built before any compute, so that a method that cannot run fails first."""
    return {
        method_key({"method": name, **keyed}): make_method(name, **made)
        for name, made, keyed in method_points(spec, fingerprints)
    }


@dataclass
class _ModelContext:
    """Everything a model's points share: the reference model, tokenizer, reference cache and methods."""

    spec: str
    reference: nn.Module
    tokenizer: object
    cache: CachedReference
    eval_sha256: str
    bos: bool
    reference_seconds: float
    methods: dict[str, Method]


def _load_context(model_spec: str, spec: SweepSpec, methods: dict[str, Method], progress: bool) -> _ModelContext:
    from lowbit.api import load
    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos

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
    seconds = time.perf_counter() - t0
    return _ModelContext(model_spec, reference, tokenizer, cache, eval_sha, bos, seconds, methods)


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


def _config(settings: dict, spec: SweepSpec):
    """The QuantConfig a point quantizes with (a planned method gets a placeholder width)."""
    from lowbit.quant.surgery import QuantConfig

    return QuantConfig(
        bits=settings.get("bits", _PLANNED_BITS),
        quantizer=spec.quantizer,
        group_size=settings.get("group_size"),
        scale_search=spec.scale_search,
        hp_dtype=spec.hp_dtype,
    )


def _kept(method: Method, report: dict) -> dict:
    """What a point's record keeps of its method's report (:data:`_REPORT_KEYS`), under the method's name."""
    if not report:
        return {}
    kept = {k: report[k] for k in _REPORT_KEYS if k in report}
    plan = report.get("plan")
    if isinstance(plan, dict) and "plan_summary" in plan:  # a pipeline's byte-budget stage
        kept["plan"] = {k: plan[k] for k in _PLAN_KEYS if k in plan}
    return {method.name: kept}


def _quantize(model: nn.Module, settings: dict, spec: SweepSpec, ctx: _ModelContext, progress: bool) -> dict:
    """Quantize ``model`` in place as ``settings`` say; returns what the record keeps of the method's report."""
    method = ctx.methods[method_key(settings)]
    # what a method prints (a byte budget's plan table) goes to stderr with the progress bars: stdout
    # holds the sweep's summary
    with contextlib.redirect_stdout(sys.stderr):
        report = method.apply(model, _config(settings, spec), tokenizer=ctx.tokenizer, progress=progress)
    return _kept(method, report)


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
    t_start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    if settings["method"] != "fp":
        model = copy.deepcopy(ctx.reference)
        reported = _quantize(model, settings, spec, ctx, progress)
        return _measured(settings, model, reported, time.perf_counter() - t_start, ctx, progress)
    model = ctx.reference
    extra = {"bits": float(8 * next(model.parameters()).element_size()), "quantizer": None, "group_size": None}
    seconds = time.perf_counter() - t_start + ctx.reference_seconds
    timing = {"quantize_seconds": 0.0, "eval_seconds": ctx.reference_seconds, "seconds": seconds}
    return _record(settings, ctx, extra, size_account(model), dict(ctx.cache.result), timing, {})


def measure_shared(group: list[dict], spec: SweepSpec, ctx: _ModelContext, progress: bool = True) -> Iterator[dict]:
    """Measure points whose methods are of one class that quantizes several together (its classmethod
    ``sweep_apply(methods, model, config, tokenizer, progress)`` yields a quantized copy and a report
    per method, sharing what does not depend on the point, such as a byte budget's sensitivities):
    one record per point, yielded as soon as it is measured. A point's quantize seconds are those spent
    on it since the previous one was ready (the first point's include the shared work)."""
    torch.manual_seed(group[0]["seed"])
    methods = [ctx.methods[method_key(s)] for s in group]
    made = type(methods[0]).sweep_apply(methods, ctx.reference, _config(group[0], spec), tokenizer=ctx.tokenizer,
                                        progress=progress)  # fmt: skip
    for settings, method in zip(group, methods, strict=True):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # as in _quantize
            model, report = next(made)
        yield _measured(settings, model, _kept(method, report), time.perf_counter() - t0, ctx, progress)
        del model


def _measured(settings: dict, model: nn.Module, reported: dict, quantize_seconds: float, ctx: _ModelContext,
              progress: bool) -> dict:  # fmt: skip
    """The record of a quantized point: ``model`` evaluated on the cached reference, its size, its method's report."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        quality = evaluate(model, ctx.cache.windows, reference=ctx.cache, progress=progress)
    eval_seconds = time.perf_counter() - t0
    extra = {k: settings.get(k) for k in ("bits", "quantizer", "group_size")}
    if "budget_bpw" in settings:
        extra["budget_bpw"] = settings["budget_bpw"]
    extra["rotated"] = getattr(model, "lowbit_rotation", None) is not None
    timing = {"quantize_seconds": quantize_seconds, "eval_seconds": eval_seconds,
              "seconds": quantize_seconds + eval_seconds}  # fmt: skip
    return _record(settings, ctx, extra, size_account(model), quality, timing, reported)


def _shared_class(settings: dict, ctx: _ModelContext) -> type | None:
    """The class of a point's method when it quantizes several points together (``sweep_apply``), else None."""
    if settings["method"] == "fp":
        return None
    cls = type(ctx.methods[method_key(settings)])
    return cls if callable(getattr(cls, "sweep_apply", None)) else None


def _batches(settings: list[dict], ctx: _ModelContext) -> Iterator[list[dict]]:
    """The points in order, in batches measured together: each run of consecutive points whose method
    class quantizes several together (:func:`measure_shared`) is one batch, every other point its own."""
    batch: list[dict] = []
    for s in settings:
        cls = _shared_class(s, ctx)
        if batch and cls is not None and cls is _shared_class(batch[0], ctx):
            batch.append(s)
            continue
        if batch:
            yield batch
        batch = [s]
        if cls is None:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(settings: dict, ctx: _ModelContext, extra: dict, size: dict, quality: dict, timing: dict, reported) -> dict:
    """One result record; ``timing``: its quantize_seconds, eval_seconds and (total) seconds."""
    from lowbit.eval.models import model_id

    return {
        "key": point_key(settings),
        "model": model_id(ctx.spec),
        "method": settings["method"],
        **extra,
        **size,
        **quality,
        "eval_tokens_sha256": ctx.eval_sha256,
        "eval_bos": ctx.bos,
        "seed": settings["seed"],
        **{k: round(timing[k], 3) for k in ("quantize_seconds", "eval_seconds", "seconds")},
        **reported,
        "settings": settings,
        "versions": _versions(),
    }


def measure_peers(peer, todo: list[dict], ctx: _ModelContext, progress: bool, log) -> Iterator[dict]:
    """Measure peer points ``todo`` (all of ``peer``'s, one model's) with their plug-in: one record each."""
    t_start = time.perf_counter()
    version = peer.version()
    for settings, measured in peer.measure(ctx, todo, progress, log):
        extra = {
            "peer": settings["peer"],
            "peer_type": settings["peer_type"],
            **{k: settings.get(k) for k in ("bits", "quantizer", "group_size")},
        }
        timing = {k: measured[k] for k in ("quantize_seconds", "eval_seconds")}
        timing["seconds"] = time.perf_counter() - t_start
        record = _record(settings, ctx, extra, measured["size"], measured["quality"], timing, {})
        record["peer_details"] = measured["details"]
        record["versions"][settings["peer"]] = version
        t_start = time.perf_counter()
        yield record


@dataclass
class _Run:
    """One invocation of :func:`run_sweep`: what it shares across models and what it has counted."""

    spec: SweepSpec
    store: ResultStore
    done: dict[str, dict]
    methods: dict[str, Method]
    peers: dict[str, object]
    run_id: str
    progress: bool
    log: Callable[[str], None]
    computed: int = 0
    skipped: int = 0


def sweep_peers(spec: SweepSpec) -> dict[str, object]:
    """The plug-in of each peer the sweep measures (:mod:`lowbit.peers`), checked before any compute."""
    from lowbit.peers import make_peer

    peers = {name: make_peer(name, spec.peer_settings.get(name)) for name in dict.fromkeys(spec.peers)}
    for peer in peers.values():
        peer.check()
    return peers


def plan_peer_points(spec: SweepSpec, lowbit_plan: list[dict], peers: dict[str, object]) -> list[dict]:
    """Settings of every peer point of one model: the model's common settings (those of its
    full-precision point, ``lowbit_plan[0]``), method ``peer`` and what each plug-in plans."""
    common = {k: v for k, v in lowbit_plan[0].items() if k != "method"}
    return [
        {**common, "method": "peer", "peer": name, **point} for name, peer in peers.items() for point in peer.plan(spec)
    ]


def _store(run: _Run, record: dict, counter: str) -> None:
    record["run_id"] = run.run_id
    record["computed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.store.append(record)
    run.done[record["key"]] = record
    run.computed += 1
    run.log(
        f"pareto: [{counter}] {record['model']} {point_label(record)}: "
        f"{fmt_mb(record['total_bytes'])} MB, KL {record['kl_to_reference']:.4g}, "
        f"ppl {record['perplexity']:.4g} ({record['seconds']:.0f} s)"
    )


def _sweep_model(run: _Run, model_spec: str, plan: list[dict]) -> None:
    """Measure and store the points of ``plan`` (one model's) that the store does not hold yet."""
    todo = [p for p in plan if point_key(p) not in run.done]
    run.skipped += len(plan) - len(todo)
    if not todo:
        run.log(f"pareto: {model_spec}: all {len(plan)} points already in {run.store.path}")
        return
    run.log(f"pareto: {model_spec}: {len(todo)} of {len(plan)} points to compute (run {run.run_id})")
    ctx = _load_context(model_spec, run.spec, run.methods, run.progress)
    run.log(
        f"pareto: {model_spec}: reference log-probs cached ({ctx.cache.result['tokens']} tokens, "
        f"{ctx.cache.nbytes / 2**30:.2f} GiB, {ctx.reference_seconds:.0f} s)"
    )
    own = [p for p in todo if p["method"] != "peer"]
    index = 0
    for batch in _batches(own, ctx):
        if len(batch) == 1:
            records = [measure_point(batch[0], run.spec, ctx, progress=run.progress)]
        else:
            records = measure_shared(batch, run.spec, ctx, progress=run.progress)
        for record in records:
            index += 1
            _store(run, record, f"{index}/{len(todo)}")
    for name, peer in run.peers.items():
        mine = [p for p in todo if p["method"] == "peer" and p["peer"] == name]
        if mine:
            try:
                for record in measure_peers(peer, mine, ctx, run.progress, run.log):
                    index += 1
                    _store(run, record, f"{index}/{len(todo)}")
            except LowbitError as exc:  # e.g. llama.cpp and a model lowbit cannot write as GGUF
                run.log(f"pareto: {model_spec}: {name} points skipped: {exc}")
    del ctx
    gc.collect()


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
    if "qat" in spec.methods and spec.qat_steps == 0:
        log("pareto: 'qat' skipped: QAT points need a training budget (--qat-steps N > 0)")
    notes = peer_notes(spec)
    for note in notes:
        log(f"pareto: {note}")
    fingerprints = text_fingerprints(spec)
    methods = sweep_methods(spec, fingerprints)  # a method (or peer) that cannot run fails before any compute
    peers = sweep_peers(spec)
    t_sweep = time.perf_counter()
    with ResultStore(out, inputs=tuple(spec.models)) as store:
        run = _Run(spec, store, store.read(), methods, peers, uuid.uuid4().hex[:12], progress, log)
        planned: list[dict] = []
        for model_spec in spec.models:
            plan = plan_points(spec, model_spec, fingerprints)
            plan += plan_peer_points(spec, plan, peers)
            planned.extend(plan)
            _sweep_model(run, model_spec, plan)
        records = [run.done[k] for k in map(point_key, planned) if k in run.done]  # a skipped peer is absent
    paths = write_report(records, spec, out)
    return {
        "out": str(out),
        "points": len(records),
        "computed": run.computed,
        "skipped": run.skipped,
        "run_id": run.run_id,
        "seconds": round(time.perf_counter() - t_sweep, 1),
        **paths,
        "frontier": [f"{r['model']} {point_label(r)}" for r in records if r["frontier"]],
        "peers": [f"{r['model']} {point_label(r)}" for r in records if r["method"] == "peer"],
        "summary": summary_lines(records) + notes,
    }


def peer_notes(spec: SweepSpec) -> list[str]:
    """One line when the sweep measures no llama.cpp points because llama-cpp-python is missing."""
    if "llama.cpp" in spec.peers or llama_cpp_available():
        return []
    return [
        "llama.cpp's own types were not measured: llama-cpp-python is not installed "
        "(pip install llama-cpp-python diskcache adds them to the default sweep)"
    ]
