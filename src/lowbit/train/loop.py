"""The optimization loop, shared by the in-memory :func:`train` and the resumable :func:`run`
(``lowbit train``), and the steps :func:`run` goes through."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval.models import check_seq_len, model_id
from lowbit.quant.surgery import QuantConfig, quantize_model, quantized_modules
from lowbit.train.checkpoint import (
    CHECKPOINT,
    LOSS_PLOT,
    METRICS,
    RESULT,
    load_checkpoint,
    load_full_state,
    plot_loss,
    prepare_out,
    publish_model,
    read_metrics,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    truncate_metrics,
    write_result,
    write_run_config,
)
from lowbit.train.config import TrainConfig
from lowbit.train.data import data_free_windows, model_fingerprint, training_windows
from lowbit.train.distributed import DistContext, no_sync, setup_distributed, teardown, wrap
from lowbit.train.loss import distillation_loss, make_optimizer, step_indices
from lowbit.train.student import (
    build_student,
    compile_quantizers_,
    load_teacher,
    round_for_storage_,
    student_skeleton,
    uncompile_quantizers_,
)

# ----------------------------------------------------------------------------------------------
# the loop


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _step(cfg, ctx, model, student, teacher, windows, optimizer, scheduler, step, autocast, sync_off):
    """One optimizer step; returns the global-batch means of (loss, kl, ce) and the group lrs used."""
    indices = step_indices(cfg.seed, step, cfg.global_batch, len(windows))
    local = cfg.batch_size // ctx.world
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3)
    for micro in range(cfg.grad_accum):
        batch = indices[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
        ids = windows[batch[ctx.rank * local : (ctx.rank + 1) * local]].to(ctx.device)
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else sync_off(), autocast():
            teacher_logits = None
            if cfg.loss != "ce":
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            logits = model(input_ids=ids, use_cache=False).logits
            loss, parts = distillation_loss(logits, ids, teacher_logits, cfg.loss, cfg.kl_weight)
            (loss / cfg.grad_accum).backward()
        zero = torch.zeros((), device=loss.device)
        sums += torch.stack([loss.detach(), parts.get("kl", zero), parts.get("ce", zero)]).float().cpu()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.step()
    scheduler.step()
    return ctx.mean(sums.to(ctx.device)).cpu() / cfg.grad_accum, lrs


def _log_row(cfg: TrainConfig, step: int, means: torch.Tensor, lrs: list, tokens: int, rate: float, elapsed: float):
    """One ``metrics.jsonl`` line: the step's mean loss (and its parts), lrs, tokens and timing."""
    row = {
        "step": step,
        "loss": float(means[0]),
        "lr": lrs[0],
        "scale_lr": lrs[-1],
        "tokens": tokens,
        "tokens_per_s": rate,
        "elapsed": elapsed,
        "loss_kind": cfg.loss,
    }
    if cfg.loss == "mix":
        row.update(kl=float(means[1]), ce=float(means[2]))
    return row


def optimize(
    cfg: TrainConfig,
    ctx: DistContext,
    model: nn.Module,
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    optimizer,
    scheduler,
    start_step: int = 0,
    elapsed_before: float = 0.0,
    progress: bool = True,
    on_log=None,
    on_step=None,
) -> float:
    """Optimizer steps ``start_step .. cfg.steps``; ``model`` is ``student`` or its DDP wrapper.

    Each step reads the windows :func:`step_indices` gives it, ``batch_size`` per micro-step
    (this rank's slice of them), and averages the loss over the global batch. ``on_log(row)`` is
    called every ``log_every`` steps, ``on_step(step, elapsed)`` after every step. Returns the
    total elapsed seconds.
    """
    autocast = _autocast(cfg, ctx.device)
    sync_off = no_sync(model, student, cfg.fsdp, ctx)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    student.train()
    show = progress and ctx.is_main
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"QAT {cfg.bits:g}-bit", unit="step", disable=not show)
    t_start = time.time()
    t_last, tokens_last = t_start, start_step * tokens_per_step
    try:
        for step in range(start_step, cfg.steps):
            means, lrs = _step(
                cfg, ctx, model, student, teacher, windows, optimizer, scheduler, step, autocast, sync_off
            )
            done = step + 1
            if not torch.isfinite(means).all():  # every rank sees the same global mean, so all stop
                raise NonFiniteLoss(done, f"the training loss is {float(means[0])}", cfg.lr)
            bar.update(1)
            now = time.time()
            if on_log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                tokens = done * tokens_per_step
                rate = (tokens - tokens_last) / max(now - t_last, 1e-9)
                row = _log_row(cfg, done, means, lrs, tokens, rate, round(elapsed_before + now - t_start, 3))
                t_last, tokens_last = now, tokens
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                on_log(row)
            if on_step is not None:
                on_step(done, elapsed_before + now - t_start)
    finally:
        bar.close()
    return elapsed_before + time.time() - t_start


