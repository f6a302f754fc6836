"""``lowbit`` command line: quantize, eval, info here; train, pareto, export, generate and bench in commands/.

One error path: every error a user can cause, argparse's included, is printed as one line
``lowbit: error: ...`` naming the problem and its fix, with exit code 2; Ctrl-C at any point is
``lowbit: interrupted`` (130). An unexpected exception is one ``internal error`` line with exit
code 1 (``LOWBIT_DEBUG=1`` shows its traceback). Every number printed is finite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

from lowbit.errors import LowbitError
from lowbit.lazy import load_object
from lowbit.options import (
    add_options,
    given_options,
    known_fields,
    options_from_args,
    parse_count,
    parse_positive_int,
    read_json_config,
)

# Each module defines register(subparsers) adding one command whose func returns a dict (or None).
COMMAND_MODULES: list[str] = ["lowbit.cli.pareto", "lowbit.cli.train", "lowbit.cli.export", "lowbit.cli.runtime"]
OVERWRITE_HELP = "replace a previous lowbit output at --out"


class UsageError(LowbitError):
    """A command line argparse refused."""


class Parser(argparse.ArgumentParser):
    """argparse with lowbit's one error line instead of the usage block (subcommands inherit it)."""

    def error(self, message: str):
        command = self.prog.removeprefix("lowbit").strip()
        where = f"lowbit {command} " if command else "lowbit "
        raise UsageError(f"{command + ': ' if command else ''}{message} (see {where}--help)")


def non_finite(value, path: str = "") -> list[str]:
    """The paths (``a.b[2]``) of the NaN / inf floats in a result (nested dicts and lists)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{path or 'value'} = {value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    return []


def _print(result: dict, as_json: bool) -> None:
    bad = non_finite(result)
    if bad:
        raise LowbitError(
            f"the result holds non-finite numbers ({', '.join(bad[:3])}): the model or its inputs produce "
            "NaN/inf; nothing was reported (check the model with lowbit eval, or retrain with a lower --lr)"
        )
    if as_json:
        print(json.dumps(result, indent=2, default=str, allow_nan=False))
        return
    width = max(len(k) for k in result)
    report = None
    for key, value in result.items():
        if isinstance(value, dict) and isinstance(value.get("stages"), list):  # a pipeline's report (auto)
            report, value = value, "per stage below (whole report: --json, or the folder's lowbit.json)"
        elif isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str, allow_nan=False)
        print(f"{key:<{width}}  {value}")
    if report is not None:
        print(f"{'stage':<12}{'seconds':>10}{'tokens':>12}")
        for stage in report["stages"]:
            print(f"{stage.get('stage', '?'):<12}{stage.get('seconds', 0):>10.1f}{stage.get('tokens', 0):>12,}")
        for name, why in report.get("skipped", {}).items():
            print(f"{name:<12}{'skipped':>10}  {why}")


def overwrite_kwargs(args) -> dict:
    """``overwrite=True`` for a library call when ``--overwrite`` was given (nothing otherwise)."""
    return {"overwrite": True} if getattr(args, "overwrite", False) else {}


def quant_config_from_args(args, bits_planned: bool = False) -> QuantConfig:  # noqa: F821
    """The QuantConfig of ``--config FILE`` (if any) overlaid with the quantization flags given.
    ``bits_planned``: the method (a byte budget) chooses every layer's bits, so ``--bits`` is not needed."""
    from lowbit.quant.surgery import QuantConfig

    base = known_fields(QuantConfig, read_json_config(getattr(args, "config", None), "config"), "quantization")
    base = {**(getattr(args, "quant_base", None) or {}), **base}
    fields = options_from_args(QuantConfig, args, base)
    if fields.get("bits") is None:
        if not bits_planned:
            raise LowbitError("--bits is required (1, 1.58/ternary, 2, 3, 4, 6 or 8)")
        fields["bits"] = 4  # a placeholder: the plan overrides every layer (recorded in lowbit.json)
    return QuantConfig(**fields)


def cmd_quantize(args) -> dict:
    from lowbit.api import quantize_to_dir
    from lowbit.ptq.methods import make_method, method_class, method_names

    if args.method is None:  # a byte budget picks the auto pipeline, otherwise round-to-nearest
        budget = getattr(args, "budget_bpw", None) is not None or getattr(args, "budget_mb", None) is not None
        args.method = "auto" if budget else "rtn"
    chosen = method_class(args.method)
    own = {f.name for f in dataclasses.fields(chosen)}
    for other in method_names("post-training"):
        stray = given_options(method_class(other), args, skip=own) if other != args.method else []
        if stray:
            raise LowbitError(f"{', '.join(stray)} only applies to --method {other}: drop it or add --method {other}")
    method = make_method(chosen.name, **options_from_args(chosen, args))
    config = quant_config_from_args(args, bits_planned=getattr(chosen, "plans_bits", False))
    stream = {"on": True, "off": False}.get(getattr(args, "stream", "auto"))  # auto: wherever it gives the same folder
    if stream:
        from lowbit.ptq.streaming import check_streamable

        check_streamable(method, config)
    result = quantize_to_dir(args.model, args.out, config, method=method, progress=not args.json, stream=stream,
                             **overwrite_kwargs(args))
    return None if "rank" in result else result  # under torchrun, rank 0 reports


