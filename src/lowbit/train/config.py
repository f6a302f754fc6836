"""What defines a QAT run: :class:`TrainConfig`, which embeds the :class:`~lowbit.quant.surgery.QuantConfig`
that ``lowbit quantize`` takes (bits, grid, groups, include/exclude, overrides: one description for
both), and adds the training settings. Each training field carries its command-line help in its
metadata, from which ``lowbit train`` builds its options (:mod:`lowbit.options`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from lowbit.errors import LowbitError
from lowbit.eval.models import DEFAULT_MODEL
from lowbit.options import parse_positive_int
from lowbit.quant.surgery import QuantConfig
from lowbit.store.folder import is_quantized_dir

LOSSES = ("kl", "ce", "mix")
SCHEDULES = ("cosine", "constant")
INITS = ("rtn", "gptq")
DTYPES = ("auto", "fp32", "bf16")
FIRST_TOKENS = ("random", "bos")

# Settings that may differ between a run and its --resume: they do not change the trained model.
RESUME_MAY_CHANGE = frozenset({"save_every", "log_every", "keep_checkpoint", "eval_every", "eval_text", "eval_every_tokens"})

# option groups of ``lowbit train``, in the order they are shown (field metadata "group")
DATA, QUANT, OPTIM, GENERATION, RUN = (
    "training data (one of)",
    "quantization",
    "optimization",
    "data-free generation",
    "run",
)
POSITIVE = ("steps", "batch_size", "seq_len", "grad_accum", "save_every", "log_every", "gen_batch", "calib_seq_len")


def default_lr(bits: float) -> float:
    """ParetoQ's weight learning rate (Liu et al. 2025): 2e-5 at 2 bits and below, 1e-5 at 3 and 4 bits."""
    return 2e-5 if bits <= 2 else 1e-5


def _opt(help: str, group: str | None = None, **meta) -> dict:
    return {"help": help, "group": group, **meta}


def _positive(help: str, group: str | None = None, **meta) -> dict:
    return _opt(help, group, parse=parse_positive_int, **meta)


