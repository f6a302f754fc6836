"""``lowbit train``: quantization-aware training (ParetoQ + LLM-QAT distillation) to a model folder.

Runs alone or under ``torchrun --nproc-per-node N -m lowbit.cli train ...`` (DDP, or FSDP with
``--fsdp``). ``--resume`` continues a killed run exactly; the finished folder is loadable by
``lowbit eval --model DIR``. The options come from the fields of :class:`~lowbit.train.TrainConfig`
(its own, grouped by their metadata) and of :class:`~lowbit.quant.surgery.QuantConfig` (the same
quantization options as ``lowbit quantize``, mixed precision included).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lowbit.train import TrainConfig

SIZE_KEYS = (
    "total_bytes",
    "bits_per_weight",
    "bits_per_weight_linear",
    "linear_bytes",
    "other_bytes",
    "params",
    "linear_params",
)
REQUIRED = ("steps", "out")  # and --bits, unless --init is a quantized folder (its settings are the default)


def register(subparsers) -> None:
    from lowbit.options import add_options, parse_positive_int
    from lowbit.quant.surgery import ROTATION_FIELDS, QuantConfig
    from lowbit.train.config import DATA, GENERATION, OPTIM, QUANT, RUN, TrainConfig

    t = subparsers.add_parser(
        "train",
        help="quantization-aware training (ParetoQ quantizers, distillation from the full-precision model)",
        description="Quantization-aware training: the full-precision --model is the teacher and the starting point.",
    )
    by_group: dict[str | None, list[str]] = {}
    for f in dataclasses.fields(TrainConfig):
        by_group.setdefault(f.metadata.get("group"), []).append(f.name)
    add_options(t, TrainConfig, only=by_group[None], required=REQUIRED)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    groups = {name: t.add_argument_group(name) for name in (DATA, QUANT, OPTIM, GENERATION, RUN)}
    add_options(groups[DATA], TrainConfig, only=by_group[DATA], required=REQUIRED)
    add_options(groups[QUANT], QuantConfig, skip=ROTATION_FIELDS, required=REQUIRED)  # rotate: quantize, then --init
    for name in (QUANT, OPTIM, GENERATION, RUN):
        add_options(groups[name], TrainConfig, only=by_group[name], required=REQUIRED)
    r = groups[RUN]
    r.add_argument("--eval-data", default=None, help="evaluate the result on this held-out text (e.g. wiki-eval)")
    r.add_argument("--eval-tokens", type=parse_positive_int, default=16384)
    r.add_argument("--eval-seq-len", type=parse_positive_int, default=512)
    r.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_train)


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of the parsed flags: QuantConfig's options become its ``quant``; flags not
    given take the dataclass defaults."""
    from lowbit.cli.main import quant_config_from_args
    from lowbit.errors import LowbitError
    from lowbit.options import given_options, options_from_args
    from lowbit.quant.surgery import ROTATION_FIELDS
    from lowbit.store.folder import is_quantized_dir, read_meta
    from lowbit.train import TrainConfig

    stray = given_options(TrainConfig, args, only=("calib", "calib_tokens", "calib_seq_len"))
    if stray and args.init != "gptq":
        raise LowbitError(f"{', '.join(stray)} only applies to --init gptq: drop it or add --init gptq")
    if args.init is not None and is_quantized_dir(args.init):  # the folder's settings, mixed precision included
        args.quant_base = {k: v for k, v in read_meta(args.init)["quant_config"].items() if k not in ROTATION_FIELDS}
    elif getattr(args, "bits", None) is None:
        raise LowbitError("--bits is required (1, 1.58/ternary, 2, 3, 4 or 8), unless --init is a quantized folder")
    return TrainConfig(quant=quant_config_from_args(args), **options_from_args(TrainConfig, args))


def cmd_train(args) -> dict | None:
    from pathlib import Path

    from lowbit.train import run, write_result

    cfg = config_from_args(args)
    result = run(cfg, resume=args.resume, progress=not args.json)
    if "rank" in result.result:  # not rank 0 of a torchrun job: rank 0 reports
        return None
    out = dict(result.result)
    if args.eval_data:
        from lowbit.api import eval_model
        from lowbit.eval.models import check_seq_len
        from lowbit.store.folder import load_quantized
        from lowbit.train import load_teacher

        model, teacher, tokenizer = result.model, result.teacher, result.tokenizer
        if model is None:  # the run had already finished: evaluate the saved folder
            model, tokenizer, _ = load_quantized(cfg.out)
            teacher = load_teacher(cfg.model)[0]
        check_seq_len(model, args.eval_seq_len, "--eval-seq-len")
        metrics = eval_model(model, tokenizer, data=args.eval_data, reference=teacher, seq_len=args.eval_seq_len,
                             max_tokens=args.eval_tokens, progress=not args.json)
        out.update({k if k in SIZE_KEYS else f"eval_{k}": v for k, v in metrics.items()})
        write_result(Path(cfg.out), out)
    return out