class NonFiniteLoss(LowbitError):
    """The loss (or the weights) became NaN/inf at ``step``: training stops before that step is
    logged or saved, so the last checkpoint holds finite weights."""

    def __init__(self, step: int, what: str, lr: float, saved: str = ""):
        self.step, self.what, self.lr = step, what, lr
        super().__init__(
            f"{what} at step {step}: training stopped{saved}. Train again with a "
            f"lower --lr (now {lr:g}) or --scale-lr, or a larger --warmup"
        )


def _weights_finite(student: nn.Module, ctx: DistContext) -> bool:
    """Whether every parameter (this rank's shard of it, agreed over all ranks) is finite."""
    bad = any(not torch.isfinite(p).all() for p in student.parameters())
    return float(ctx.mean(torch.tensor([float(bad)], device=ctx.device))) == 0.0


def _check_batch_fits(cfg: TrainConfig, n_windows: int) -> None:
    if cfg.global_batch > n_windows:
        raise LowbitError(
            f"one step needs batch-size x grad-accum = {cfg.global_batch} windows of {cfg.seq_len} tokens, "
            f"but the data has only {n_windows}: use more data, a smaller batch or a shorter seq-len"
        )


# ----------------------------------------------------------------------------------------------
# in memory (the Pareto sweep, Python users)


def _in_memory_teacher(model: nn.Module, config: QuantConfig, cfg: TrainConfig, teacher: nn.Module | None):
    """The teacher of :func:`train`, quantizing ``model`` in place unless it already is."""
    if getattr(model, "lowbit_config", None) is not None:
        if teacher is None and cfg.loss != "ce":
            raise LowbitError(
                "the model is already quantized, so it cannot be its own teacher: pass teacher= (the "
                "full-precision model) or use loss='ce'"
            )
    else:
        if teacher is None and cfg.loss != "ce":
            teacher = copy.deepcopy(model)
        quantize_model(model, config)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    return teacher


def train(
    model: nn.Module,
    config: QuantConfig,
    tokenizer=None,
    data: str | torch.Tensor = "wiki-train",
    steps: int = 100,
    seq_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    **settings,
) -> dict:
    """QAT in memory, no run folder: quantize ``model`` in place with ``config`` and train it.

    ``data`` is a text name, a text file, a ``.pt`` token file or a token tensor. The teacher is a
    frozen copy of ``model`` taken before quantizing, or ``teacher`` (needed when ``model`` is
    already quantized, e.g. by GPTQ). ``settings`` are further :class:`TrainConfig` fields
    (batch_size, grad_accum, lr, scale_lr, warmup, loss, kl_weight, ...). The scales and
    high-precision tensors end rounded for storage. Returns the loss record.
    """
    data_name = data if isinstance(data, str) else "tensor"
    cfg = TrainConfig(out="", quant=config, steps=steps, seq_len=seq_len, seed=seed, data=data_name, **settings)
    check_seq_len(model, seq_len, "seq_len")
    teacher = _in_memory_teacher(model, config, cfg, teacher)
    windows, data_record = training_windows(cfg, tokenizer, data)
    _check_batch_fits(cfg, len(windows))
    seed_everything(seed)
    model.requires_grad_(True)
    if cfg.compile:
        compile_quantizers_(model)
    optimizer, scheduler = make_optimizer(model, cfg)
    rows: list[dict] = []
    ctx = DistContext(device=next(model.parameters()).device)
    elapsed = optimize(
        cfg, ctx, model, model, teacher, windows, optimizer, scheduler, progress=progress, on_log=rows.append
    )
    model.eval()
    uncompile_quantizers_(model)
    round_for_storage_(model)
    tokens = steps * cfg.global_batch * seq_len
    return {
        "steps": steps,
        "train_tokens": tokens,
        "train_seconds": round(elapsed, 2),
        "tokens_per_s": tokens / elapsed,
        "first_loss": rows[0]["loss"],
        "final_loss": rows[-1]["loss"],
        "data": data_record,
        "metrics": rows,
    }


