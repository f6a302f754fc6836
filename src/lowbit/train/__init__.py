"""Quantization-aware training: the ParetoQ recipe, distilled from the full-precision model.

ParetoQ (Liu et al. 2025): start from the pretrained model, fake-quantize every linear layer with
the quantizer its bit-width calls for (``QuantConfig(bits, quantizer="auto")``: binary, SEQ or
LSQ) and train the latent weights (straight-through) and the scales (LSQ gradient) with AdamW, a
linear warm-up and a cosine decay to zero. The scales form their own parameter group, with their
own learning rate and no weight decay.

LLM-QAT (Liu et al. 2023): a frozen copy of the full-precision model is the teacher and the loss
is ``KL(teacher || student)`` on the logits (temperature 1), next-token cross-entropy, or a mix.
In data-free mode the teacher writes the training text itself (first token random, the next few
greedy, the rest sampled), cached on disk with a JSON record of how it was made.

Runs resume bit for bit: the training windows of step ``s`` are a pure function of (seed, s), and
the checkpoint holds weights, scales, optimizer, scheduler and RNG states. The same code runs
alone or under ``torchrun`` with DDP (or FSDP), each rank taking its slice of the same global batch.

Modules: :mod:`~lowbit.train.config` (TrainConfig), :mod:`~lowbit.train.loss` (schedule, data order,
loss, optimizer), :mod:`~lowbit.train.data` (training windows, data-free text and its cache),
:mod:`~lowbit.train.student` (teacher and student models), :mod:`~lowbit.train.checkpoint` (run folder),
:mod:`~lowbit.train.distributed` (DDP / FSDP), :mod:`~lowbit.train.loop` (optimize, train, run),
:mod:`~lowbit.train.method` (the ``qat`` method of :mod:`lowbit.ptq.methods`).
"""

from lowbit.lazy import load_object

_EXPORTS = {  # name -> the module of lowbit.train that defines it (imported on first use)
    **dict.fromkeys((
        "CHECKPOINT", "LOSS_PLOT", "METRICS", "RESULT", "RUN_CONFIG", "plot_loss", "read_metrics",
        "rng_state", "save_checkpoint", "seed_everything", "set_rng_state", "write_result"
    ), "checkpoint"),
    **dict.fromkeys(("RESUME_MAY_CHANGE", "TrainConfig", "default_lr"), "config"),
    **dict.fromkeys((
        "data_free_dir", "data_free_windows", "generate_tokens", "model_fingerprint", "tokens_fingerprint",
        "training_windows"
    ), "data"),
    **dict.fromkeys(("DistContext", "setup_distributed"), "distributed"),
    **dict.fromkeys(("TrainRun", "finish", "optimize", "run", "train"), "loop"),
    **dict.fromkeys(("distillation_loss", "lr_multiplier", "make_optimizer", "param_groups", "step_indices"), "loss"),
    **dict.fromkeys(("QAT",), "method"),
    **dict.fromkeys((
        "build_student", "compile_quantizers_", "load_teacher", "round_for_storage_", "student_skeleton",
        "uncompile_quantizers_"
    ), "student"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return load_object(f"lowbit.train.{_EXPORTS[name]}:{name}")
    raise AttributeError(f"module 'lowbit.train' has no attribute {name!r}")
