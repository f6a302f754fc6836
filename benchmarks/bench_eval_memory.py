"""Peak memory of ``lowbit eval --reference`` as the number of eval tokens grows.

The reference runs alongside the evaluated model batch by batch (``reference_mode``
"model-alongside"), so peak memory should not grow with the token count; a cache of the
reference's full-vocabulary log-probs would need ``tokens x vocab x 4`` bytes (12.8 GB for 100k
tokens and a 32k vocabulary).

Setup: a random Llama (``--hidden`` 256, ``--layers`` 4, tied embeddings) with the vocabulary of the
default model's tokenizer (smollm2-135m: 49,152 tokens; no 32k-vocabulary tokenizer is available
offline, and the larger vocabulary only makes the full cache bigger), saved as the reference; the
evaluated model is its 4-bit RTN copy. Text: wiki-train (~500k tokens), tokenized with that
tokenizer. Each token count is evaluated in its own fresh ``lowbit eval`` process; its peak RSS is
read both from the result's ``peak_memory_bytes`` and from ``getrusage(RUSAGE_CHILDREN)`` here.
A one-batch run (``--seq-len x --batch-size`` tokens) is the baseline: models, tokenizer, one batch.

    python benchmarks/bench_eval_memory.py                 # 100k tokens (the full benchmark)
    python benchmarks/bench_eval_memory.py --tokens 4096   # a quick check (results under *_check)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lowbit.store.fsio import atomic_write  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOP_K = 64


def build_models(work: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    """The random reference Llama (smollm2's tokenizer) and its 4-bit RTN copy; returns (ref, model, vocab)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.api import quantize_to_dir
    from lowbit.eval.models import DEFAULT_MODEL, cached_model_dir
    from lowbit.quant.surgery import QuantConfig

    tokenizer = AutoTokenizer.from_pretrained(cached_model_dir(DEFAULT_MODEL))
    vocab = len(tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    ref, model = work / "reference", work / "model-4bit"
    LlamaForCausalLM(cfg).save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    quantize_to_dir(str(ref), str(model), QuantConfig(bits=4, group_size=64), method="rtn", progress=False)
    return ref, model, vocab


def run_eval(ref: Path, model: Path, tokens: int, args) -> dict:
    """One ``lowbit eval --reference`` in a fresh process; its result plus the peak RSS seen from here."""
    cmd = [sys.executable, "-m", "lowbit.cli", "--threads", str(args.threads), "eval", "--model", str(model),
           "--reference", str(ref), "--data", "wiki-train", "--max-tokens", str(tokens), "--seq-len",
           str(args.seq_len), "--batch-size", str(args.batch_size), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lowbit eval failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout)
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return {
        "max_tokens": tokens,
        "tokens": result["tokens"],
        "windows": result["windows"],
        "peak_memory_bytes": result["peak_memory_bytes"],
        "peak_rss_children_bytes": child_peak,
        "reference_mode": result["reference_mode"],
        "kl_to_reference": result["kl_to_reference"],
        "perplexity": result["perplexity"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="eval tokens of the main run (default 100000)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="lowbit eval --batch-size (its default, 4)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="results stem (default results/eval_memory, or *_check "
                        "when --tokens is below 100000)")
    args = parser.parse_args()
    stem = Path(args.out) if args.out else RESULTS / ("eval_memory" if args.tokens >= 100_000 else "eval_memory_check")
    with tempfile.TemporaryDirectory(prefix="bench_eval_memory_") as tmp:
        ref, model, vocab = build_models(Path(tmp), args.hidden, args.layers)
        baseline_tokens = args.seq_len * args.batch_size
        runs = [run_eval(ref, model, n, args) for n in (baseline_tokens, args.tokens)]  # baseline first
    for run in runs:
        positions = run["tokens"]  # predicted positions: windows x (seq_len - 1)
        run["full_cache_bytes"] = positions * vocab * 4
        run[f"top{TOP_K}_cache_bytes"] = positions * (8 * TOP_K + 4)
    summary = {
        "benchmark": "lowbit eval --reference peak memory",
        "model": f"random Llama hidden {args.hidden}, {args.layers} layers, vocab {vocab} (smollm2-135m tokenizer), "
                 "tied embeddings; evaluated: its 4-bit RTN copy (group 64)",
        "data": "wiki-train",
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "runs": runs,
        "peak_growth_bytes": runs[1]["peak_memory_bytes"] - runs[0]["peak_memory_bytes"],
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(stem.with_suffix(".json"), json.dumps(summary, indent=2))
    atomic_write(stem.with_suffix(".md"), report(summary))
    print(report(summary))


def report(summary: dict) -> str:
    gib = 2**30
    lines = [
        "# `lowbit eval --reference`: peak memory vs eval tokens",
        "",
        f"{summary['model']}; data {summary['data']}, seq_len {summary['seq_len']}, batch size "
        f"{summary['batch_size']}, {summary['threads']} threads. Each row is a fresh process; the reference runs "
        "alongside, batch by batch. The last two columns are what a reference cache of those tokens would hold "
        f"(full float32 log-probs; top-{TOP_K} + tail mass).",
        "",
        f"| eval tokens | reference mode | peak RSS (GiB) | peak RSS seen by parent (GiB) | KL | full cache (GiB) "
        f"| top-{TOP_K} cache (GiB) | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['tokens']:,} | {r['reference_mode']} | {r['peak_memory_bytes'] / gib:.2f} | "
            f"{r['peak_rss_children_bytes'] / gib:.2f} | {r['kl_to_reference']:.4g} | {r['full_cache_bytes'] / gib:.2f} | "
            f"{r[f'top{TOP_K}_cache_bytes'] / gib:.3f} | {r['seconds']} |"
        )
    lines += ["", f"Peak growth from one batch to {summary['runs'][1]['tokens']:,} tokens: "
              f"{summary['peak_growth_bytes'] / 2**20:.0f} MiB.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
