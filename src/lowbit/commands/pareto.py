"""``lowbit pareto``: sweep bit-widths x methods x granularities, store every point, report the frontier."""

from __future__ import annotations

import json
from pathlib import Path

from lowbit.errors import LowbitError

# Flag name -> SweepSpec field; flags given on the command line win over the --config file.
_FLAG_FIELDS = {
    "model": "models",
    "bits": "bits",
    "methods": "methods",
    "group_sizes": "group_sizes",
    "data": "data",
    "calib": "calib",
    "eval_tokens": "max_tokens",
    "calib_tokens": "calib_tokens",
    "qat_steps": "qat_steps",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "seed": "seed",
}


def register(subparsers) -> None:
    from lowbit.options import parse_group_size as _group_size
    from lowbit.models import DEFAULT_MODEL
    from lowbit.pareto import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS

    p = subparsers.add_parser(
        "pareto",
        help="sweep bits x methods x group sizes; store every point; report the size-quality frontier",
        description=(
            "Quantize each model at every bit-width x method x granularity, measure size, KL to the "
            "full-precision model, top-1 agreement and perplexity on one eval text, append each finished "
            "point to OUT/results.jsonl (a re-run skips stored points) and write OUT/report.html, "
            "OUT/pareto.png and OUT/results.md."
        ),
    )
    p.add_argument("--config", help="JSON file with sweep settings (SweepSpec fields); flags win")
    p.add_argument("--model", nargs="+", default=None, help=f"models to sweep (default {DEFAULT_MODEL})")
    p.add_argument("--bits", nargs="+", default=None, help="bit-widths (default 4 3 2)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=("rtn", "gptq", "qat"),
        default=None,
        help="default rtn gptq; qat runs only with --qat-steps N > 0",
    )
    p.add_argument(
        "--group-sizes",
        nargs="+",
        type=_group_size,
        default=None,
        help="'channel' and/or group sizes (default channel 128)",
    )
    p.add_argument("--data", default=None, help="eval text: wiki-eval (default), news or a text file")
    p.add_argument("--calib", default=None, help="GPTQ calibration text: wiki-calib (default), news or a text file")
    p.add_argument(
        "--max-tokens",
        dest="eval_tokens",
        metavar="N",
        type=int,
        default=None,
        help=f"eval tokens (default {DEFAULT_EVAL_TOKENS}; 0: the whole text)",
    )
    p.add_argument(
        "--calib-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"GPTQ calibration tokens (default {DEFAULT_CALIB_TOKENS})",
    )
    p.add_argument(
        "--qat-steps", type=int, default=None, metavar="N", help="QAT training steps; QAT points run only when > 0"
    )
    p.add_argument("--seq-len", type=int, default=None, help="window length for eval and calibration (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="eval batch size (default 4)")
    p.add_argument("--seed", type=int, default=None, help="torch seed set before every point (default 0)")
    p.add_argument("--out", required=True, help="output folder (results.jsonl, report.html, pareto.png, results.md)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bars)")
    p.set_defaults(func=cmd_pareto)


def sweep_spec(args):
    """The SweepSpec from ``--config`` (if any) overlaid with the flags that were given."""
    from lowbit.pareto import SweepSpec

    settings: dict = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LowbitError(f"cannot read sweep config {args.config}: {exc}") from exc
        if not isinstance(settings, dict):
            raise LowbitError(f"sweep config {args.config} must hold a JSON object of SweepSpec fields")
    for flag, name in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[name] = value
    if settings.get("max_tokens") == 0:
        settings["max_tokens"] = None
    return SweepSpec.from_dict(settings)


def cmd_pareto(args) -> dict:
    from lowbit.pareto import run_sweep

    result = run_sweep(sweep_spec(args), args.out, progress=not args.json)
    if not args.json:
        for line in result.pop("summary"):
            print(line)
        print()
    return result
