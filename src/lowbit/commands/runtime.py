"""``lowbit generate`` and ``lowbit bench``: run a quantized folder on its packed weights."""

from __future__ import annotations


def cmd_generate(args) -> dict | None:
    from lowbit.runtime import generate, load_packed

    model, tokenizer, _ = load_packed(args.model)
    if tokenizer is None:
        from lowbit.errors import LowbitError

        raise LowbitError(f"{args.model} has no tokenizer files: quantize from a model folder that has one")
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, greedy=not args.sample, stream=not args.json)
    return {"model": args.model, "prompt": args.prompt, "text": text} if args.json else None


def cmd_bench(args) -> dict:
    from lowbit.runtime import bench

    return bench(args.model, reference=args.reference, prompt_tokens=args.prompt_tokens,
                 new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads)


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="stream text from a quantized folder, running on packed weights")
    g.add_argument("--model", required=True, help="folder written by lowbit quantize / train")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    b = subparsers.add_parser("bench", help="prefill/decode tokens/s and resident memory vs the fp32 reference")
    b.add_argument("--model", required=True, help="folder written by lowbit quantize / train")
    b.add_argument("--reference", default=None, help="fp32 model to compare with (default: the folder's base model)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=2)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