# ----------------------------------------------------------------------------------------------
# the resumable run (lowbit train)


@dataclass
class TrainRun:
    """What :func:`run` hands back: the trained (storage-rounded) model, its teacher and record."""

    model: nn.Module | None
    teacher: nn.Module | None
    tokenizer: object
    result: dict


@dataclass
class _Training:
    """The state of a run between its setup and its end."""

    student: nn.Module
    model: nn.Module  # student or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int = 0
    elapsed_before: float = 0.0


def _open_run(cfg: TrainConfig, out: Path, ctx: DistContext, resume: bool) -> dict | None:
    """Check the settings against the launch and the folder; the saved config when resuming."""
    if cfg.batch_size % ctx.world:
        raise LowbitError(f"batch-size {cfg.batch_size} must be a multiple of the number of processes ({ctx.world})")
    if cfg.fsdp and not ctx.active:
        raise LowbitError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N")
    return prepare_out(out, cfg, resume)


def _run_windows(cfg: TrainConfig, ctx: DistContext, teacher: nn.Module, tokenizer, progress: bool):
    """The training windows and their record; in data-free mode rank 0 writes (or finds) the
    cache and the other ranks read it."""
    if cfg.data_free is None:
        return training_windows(cfg, tokenizer)
    if ctx.is_main:
        fingerprint = model_fingerprint(teacher)
        windows, data_record = data_free_windows(teacher.to(ctx.device), tokenizer, cfg, fingerprint, progress)
        teacher.to("cpu")
    ctx.barrier()
    if not ctx.is_main:
        windows, data_record = data_free_windows(
            teacher, tokenizer, cfg, model_fingerprint(teacher), progress=False, write=False
        )
    return windows, data_record


def _start_training(cfg, ctx, teacher, tokenizer, checkpoint: dict | None, progress: bool) -> _Training:
    """The student (new, or rebuilt from ``checkpoint``), on the device, wrapped, with its
    optimizer; restored to the checkpoint's step (whose tensors are then released)."""
    if checkpoint is not None:
        student = student_skeleton(teacher, QuantConfig.from_dict(checkpoint["quant_config"]), checkpoint["model"])
    else:
        student = build_student(teacher, tokenizer, cfg, progress=progress and ctx.is_main)
    student.requires_grad_(True)
    student.to(ctx.device)
    teacher.to(ctx.device)
    if cfg.compile:
        compile_quantizers_(student)
    model = wrap(student, teacher, cfg.fsdp, ctx)
    optimizer, scheduler = make_optimizer(student, cfg)
    training = _Training(student, model, optimizer, scheduler)
    if checkpoint is not None:
        load_full_state(student, optimizer, checkpoint["model"], checkpoint["optimizer"], cfg.fsdp)
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        training.start_step, training.elapsed_before = checkpoint["step"], checkpoint["elapsed"]
        checkpoint.clear()
    return training


