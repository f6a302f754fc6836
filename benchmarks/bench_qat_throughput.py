"""QAT throughput vs plain full-precision fine-tuning of the same model, in the same run.

Three modes, each in its own fresh process (so that peak memory is its own), alternating over
repeats so that a busy machine hurts all of them alike:

- ``fp-ft``:  full-precision fine-tuning, next-token cross-entropy, AdamW (the reference);
- ``qat-ce``: the same loop with every linear fake-quantized (ParetoQ quantizer, learnable scales);
- ``qat-kl``: QAT as ``lowbit train`` runs it by default: plus the frozen teacher's forward and the KL.
- ``qat-ce-compiled`` / ``qat-kl-compiled``: the same with ``lowbit train --compile`` (fused fake-quant).

All use :func:`lowbit.train.optimize`, the loop ``lowbit train`` runs, on the same wiki-train windows.
Throughput is tokens / second over the timed steps (the first ``--warm`` steps are not timed);
peak memory is the process's ``ru_maxrss``. Target: qat-ce >= 0.7x fp-ft.

    python benchmarks/bench_qat_throughput.py --threads 1 --batch-size 4 --seq-len 128 --steps 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from lowbit.store.fsio import atomic_write

RESULTS = Path(__file__).parent / "results"
MODES = ("fp-ft", "qat-ce", "qat-kl", "qat-ce-compiled", "qat-kl-compiled")


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """One mode in this process: load, (quantize), train ``warm + steps`` steps; report."""
    import torch

    torch.set_num_threads(args.threads)
    from lowbit import train as qat
    from lowbit.eval.data import get_text, tokenize_windows
    from lowbit.eval.models import load_model
    from lowbit.quant.surgery import QuantConfig, quantize_model

    model, tokenizer = load_model(args.model)
    n_steps = args.warm + args.steps
    windows = tokenize_windows(
        tokenizer, get_text("wiki-train"), args.seq_len, max_tokens=n_steps * args.batch_size * args.seq_len
    )
    rss_loaded = maxrss_mib()
    teacher = None
    if args.mode != "fp-ft":
        if args.mode.startswith("qat-kl"):
            teacher = qat.load_teacher(args.model)[0]
        quantize_model(model, QuantConfig(bits=args.bits, scale_search="none"))
        if args.mode.endswith("compiled"):
            qat.compile_quantizers_(model)
    model.requires_grad_(True)
    cfg = qat.TrainConfig(
        out="",
        quant=QuantConfig(bits=args.bits),
        steps=n_steps,
        data="wiki-train",
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=1e-5,
        loss="kl" if args.mode.startswith("qat-kl") else "ce",
        grad_clip=1.0,
    )
    optimizer, scheduler = qat.make_optimizer(model, cfg)
    rows: list[dict] = []
    ctx = qat.DistContext()
    t0 = time.time()
    qat.optimize(cfg, ctx, model, model, teacher, windows, optimizer, scheduler, progress=False, on_log=rows.append)
    wall = time.time() - t0
    timed = rows[args.warm :]
    seconds = timed[-1]["elapsed"] - rows[args.warm - 1]["elapsed"] if args.warm else timed[-1]["elapsed"]
    tokens = len(timed) * args.batch_size * args.seq_len
    return {
        "mode": args.mode,
        "tokens_per_s": tokens / seconds,
        "step_seconds": [round(b["elapsed"] - a["elapsed"], 3) for a, b in zip(rows, rows[1:], strict=False)],
        "timed_tokens": tokens,
        "timed_seconds": round(seconds, 3),
        "wall_seconds": round(wall, 2),
        "maxrss_after_load_mib": round(rss_loaded, 1),
        "peak_rss_mib": round(maxrss_mib(), 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", default="2")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per mode")
    parser.add_argument("--warm", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", default=str(RESULTS / "qat_throughput"))
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return

    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        order = args.modes if rep % 2 == 0 else list(reversed(args.modes))
        for mode in order:
            cmd = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--model",
                args.model,
                "--bits",
                args.bits,
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
                "--warm",
                str(args.warm),
                "--threads",
                str(args.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(result)
            print(
                f"{mode:7s} rep {rep}: {result['tokens_per_s']:.1f} tok/s, peak {result['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    best = {m: max(r["tokens_per_s"] for r in rs) for m, rs in runs.items()}
    peak = {m: max(r["peak_rss_mib"] for r in rs) for m, rs in runs.items()}
    summary = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("mode", "out")},
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_end": list(__import__("os").getloadavg()),
        },
        "tokens_per_s_best": best,
        "peak_rss_mib": peak,
        "ratio_qat_ce_vs_fp": best.get("qat-ce", 0) / best["fp-ft"] if "fp-ft" in best else None,
        "ratio_qat_kl_vs_fp": best.get("qat-kl", 0) / best["fp-ft"] if "fp-ft" in best else None,
        "ratio_qat_ce_compiled_vs_fp": best.get("qat-ce-compiled", 0) / best["fp-ft"] if "fp-ft" in best else None,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), json.dumps(summary, indent=2))
    lines = [
        "# QAT throughput vs full-precision fine-tuning",
        "",
        f"Model `{args.model}`, {args.bits}-bit ParetoQ quantizer, batch {args.batch_size} x seq {args.seq_len} "
        f"= {args.batch_size * args.seq_len} tokens/step, {args.threads} thread(s), {args.steps} timed steps "
        f"after {args.warm} warm-up step(s), best of {args.repeats} repeat(s), each mode in a fresh process.",
        f"Machine: {summary['machine']['cpu_count']} cores, shared (load average at the end "
        f"{summary['machine']['load_avg_at_end'][0]:.1f}).",
        "",
        "| mode | what | tokens/s | vs fp-ft | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    what = {
        "fp-ft": "full-precision fine-tuning, CE",
        "qat-ce": "QAT (fake-quant + scales), CE",
        "qat-kl": "QAT + teacher forward, KL (lowbit train default)",
        "qat-ce-compiled": "qat-ce with the fake-quant torch.compiled (--compile)",
        "qat-kl-compiled": "qat-kl with the fake-quant torch.compiled (--compile)",
    }
    for m in args.modes:
        ratio = best[m] / best["fp-ft"] if "fp-ft" in best else float("nan")
        lines.append(f"| {m} | {what[m]} | {best[m]:.1f} | {ratio:.2f}x | {peak[m]:.0f} |")
    lines += ["", "Command: `python benchmarks/bench_qat_throughput.py " + " ".join(sys.argv[1:]) + "`", ""]
    atomic_write(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
