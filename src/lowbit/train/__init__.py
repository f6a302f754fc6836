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

from lowbit.train.checkpoint import (
    CHECKPOINT,
    LOSS_PLOT,
    METRICS,
    RESULT,
    RUN_CONFIG,
    plot_loss,
    read_metrics,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    write_result,
)
from lowbit.train.config import RESUME_MAY_CHANGE, TrainConfig, default_lr
from lowbit.train.data import (
    data_free_dir,
    data_free_windows,
    generate_tokens,
    model_fingerprint,
    tokens_fingerprint,
    training_windows,
)
from lowbit.train.distributed import DistContext, setup_distributed
from lowbit.train.loop import TrainRun, finish, optimize, run, train
from lowbit.train.loss import distillation_loss, lr_multiplier, make_optimizer, param_groups, step_indices
from lowbit.train.method import QAT
from lowbit.train.student import (
    build_student,
    compile_quantizers_,
    load_teacher,
    round_for_storage_,
    student_skeleton,
    uncompile_quantizers_,
)

__all__ = [
    "CHECKPOINT",
    "LOSS_PLOT",
    "METRICS",
    "QAT",
    "RESULT",
    "RESUME_MAY_CHANGE",
    "RUN_CONFIG",
    "DistContext",
    "TrainConfig",
    "TrainRun",
    "build_student",
    "compile_quantizers_",
    "data_free_dir",
    "data_free_windows",
    "default_lr",
    "distillation_loss",
    "finish",
    "generate_tokens",
    "load_teacher",
    "lr_multiplier",
    "make_optimizer",
    "model_fingerprint",
    "optimize",
    "param_groups",
    "plot_loss",
    "read_metrics",
    "rng_state",
    "round_for_storage_",
    "run",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "setup_distributed",
    "step_indices",
    "student_skeleton",
    "tokens_fingerprint",
    "train",
    "training_windows",
    "uncompile_quantizers_",
    "write_result",
]