def cmd_eval(args) -> dict:
    from lowbit.api import eval_model, load, resolve_reference
    from lowbit.eval.data import get_text
    from lowbit.eval.models import check_seq_len

    get_text(args.data)  # a missing, empty or binary text fails before any model is loaded
    model, tokenizer, meta = load(args.model)
    check_seq_len(model, args.seq_len, "--seq-len")
    ref_spec, reference = args.reference, None
    if ref_spec is not None:
        reference = load(ref_spec)[0]
    elif meta is not None and not args.no_reference:
        ref_spec, reference = resolve_reference(meta)
    result = eval_model(model, tokenizer, data=args.data, reference=reference, seq_len=args.seq_len,
                        max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.json)
    return {"model": args.model, "reference": ref_spec, **result}


def cmd_info(args) -> dict:
    from lowbit.api import load
    from lowbit.eval.evaluation import size_account

    model, _, meta = load(args.model)
    out = {
        "model": args.model,
        "architecture": type(model).__name__,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "tied_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
        **size_account(model),
    }
    if meta is not None:
        out["quant_config"] = meta["quant_config"]
        out["info"] = meta["info"]
        out["lowbit_version"] = meta["lowbit_version"]
    return out


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.eval.models import DEFAULT_MODEL
    from lowbit.ptq.methods import method_class, method_names
    from lowbit.quant.surgery import QuantConfig

    parser = Parser(prog="lowbit", description="Extremely low-bit quantization of causal LMs.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--threads", type=parse_positive_int, default=None, help="torch threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="post-training quantization (RTN or GPTQ) to a model folder")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"default name ({DEFAULT_MODEL}), HF folder or .gguf")
    q.add_argument("--method", choices=method_names("post-training"), default=None,
                   help="rtn (the default without a budget), gptq, budget, blockap, or auto (the default with "
                   "--budget-bpw/--budget-mb: rotation where it applies, the plan with GPTQ, Block-AP and end-to-end step sizes in --time-budget)")
    add_options(q, QuantConfig)
    q.add_argument("--config", help="JSON file with QuantConfig fields (flags win)")
    seen = {f.name for f in dataclasses.fields(QuantConfig)}
    for name in method_names("post-training"):  # a field two methods share (--calib) is one option
        cls = method_class(name)
        add_options(q.add_argument_group(f"--method {name}"), cls, skip=seen)
        seen |= {f.name for f in dataclasses.fields(cls)}
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    streaming = q.add_mutually_exclusive_group()
    streaming.add_argument("--stream", dest="stream", action="store_const", const="on", default="auto",
                           help="quantize one decoder block at a time from the memory-mapped checkpoint (rtn, gptq, "
                           "budget --budget-bpw; the same folder, one block in memory); the default wherever it "
                           "writes the same folder as --no-stream; refused where it cannot")
    streaming.add_argument("--no-stream", dest="stream", action="store_const", const="off",
                           help="load the whole model in float32")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement vs a reference, and the size account")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--data", default="wiki-eval", help="wiki-eval, wiki-calib, news, or a UTF-8 text file")
    e.add_argument("--reference", default=None, help="reference model (default: a quantized folder's base model)")
    e.add_argument("--no-reference", action="store_true")
    e.add_argument("--seq-len", type=parse_positive_int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--max-tokens", type=parse_count, default=16384, help="evaluate at most this many tokens (0: all)")
    e.add_argument("--batch-size", type=parse_positive_int, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="architecture, parameters and size account of a model")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    for module in COMMAND_MODULES:
        load_object(f"{module}:register")(sub)
    return parser


def _run(argv: list[str] | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; keep stderr for errors
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "max_tokens", None) == 0:
        args.max_tokens = None
    result = args.func(args)
    if result is not None:
        _print(result, getattr(args, "json", False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0, 2 (a user error, one line on stderr), 130 (Ctrl-C) or
    1 (an internal error: a bug, reported on one line; ``LOWBIT_DEBUG=1`` re-raises it)."""
    try:
        return _run(argv)
    except LowbitError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"lowbit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a path the user named that cannot be read or written
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"lowbit: error: {exc.strerror or exc}{where} (check the path and its permissions)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last resort: one line instead of a traceback
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        message = " ".join(str(exc).split())[:300]
        print(
            f"lowbit: error: internal error: {type(exc).__name__}: {message} "
            "(please report; rerun with LOWBIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
