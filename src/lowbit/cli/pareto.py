"""``lowbit pareto``: sweep methods (each over its own grid: bit-widths x granularities, or byte budgets)
and peer tools, store every point, report the frontier."""

from __future__ import annotations


def register(subparsers) -> None:
    from lowbit.options import add_options
    from lowbit.pareto import SweepSpec

    p = subparsers.add_parser(
        "pareto",
        help="sweep methods x bits x group sizes and byte budgets; store every point; report the size-quality frontier",
        description=(
            "Quantize each model with every method: RTN and GPTQ at every bit-width x granularity, the byte "
            "budget (auto) at every --budget-bpw, and the peers' own types (llama.cpp's by default where "
            "llama-cpp-python is installed); measure size, KL to the full-precision model, top-1 agreement and "
            "perplexity on one eval text, append each finished point to OUT/results.jsonl (a re-run skips "
            "stored points) and write OUT/report.html, OUT/pareto.png and OUT/results.md."
        ),
    )
    p.add_argument("--config", help="JSON file with sweep settings (SweepSpec fields); flags win")
    add_options(p, SweepSpec)
    p.add_argument("--out", required=True, help="output folder (results.jsonl, report.html, pareto.png, results.md)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bars)")
    p.set_defaults(func=cmd_pareto)


def sweep_spec(args):
    """The SweepSpec from ``--config`` (if any) overlaid with the flags that were given."""
    from lowbit.errors import LowbitError
    from lowbit.options import given_options, known_fields, options_from_args, read_json_config
    from lowbit.pareto import SweepSpec

    base = known_fields(SweepSpec, read_json_config(args.config, "sweep config"), "sweep")
    settings = options_from_args(SweepSpec, args, base)
    if settings.get("max_tokens") == 0:  # --max-tokens 0: the whole text
        settings["max_tokens"] = None
    spec = SweepSpec(**settings)
    stray = given_options(SweepSpec, args, only=("calib", "calib_tokens"))
    if stray and not spec.calibrated():
        raise LowbitError(
            f"{', '.join(stray)} only applies to GPTQ points and byte-budget points: add gptq or auto to --methods "
            "or drop it"
        )
    stray = given_options(SweepSpec, args, only=("budget_bpw",))
    if stray and "auto" not in spec.methods:
        raise LowbitError(f"{', '.join(stray)} only applies to byte-budget points: add auto to --methods or drop it")
    return spec


def cmd_pareto(args) -> dict:
    from lowbit.eval.data import get_text
    from lowbit.eval.models import check_model_spec
    from lowbit.pareto import run_sweep

    spec = sweep_spec(args)
    for model in spec.models:  # a missing model or text fails before --out is touched
        check_model_spec(model)
    for name in sorted(spec.text_names()):
        get_text(name)
    result = run_sweep(spec, args.out, progress=not args.json)
    if not args.json:
        for line in result.pop("summary"):
            print(line)
        print()
    return result
