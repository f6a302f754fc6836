"""``lowbit export``: write a quantized folder in another runtime's format (GGUF for llama.cpp)."""

from __future__ import annotations

HELP = "export a quantized folder to GGUF for llama.cpp (Llama models)"
DESCRIPTION = (
    "Write a lowbit quantized folder of a Llama model as a GGUF file. Quantized codes go straight "
    "into Q4_0 / Q6_K / Q8_0 / TQ2_0 / TQ1_0 blocks where lowbit's grid is exactly representable there "
    "(checked per tensor, then verified by dequantizing the written file); other quantized tensors "
    "fall back to --fallback and their error is reported. Sizes are the bytes actually written."
)


def register(subparsers) -> None:
    from lowbit.cli.main import OVERWRITE_HELP
    from lowbit.gguf import FALLBACK_TYPES, TERNARY_TYPES

    p = subparsers.add_parser("export", help=HELP, description=DESCRIPTION)
    p.add_argument("model", help="lowbit quantized folder (lowbit quantize --out DIR)")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="output format (gguf)")
    p.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument(
        "--fallback",
        choices=FALLBACK_TYPES,
        default="f16",
        help="type for quantized tensors with no exact GGUF type (default f16; f32 is always exact; q8_0 re-quantizes)",
    )
    p.add_argument(
        "--ternary",
        choices=TERNARY_TYPES,
        default="tq2_0",
        help="GGUF type for ternary tensors with 256-multiple rows (tq2_0: 2.06 bpw, faster; tq1_0: 1.69 bpw)",
    )
    p.add_argument(
        "--tokenizer-pre",
        default="auto",
        help="llama.cpp pre-tokenizer name (default auto: detected from tokenizer.json, else 'default')",
    )
    p.add_argument("--json", action="store_true", help="print the full report (every tensor) as JSON")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> dict:
    from lowbit.cli.main import overwrite_kwargs
    from lowbit.gguf import export_gguf

    result = export_gguf(args.model, args.out, args.fallback, args.ternary, args.tokenizer_pre, **overwrite_kwargs(args))
    if args.json:
        return result
    tensors = result.pop("tensors")
    for t in tensors:
        if t["lowbit"] is not None and t["reason"]:
            print(
                f"{t['name']:<28} {t['type']:<6} {t['bytes']:>10} B  max|err| {t['max_abs_error']:.3g}  ({t['reason']})"
            )
    if any(t["reason"] for t in tensors):
        print()
    return result