def _train_logged(cfg, out, ctx, training: _Training, teacher, tokenizer, windows, data_record, progress) -> float:
    """:func:`optimize` with metrics appended to ``metrics.jsonl`` (rank 0) and checkpoints saved;
    a NaN/inf loss stops it with the last checkpoint untouched."""
    metrics_file = open(out / METRICS, "a") if ctx.is_main else None
    saved_step = training.start_step if (out / CHECKPOINT).is_file() else None
    scorer = _HeldOut(cfg, out, teacher, tokenizer, training.start_step) if cfg.eval_every and ctx.is_main else None
    if scorer is not None:
        scorer.start(training.student, training.start_step)

    def on_log(row):
        if metrics_file is not None:
            metrics_file.write(json.dumps(row, allow_nan=False) + "\n")
            metrics_file.flush()

    def on_step(step, elapsed):
        nonlocal saved_step
        if scorer is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            scorer(training.student, step, elapsed)
        if step % cfg.save_every == 0 or step == cfg.steps:
            t = training
            if not _weights_finite(t.student, ctx):
                raise NonFiniteLoss(step, "the weights hold NaN/inf", cfg.lr)
            save_checkpoint(out / CHECKPOINT, t.student, t.optimizer, t.scheduler, step, elapsed, data_record, ctx)
            saved_step = step

    try:
        return optimize(
            cfg,
            ctx,
            training.model,
            training.student,
            teacher,
            windows,
            training.optimizer,
            training.scheduler,
            training.start_step,
            training.elapsed_before,
            progress,
            on_log,
            on_step,
        )
    except NonFiniteLoss as exc:
        where = (
            f"; the last good checkpoint ({out / CHECKPOINT}, step {saved_step}) is intact"
            if saved_step is not None
            else " before its first checkpoint (none was saved)"
        )
        raise NonFiniteLoss(exc.step, exc.what, exc.lr, where) from None
    finally:
        if metrics_file is not None:
            metrics_file.close()


EVAL_CURVE = "eval.jsonl"


class _HeldOut:
    """``--eval-every``: the student scored on held-out windows against the teacher's cached log-probs,
    one line per score in ``eval.jsonl`` (lines after the resumed step are dropped and replayed)."""

    def __init__(self, cfg: TrainConfig, out: Path, teacher: nn.Module, tokenizer, start_step: int):
        from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos
        from lowbit.eval.evaluation import cache_reference

        windows = tokenize_windows(tokenizer, get_text(cfg.eval_text), min(512, cfg.seq_len),
                                   max_tokens=cfg.eval_every_tokens, bos=tokenizer_adds_bos(tokenizer))  # fmt: skip
        self.windows = windows.to(next(teacher.parameters()).device)
        self.reference = cache_reference(teacher, self.windows, batch_size=4, progress=False)
        self.tokens_per_step = cfg.global_batch * cfg.seq_len
        self.path = out / EVAL_CURVE
        truncate_metrics(self.path, start_step)

    def start(self, student: nn.Module, step: int) -> None:
        """The first point of the curve: the student before its first step (a fresh run only)."""
        if step == 0:
            self(student, 0, 0.0)

    def __call__(self, student: nn.Module, step: int, elapsed: float) -> None:
        from lowbit.eval.evaluation import evaluate

        q = evaluate(student, self.windows, reference=self.reference, progress=False)
        student.train()
        row = {"step": step, "tokens": step * self.tokens_per_step, "elapsed": round(elapsed, 1),
               "eval_kl": q["kl_to_reference"], "eval_perplexity": q["perplexity"],
               "eval_top1": q["top1_agreement"], "eval_tokens": q["tokens"]}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def run(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainRun:
    """Run (or resume) QAT as ``cfg`` says, in the folder ``cfg.out``: the quantized model,
    ``metrics.jsonl``, ``loss.png``, ``train_config.json`` and ``train_result.json``.

    Under torchrun every rank calls this; only rank 0's result is complete (others get
    ``{"rank": r}``). A checkpoint is written every ``save_every`` steps and at the end.
    """
    out = Path(cfg.out)
    ctx = setup_distributed()
    saved = _open_run(cfg, out, ctx, resume)
    if saved is not None and saved.get("finished") and (out / RESULT).is_file():
        teardown(ctx)
        return TrainRun(None, None, None, json.loads((out / RESULT).read_text()))
    ctx.barrier()

    teacher, tokenizer = load_teacher(cfg.model)
    check_seq_len(teacher, cfg.seq_len, "--seq-len")
    windows, data_record = _run_windows(cfg, ctx, teacher, tokenizer, progress)
    _check_batch_fits(cfg, len(windows))
    checkpoint = None
    if saved is not None and (out / CHECKPOINT).is_file():
        checkpoint = load_checkpoint(out, data_record)
    seed_everything(cfg.seed)
    training = _start_training(cfg, ctx, teacher, tokenizer, checkpoint, progress)
    del checkpoint
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if saved is None:
            write_run_config(out, cfg, data_record, ctx.world)
        truncate_metrics(out / METRICS, training.start_step)
    ctx.barrier()
    elapsed = _train_logged(cfg, out, ctx, training, teacher, tokenizer, windows, data_record, progress)
    return finish(cfg, out, ctx, training.student, teacher, tokenizer, data_record, elapsed, training.start_step)


# ----------------------------------------------------------------------------------------------
# the end of a run


def _gather_fsdp(cfg: TrainConfig, ctx: DistContext, student: nn.Module, teacher: nn.Module):
    """Gather FSDP-sharded weights on rank 0 into a plain, unsharded (student, teacher)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        teacher = load_teacher(cfg.model)[0]
        student = student_skeleton(teacher, student.lowbit_config, state)
        student.load_state_dict(state)
    return student, teacher


def _model_info(cfg: TrainConfig, data_record: dict, tokens: int, elapsed: float) -> dict:
    """The ``info`` of the saved folder's ``lowbit.json``."""
    return {
        "base_model": cfg.model,
        "base_model_id": model_id(cfg.model),
        "method": "qat",
        "init": cfg.init,
        "train_tokens": tokens,
        "train_seconds": round(elapsed, 1),
        "data": {k: v for k, v in data_record.items() if k != "cache_hit"},
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("out", "model", "keep_checkpoint")},
    }


