"""``lowbit generate`` and ``lowbit bench``: run a quantized folder on its packed weights."""

from __future__ import annotations


def cmd_generate(args) -> dict | None:
    from lowbit.runtime.packed import generate, load_packed

    model, tokenizer, _ = load_packed(args.model, activations=args.activations, ternary_layout=args.ternary_layout)
    if tokenizer is None:
        from lowbit.errors import LowbitError

        raise LowbitError(f"{args.model} has no tokenizer files: quantize from a model folder that has one")
    engine = args.engine if args.engine != "auto" or not args.sample else "transformers"
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, greedy=not args.sample, stream=not args.json,
                    engine=engine)
    return {"model": args.model, "prompt": args.prompt, "text": text} if args.json else None


def cmd_bench(args) -> dict:
    from lowbit.runtime.packed import bench

    return bench(args.model, reference=args.reference, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
                 activations=args.activations, ternary_layout=args.ternary_layout, engine=args.engine)


ACT_HELP = ("int8 (default): round layer inputs to int8 per 32 features and use integer dot products, "
            "as llama.cpp does; float: exact float32 matvec (slower)")


TERNARY_HELP = ("u2 (default): run ternary layers from 2-bit codes (fast int8 kernels, 25%% more memory than "
                "the file); t5: keep the file's 1.6-bit bytes (float kernels only)")


ENGINE_HELP = ("decode loop: lowbit (lean loop for Llama/Qwen2, greedy), transformers (model.generate / "
               "forward), auto (lowbit where it applies; transformers for --sample or other models)")


def register(subparsers) -> None:
    from lowbit.options import parse_positive_int

    g = subparsers.add_parser("generate", help="stream text from a quantized folder, running on packed weights")
    g.add_argument("--model", required=True, help="folder written by lowbit quantize / train")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=parse_positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--activations", choices=["int8", "float"], default="int8", help=ACT_HELP)
    g.add_argument("--ternary-layout", choices=["u2", "t5"], default="u2", help=TERNARY_HELP)
    g.add_argument("--engine", choices=["auto", "lowbit", "transformers"], default="auto", help=ENGINE_HELP)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = subparsers.add_parser("bench", help="prefill/decode tokens/s and resident memory vs the fp32 reference")
    b.add_argument("--model", required=True, help="folder written by lowbit quantize / train")
    b.add_argument("--reference", default=None, help="fp32 model to compare with (default: the folder's base model)")
    b.add_argument("--prompt-tokens", type=parse_positive_int, default=128, help="prompt length (default 128)")
    b.add_argument("--new-tokens", type=parse_positive_int, default=64, help="tokens decoded (default 64)")
    b.add_argument("--repeats", type=parse_positive_int, default=2, help="timed runs, best kept (default 2)")
    b.add_argument("--activations", choices=["int8", "float"], default="int8", help=ACT_HELP)
    b.add_argument("--ternary-layout", choices=["u2", "t5"], default="u2", help=TERNARY_HELP)
    b.add_argument("--engine", choices=["auto", "lowbit", "transformers"], default="auto", help=ENGINE_HELP)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