@dataclass
class TrainConfig:
    """Everything that defines a QAT run. ``quant`` says what to quantize (as for ``lowbit quantize``;
    a dict is read as one). ``data`` is a text name, a UTF-8 file or a ``.pt`` token tensor;
    ``data_free`` is the number of tokens the teacher writes instead. ``batch_size`` is the global
    number of sequences per micro-step (split over ranks); one optimizer step sees
    ``batch_size * grad_accum`` sequences. ``init`` is rtn, gptq or a lowbit quantized folder."""

    out: str = field(metadata=_opt("run folder: checkpoints, metrics, then the quantized model"))
    quant: QuantConfig = field(metadata={"cli": False})
    steps: int = field(metadata=_positive("optimizer steps"))
    model: str = field(
        default=DEFAULT_MODEL, metadata=_opt(f"full-precision model: {DEFAULT_MODEL}, HF folder or .gguf")
    )
    data: str | None = field(
        default=None, metadata=_opt("text to train on: wiki-train, news, a UTF-8 text file or a .pt token tensor", DATA)
    )
    data_free: int | None = field(
        default=None,
        metadata=_positive(
            "the teacher writes N_TOKENS of training text (LLM-QAT), cached and reused", DATA, metavar="N_TOKENS"
        ),
    )
    data_tokens: int | None = field(default=None, metadata=_positive("read at most this many tokens of --data"))
    init: str = field(
        default="rtn",
        metadata=_opt(
            "rtn (scales from the weights), gptq (GPTQ on --calib first) or a lowbit quantized folder", QUANT
        ),
    )
    calib: str = field(default="wiki-calib", metadata=_opt("--init gptq: calibration text", QUANT))
    calib_tokens: int = field(default=16384, metadata=_positive("--init gptq: calibration tokens", QUANT))
    calib_seq_len: int = field(default=512, metadata=_positive("--init gptq: calibration window length", QUANT))
    lr: float | None = field(
        default=None, metadata=_opt("weight lr (default 2e-5 at <=2 bits, 1e-5 at 3-4 bits)", OPTIM)
    )
    scale_lr: float | None = field(default=None, metadata=_opt("lr of the quantizer scales (default: --lr)", OPTIM))
    weight_decay: float = field(
        default=0.0, metadata=_opt("AdamW weight decay of the weight matrices", OPTIM, show_default=True)
    )
    train_params: str = field(
        default="all",
        metadata=_opt("what trains: all (latent weights, norms, scales) or scales (step sizes only: EfficientQAT's "
                      "E2E-QP, cheap after a block-wise or GPTQ start)", OPTIM, choices=("all", "scales")),
    )  # fmt: skip
    batch_size: int = field(default=8, metadata=_positive("sequences per micro-step, over all processes", OPTIM))
    seq_len: int = field(default=256, metadata=_positive("tokens per training window", OPTIM))
    grad_accum: int = field(default=1, metadata=_positive("micro-steps per optimizer step", OPTIM))
    warmup: int = field(
        default=0, metadata=_opt("linear warm-up steps before --schedule takes over", OPTIM, show_default=True)
    )
    schedule: str = field(
        default="cosine",
        metadata=_opt("learning rate after the warm-up: cosine (decay to zero at the last step) or constant (a curve "
                      "that can be extrapolated or continued)", OPTIM, choices=SCHEDULES, show_default=True),
    )  # fmt: skip
    grad_clip: float = field(default=1.0, metadata=_opt("max gradient norm (0: off)", OPTIM))
    loss: str = field(
        default="kl",
        metadata=_opt(
            "kl: KL(teacher||student) on logits; ce: next-token cross-entropy; mix: both", OPTIM, choices=LOSSES
        ),
    )
    kl_weight: float = field(default=0.5, metadata=_opt("--loss mix: weight of the KL term", OPTIM))
    seed: int = field(default=0, metadata=_opt("random seed: data order, data-free text", OPTIM, show_default=True))
    dtype: str = field(
        default="auto",
        metadata=_opt("autocast: auto = bf16 on GPUs that support it, fp32 on CPU", OPTIM, choices=DTYPES),
    )
    fsdp: bool = field(default=False, metadata=_opt("shard the model over processes (torchrun) with FSDP", OPTIM))
    compile: bool = field(
        default=False,
        metadata=_opt("torch.compile the fake-quant of each layer (~3x faster quantizers, less memory)", OPTIM),
    )
    first_token: str = field(
        default="random",
        metadata=_opt(
            "first token of each sequence: uniform over the vocabulary, or the BOS token",
            GENERATION,
            choices=FIRST_TOKENS,
        ),
    )
    greedy_tokens: int = field(default=3, metadata=_opt("tokens after the first chosen greedily (LLM-QAT)", GENERATION))
    gen_batch: int = field(default=16, metadata=_positive("sequences generated at once", GENERATION))
    save_every: int = field(default=50, metadata=_positive("checkpoint every N steps (and at the end)", RUN))
    log_every: int = field(default=1, metadata=_positive("metrics.jsonl line every N steps", RUN))
    keep_checkpoint: bool = field(default=False, metadata=_opt("keep checkpoint.pt after the run finishes", RUN))
    eval_every: int | None = field(
        default=None,
        metadata=_positive("also score the student every N steps (and at the end) on --eval-text: KL to the teacher "
                           "per token, perplexity, top-1, one line per score in eval.jsonl (the held-out curve)", RUN),
    )
    eval_text: str = field(default="wiki-eval", metadata=_opt("held-out text of --eval-every (a name or a file)", RUN))
    eval_every_tokens: int = field(
        default=4096, metadata=_positive("tokens of --eval-text scored each time (in windows of --seq-len, at most 512)", RUN)
    )

    def __post_init__(self):
        if isinstance(self.quant, dict):
            self.quant = QuantConfig.from_dict(self.quant)
        if not isinstance(self.quant, QuantConfig):
            raise LowbitError(f"quant must be a QuantConfig (or a dict of its fields), got {type(self.quant).__name__}")
        if self.quant.rotate:
            raise LowbitError(
                "lowbit train does not rotate the model itself: run lowbit quantize --rotate first and pass "
                "that folder as --init"
            )
        if self.lr is None:
            self.lr = default_lr(self.quant.bits)
        if self.scale_lr is None:
            self.scale_lr = self.lr
        self.validate()

    def validate(self) -> None:
        for name in POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LowbitError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise LowbitError("seq-len must be at least 2 tokens (one to read, one to predict)")
        if not 0 <= self.warmup < self.steps:
            raise LowbitError(f"warmup must be in [0, steps) = [0, {self.steps}), got {self.warmup}")
        if self.loss not in LOSSES:
            raise LowbitError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.schedule not in SCHEDULES:
            raise LowbitError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise LowbitError(f"kl-weight must be in [0, 1], got {self.kl_weight}")
        for name in ("lr", "scale_lr", "weight_decay", "grad_clip", "kl_weight"):
            if not math.isfinite(getattr(self, name)):
                raise LowbitError(f"{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.scale_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise LowbitError("lr must be > 0; scale-lr, weight-decay and grad-clip >= 0")
        if self.greedy_tokens < 0:
            raise LowbitError(f"greedy-tokens must be >= 0, got {self.greedy_tokens}")
        if self.train_params not in ("all", "scales"):
            raise LowbitError(f"train-params must be all or scales, not {self.train_params!r}")
        if self.train_params == "scales" and self.scale_lr == 0:
            raise LowbitError("train-params scales with scale-lr 0 trains nothing: give --scale-lr > 0")
        if self.dtype not in DTYPES:
            raise LowbitError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.first_token not in FIRST_TOKENS:
            raise LowbitError(f"first-token must be one of {', '.join(FIRST_TOKENS)}, not {self.first_token!r}")
        if self.quant.scale_search not in ("none", "mse"):
            raise LowbitError(f"unknown scale search {self.quant.scale_search!r}: use 'none' or 'mse'")
        if (self.data is None) == (self.data_free is None):
            raise LowbitError(
                "give training data: --data (wiki-train, a text file or a .pt token tensor) or "
                "--data-free N_TOKENS (the teacher writes the text), not both and not neither"
            )
        if self.data_free is not None and self.data_free < self.seq_len:
            raise LowbitError(f"--data-free {self.data_free} is less than one window of seq-len {self.seq_len} tokens")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise LowbitError(f"eval-every must be a positive number of steps, got {self.eval_every!r}")
        if self.eval_every is not None and self.fsdp:
            raise LowbitError("--eval-every scores the whole student on one process, which --fsdp shards: drop one")
        if self.init not in INITS and not is_quantized_dir(self.init):
            raise LowbitError(f"--init must be rtn, gptq or a lowbit quantized folder, got {self.init!r}")

    @property
    def bits(self) -> float:
        """The default bit-width of ``quant`` (overrides may give some layers others)."""
        return self.quant.bits

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        """Plain JSON-ready fields; ``quant`` as the dict ``QuantConfig.to_dict`` gives."""
        return asdict(self)


def config_differences(saved: dict, wanted: dict, prefix: str = "") -> dict[str, tuple]:
    """``{name: (saved value, wanted value)}`` for the settings that differ (nested dicts by key,
    as ``quant.bits``), leaving out :data:`RESUME_MAY_CHANGE`."""
    diff = {}
    for key in dict.fromkeys([*wanted, *saved]):
        if key in RESUME_MAY_CHANGE:
            continue
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            diff.update(config_differences(a, b, f"{key}."))
        elif a != b:
            diff[prefix + key] = (a, b)
    return diff