def _result(cfg, out, ctx, student, data_record, metrics, tokens, elapsed, start_step) -> dict:
    """``train_result.json``: what ``lowbit train`` prints."""
    return {
        "out": str(out),
        "base_model": cfg.model,
        "bits": cfg.bits,
        "quantizer": quantized_modules(student)[0][1].quantizer.name,
        "group_size": cfg.quant.group_size,
        "init": cfg.init,
        "loss": cfg.loss,
        "steps": cfg.steps,
        "train_tokens": tokens,
        "data": data_record.get("source", "data-free"),
        "data_cache_hit": data_record.get("cache_hit"),
        "first_loss": metrics[0]["loss"] if metrics else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "train_seconds": round(elapsed, 1),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "resumed_from_step": start_step or None,
        "world_size": ctx.world,
    }


def finish(cfg, out, ctx, student, teacher, tokenizer, data_record, elapsed, start_step) -> TrainRun:
    """Round the model for storage, save the folder, plot the loss and write the record (rank 0)."""
    if cfg.fsdp:
        student, teacher = _gather_fsdp(cfg, ctx, student, teacher)
    if not ctx.is_main:
        ctx.barrier()
        teardown(ctx)
        return TrainRun(None, None, tokenizer, {"rank": ctx.rank})
    student = student.to("cpu").eval()
    teacher = teacher.to("cpu")
    uncompile_quantizers_(student)
    round_for_storage_(student)
    metrics = read_metrics(out / METRICS)
    tokens = cfg.steps * cfg.global_batch * cfg.seq_len
    publish_model(student, tokenizer, out, _model_info(cfg, data_record, tokens, elapsed))
    plot_loss(metrics, out / LOSS_PLOT, title=f"QAT {model_id(cfg.model)} {cfg.bits:g}-bit, loss={cfg.loss}")
    result = _result(cfg, out, ctx, student, data_record, metrics, tokens, elapsed, start_step)
    write_result(out, result)
    if not cfg.keep_checkpoint:
        (out / CHECKPOINT).unlink(missing_ok=True)
    ctx.barrier()
    teardown(ctx)
    return TrainRun(student, teacher, tokenizer, result)
