"""``lowbit`` command line: quantize, eval, info here; train, pareto, export, generate and bench in commands/.

Every error a user can cause is a :class:`LowbitError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from lowbit.errors import LowbitError
from lowbit.options import add_options, known_fields, options_from_args, read_json_config

# Each module defines register(subparsers) adding one command whose func returns a dict (or None).
COMMAND_MODULES: list[str] = ["lowbit.commands.pareto", "lowbit.commands.train", "lowbit.commands.export", "lowbit.commands.runtime"]


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        print(f"{key:<{width}}  {value}")


def quant_config_from_args(args) -> QuantConfig:  # noqa: F821
    """The QuantConfig of ``--config FILE`` (if any) overlaid with the quantization flags given."""
    from lowbit.surgery import QuantConfig

    base = known_fields(QuantConfig, read_json_config(args.config, "config"), "quantization")
    fields = options_from_args(QuantConfig, args, base)
    if fields.get("bits") is None:
        raise LowbitError("--bits is required (1, 1.58/ternary, 2, 3, 4 or 8)")
    return QuantConfig(**fields)


def cmd_quantize(args) -> dict:
    from lowbit.api import quantize_to_dir
    from lowbit.methods import make_method, method_class

    method = make_method(args.method, **options_from_args(method_class(args.method), args))
    config = quant_config_from_args(args)
    return quantize_to_dir(args.model, args.out, config, method=method, progress=not args.json)


def cmd_eval(args) -> dict:
    from lowbit.api import eval_model, load

    model, tokenizer, meta = load(args.model)
    ref_spec = args.reference
    if ref_spec is None and meta is not None and not args.no_reference:
        ref_spec = meta.get("info", {}).get("base_model")
    reference = load(ref_spec)[0] if ref_spec else None
    result = eval_model(
        model,
        tokenizer,
        data=args.data,
        reference=reference,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    return {"model": args.model, "reference": ref_spec, **result}


def cmd_info(args) -> dict:
    from lowbit.api import load
    from lowbit.evaluation import size_account

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
    from lowbit.methods import method_class, method_names
    from lowbit.models import DEFAULT_MODEL
    from lowbit.surgery import QuantConfig

    parser = argparse.ArgumentParser(prog="lowbit", description="Extremely low-bit quantization of causal LMs.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="post-training quantization (RTN or GPTQ) to a model folder")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"default name ({DEFAULT_MODEL}), HF folder or .gguf")
    q.add_argument("--method", choices=method_names("post-training"), default="rtn")
    add_options(q, QuantConfig)
    q.add_argument("--config", help="JSON file with QuantConfig fields (flags win)")
    for name in method_names("post-training"):
        add_options(q.add_argument_group(f"--method {name}"), method_class(name))
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement vs a reference, and the size account")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--data", default="wiki-eval", help="wiki-eval, wiki-calib, news, or a UTF-8 text file")
    e.add_argument("--reference", default=None, help="reference model (default: a quantized folder's base model)")
    e.add_argument("--no-reference", action="store_true")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=16384, help="evaluate at most this many tokens (0: all)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="architecture, parameters and size account of a model")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bars show progress; keep stderr for errors
        hf_logging.set_verbosity_error()

        if args.threads:
            torch.set_num_threads(args.threads)
        if getattr(args, "max_tokens", None) == 0:
            args.max_tokens = None
        result = args.func(args)
    except LowbitError as exc:
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        _print(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
