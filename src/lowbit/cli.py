"""``lowbit`` command line: quantize, eval, info (and the commands later issues add).

Every error a user can cause is a :class:`LowbitError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from lowbit.errors import LowbitError

# Each module defines register(subparsers) adding one command whose func returns a dict (or None).
COMMAND_MODULES: list[str] = ["lowbit.commands.pareto", "lowbit.commands.train", "lowbit.commands.export", "lowbit.commands.runtime"]


def _group_size(text: str) -> int | None:
    if text in ("none", "channel", "per-channel", "0"):
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'channel', got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer, got {value}")
    return value


def _override(text: str) -> tuple[str, dict]:
    """PATTERN=BITS[:GROUP] -> (pattern, spec)."""
    pattern, sep, value = text.partition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"override must look like 'model.layers.0.*=8' or 'PATTERN=4:64', got {text!r}")
    bits, _, group = value.partition(":")
    spec: dict = {"bits": bits}
    if group:
        spec["group_size"] = _group_size(group)
    return pattern, spec


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


def _quant_config(args) -> QuantConfig:  # noqa: F821
    from lowbit.surgery import QuantConfig

    base = {}
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LowbitError(f"cannot read config {args.config}: {exc}") from exc
    fields = {
        "bits": args.bits if args.bits is not None else base.get("bits"),
        "quantizer": args.quantizer or base.get("quantizer", "auto"),
        "group_size": args.group_size if args.group_size is not None else base.get("group_size"),
        "quantize_embeddings": args.quantize_embeddings or base.get("quantize_embeddings", False),
        "overrides": {**base.get("overrides", {}), **dict(args.override or [])},
        "scale_search": args.scale_search or base.get("scale_search", "mse"),
        "hp_dtype": base.get("hp_dtype", "float16"),
    }
    if args.include:
        fields["include"] = args.include
    elif "include" in base:
        fields["include"] = base["include"]
    if args.exclude or "exclude" in base:
        fields["exclude"] = args.exclude or base["exclude"]
    if fields["bits"] is None:
        raise LowbitError("--bits is required (1, 1.58/ternary, 2, 3, 4 or 8)")
    return QuantConfig(**fields)


def cmd_quantize(args) -> dict:
    from lowbit.api import quantize_to_dir

    config = _quant_config(args)
    kwargs = {}
    if args.method == "gptq":
        kwargs = {
            "calib": args.calib,
            "calib_tokens": args.calib_tokens,
            "seq_len": args.seq_len,
            "act_order": args.act_order,
            "damp": args.damp,
        }
    return quantize_to_dir(args.model, args.out, config, method=args.method, progress=not args.json, **kwargs)


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
    from lowbit.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="lowbit", description="Extremely low-bit quantization of causal LMs.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="post-training quantization (RTN or GPTQ) to a model folder")
    q.add_argument("--model", default=DEFAULT_MODEL, help=f"default name ({DEFAULT_MODEL}), HF folder or .gguf")
    q.add_argument("--bits", help="1, 1.58 (or ternary), 2, 3, 4 or 8")
    q.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    q.add_argument("--group-size", type=_group_size, default=None, help="inputs per scale (default: per channel)")
    q.add_argument("--quantizer", default=None, help="auto (ParetoQ family), binary, seq, lsq, absmean, minmax, absmax")
    q.add_argument("--scale-search", choices=("mse", "none"), default=None, help="MSE clip search for scales (default mse)")
    q.add_argument("--calib", default="wiki-calib", help="calibration text: wiki-calib, news or a text file")
    q.add_argument("--calib-tokens", type=int, default=16384)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ: diagonal damping, fraction of mean diag(H)")
    q.add_argument("--quantize-embeddings", action="store_true", help="also quantize embedding and output head")
    q.add_argument("--include", nargs="+", help="module name patterns to quantize (default all linears)")
    q.add_argument("--exclude", nargs="+", help="module name patterns to keep in high precision")
    q.add_argument("--override", type=_override, action="append", help="PATTERN=BITS[:GROUP], repeatable")
    q.add_argument("--config", help="JSON file with QuantConfig fields (flags win)")
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
