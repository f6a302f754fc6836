"""``lowbit train``: quantization-aware training (ParetoQ + LLM-QAT distillation) to a model folder.

Runs alone or under ``torchrun --nproc-per-node N -m lowbit.cli train ...`` (DDP, or FSDP with
``--fsdp``). ``--resume`` continues a killed run exactly; the finished folder is loadable by
``lowbit eval --model DIR``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowbit.qat import TrainConfig

SIZE_KEYS = (
    "total_bytes",
    "bits_per_weight",
    "bits_per_weight_linear",
    "linear_bytes",
    "other_bytes",
    "params",
    "linear_params",
)


def _positive_int(text: str) -> int:
    """A positive integer, also written as 1e5."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(value)


def register(subparsers) -> None:
    from lowbit.options import parse_group_size as _group_size
    from lowbit.models import DEFAULT_MODEL

    t = subparsers.add_parser(
        "train",
        help="quantization-aware training (ParetoQ quantizers, distillation from the full-precision model)",
        description="Quantization-aware training: the full-precision --model is the teacher and the starting point.",
    )
    t.add_argument("--model", default=DEFAULT_MODEL, help=f"full-precision model: {DEFAULT_MODEL}, HF folder or .gguf")
    t.add_argument("--bits", required=True, help="1, 1.58 (or ternary), 2, 3, 4 or 8")
    src = t.add_argument_group("training data (one of)")
    src.add_argument("--data", help="text to train on: wiki-train, news, a UTF-8 text file or a .pt token tensor")
    src.add_argument(
        "--data-free",
        type=_positive_int,
        metavar="N_TOKENS",
        help="the teacher writes N_TOKENS of training text (LLM-QAT), cached and reused",
    )
    t.add_argument("--data-tokens", type=_positive_int, default=None, help="read at most this many tokens of --data")
    t.add_argument("--steps", type=_positive_int, required=True, help="optimizer steps")
    t.add_argument("--out", required=True, help="run folder: checkpoints, metrics, then the quantized model")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    q = t.add_argument_group("quantization")
    q.add_argument("--group-size", type=_group_size, default=None, help="inputs per scale (default: per channel)")
    q.add_argument("--quantizer", default="auto", help="auto (ParetoQ: binary / SEQ / LSQ) or a quantizer name")
    q.add_argument(
        "--scale-search",
        choices=("mse", "none"),
        default="mse",
        help="initial scales: MSE clip search, or none (the ParetoQ paper's init)",
    )
    q.add_argument(
        "--init",
        default="rtn",
        help="rtn (scales from the weights), gptq (GPTQ on --calib first) or a lowbit quantized folder",
    )
    q.add_argument("--calib", default="wiki-calib", help="--init gptq: calibration text")
    q.add_argument("--calib-tokens", type=_positive_int, default=16384)

    o = t.add_argument_group("optimization")
    o.add_argument("--lr", type=float, default=None, help="weight lr (default 2e-5 at <=2 bits, 1e-5 at 3-4 bits)")
    o.add_argument("--scale-lr", type=float, default=None, help="lr of the quantizer scales (default: --lr)")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per micro-step, over all processes")
    o.add_argument("--seq-len", type=_positive_int, default=256)
    o.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-steps per optimizer step")
    o.add_argument("--warmup", type=int, default=0, help="linear warm-up steps before the cosine decay")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    o.add_argument(
        "--loss",
        choices=("kl", "ce", "mix"),
        default="kl",
        help="kl: KL(teacher||student) on logits; ce: next-token cross-entropy; mix: both",
    )
    o.add_argument("--kl-weight", type=float, default=0.5, help="--loss mix: weight of the KL term")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast: auto = bf16 on GPUs that support it, fp32 on CPU",
    )
    o.add_argument("--fsdp", action="store_true", help="shard the model over processes (torchrun) with FSDP")
    o.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the fake-quant of each layer (~3x faster quantizers, less memory)",
    )

    g = t.add_argument_group("data-free generation")
    g.add_argument(
        "--first-token",
        choices=("random", "bos"),
        default="random",
        help="first token of each sequence: uniform over the vocabulary, or the BOS token",
    )
    g.add_argument("--greedy-tokens", type=int, default=3, help="tokens after the first chosen greedily (LLM-QAT)")
    g.add_argument("--gen-batch", type=_positive_int, default=16, help="sequences generated at once")

    r = t.add_argument_group("run")
    r.add_argument("--save-every", type=_positive_int, default=50, help="checkpoint every N steps (and at the end)")
    r.add_argument("--log-every", type=_positive_int, default=1, help="metrics.jsonl line every N steps")
    r.add_argument("--keep-checkpoint", action="store_true", help="keep checkpoint.pt after the run finishes")
    r.add_argument("--eval-data", default=None, help="evaluate the result on this held-out text (e.g. wiki-eval)")
    r.add_argument("--eval-tokens", type=_positive_int, default=16384)
    r.add_argument("--eval-seq-len", type=_positive_int, default=512)
    r.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)


def config_from_args(args) -> TrainConfig:
    from lowbit.qat import TrainConfig

    return TrainConfig(
        out=args.out,
        bits=args.bits,
        steps=args.steps,
        model=args.model,
        data=args.data,
        data_free=args.data_free,
        data_tokens=args.data_tokens,
        quantizer=args.quantizer,
        group_size=args.group_size,
        scale_search=args.scale_search,
        init=args.init,
        calib=args.calib,
        calib_tokens=args.calib_tokens,
        lr=args.lr,
        scale_lr=args.scale_lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        grad_clip=args.grad_clip,
        loss=args.loss,
        kl_weight=args.kl_weight,
        seed=args.seed,
        dtype=args.dtype,
        fsdp=args.fsdp,
        compile=args.compile,
        first_token=args.first_token,
        greedy_tokens=args.greedy_tokens,
        gen_batch=args.gen_batch,
        save_every=args.save_every,
        log_every=args.log_every,
        keep_checkpoint=args.keep_checkpoint,
    )


def cmd_train(args) -> dict | None:
    from pathlib import Path

    from lowbit.qat import run, write_result

    cfg = config_from_args(args)
    result = run(cfg, resume=args.resume, progress=not args.json)
    if "rank" in result.result:  # not rank 0 of a torchrun job: rank 0 reports
        return None
    out = dict(result.result)
    if args.eval_data:
        from lowbit.api import eval_model
        from lowbit.io import load_quantized
        from lowbit.qat import load_teacher

        model, teacher, tokenizer = result.model, result.teacher, result.tokenizer
        if model is None:  # the run had already finished: evaluate the saved folder
            model, tokenizer, _ = load_quantized(cfg.out)
            teacher = load_teacher(cfg.model)[0]
        metrics = eval_model(
            model,
            tokenizer,
            data=args.eval_data,
            reference=teacher,
            seq_len=args.eval_seq_len,
            max_tokens=args.eval_tokens,
            progress=not args.json,
        )
        out.update({k if k in SIZE_KEYS else f"eval_{k}": v for k, v in metrics.items()})
        write_result(Path(cfg.out), out)
    return out
