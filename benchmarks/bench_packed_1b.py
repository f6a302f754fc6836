"""The packed runtime at size: decode speed and resident memory of a ~1.1 B model, beside llama.cpp.

    python benchmarks/bench_packed_1b.py                 # random 1.1 B Llama (TinyLlama shapes)
    python benchmarks/bench_packed_1b.py --tiny          # small shapes: checks the script works

The model is bench_streaming.py's random Llama (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000, bf16 shards; built there, reused here). Each setting is quantized with
``lowbit quantize --stream`` (RTN), then:

1. lowbit's packed runtime (``lowbit.runtime.packed.bench``: ``load_packed`` maps the file, lowbit's decode
   loop, int8 activations): decode tok/s after a ``--prompt-tokens`` prompt, best of ``--reps``; resident
   memory of a fresh process after loading and decoding (RSS growth, ``lowbit.runtime.resident``), against
   the bytes the folder stores;
2. ``lowbit export --format gguf`` of the same folder (every tensor exact: Q4_0 for 4-bit g32 and
   2-bit per-channel, TQ2_0 for ternary per-channel: 2048 and 5632 are multiples of 256), then
   llama.cpp (llama-cpp-python) on that file in a fresh process: the same prompt, one token per step,
   same thread count, best of ``--reps``; its RSS growth while loading and decoding.

llama.cpp runs with weight repacking on, as its users run it (on AMX CPUs its CPU_REPACK buffer for
Q4_0 / IQ4_NL / Q4_K tensors without the AMX buffer, whose matmul segfaults in llama-cpp-python 0.3.36;
``--repack off`` for its plain kernels); the mode used is recorded per row. Writes ``benchmarks/results/packed_1b.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_streaming import FULL, TINY, build_model  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402

SETTINGS = {  # name -> lowbit quantize arguments
    "q4g32": ["--bits", "4", "--group-size", "32", "--scale-search", "none"],
    "q2-ch": ["--bits", "2", "--scale-search", "none"],
    "ternary-ch": ["--bits", "ternary"],
    "ternary-ch-u2": ["--bits", "ternary", "--ternary-storage", "u2"],
}

LLAMACPP_CHILD = r"""
import json, sys, time
import numpy as np
from lowbit.peers.llamacpp import open_llamacpp
from lowbit.memory import proc_kib
path, threads, prompt_n, steps_n, reps, repack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
before = proc_kib("/proc/self/status", "VmRSS")
llm = open_llamacpp(path, n_ctx=prompt_n + steps_n + 8, n_threads=threads, logits_all=False, extra_bufts=repack)
vocab = llm.n_vocab()
rng = np.random.default_rng(0)
prompt = [int(x) for x in rng.integers(min(100, vocab - 1), min(1000, vocab), prompt_n)]
best_decode, best_prefill = 0.0, 0.0
for _ in range(reps + 1):  # the first run warms up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(steps_n):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    best_prefill, best_decode = max(best_prefill, prompt_n / (t1 - t0)), max(best_decode, steps_n / (t2 - t1))
after = proc_kib("/proc/self/status", "VmRSS")
print(json.dumps({"decode_tokens_per_s": best_decode, "prefill_tokens_per_s": best_prefill,
                  "resident_bytes": after - before, "repack": llm.lowbit_repack}))
"""


def quantize(model: Path, out: Path, args: list[str], threads: int) -> dict:
    if not (out / "lowbit.json").is_file():
        cmd = [sys.executable, "-m", "lowbit.cli", "--threads", str(threads), "quantize", "--model", str(model),
               "--method", "rtn", "--stream", *args, "--out", str(out), "--json"]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (out / "bench_quantize_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    meta = json.loads((out / "lowbit.json").read_text())
    return {"quantize_command": "lowbit quantize --model MODEL --method rtn --stream " + " ".join(args),
            "quantize_wall_s": float((out / "bench_quantize_seconds").read_text()) if (out / "bench_quantize_seconds").is_file() else None,
            "weights_bytes": meta.get("weights_bytes")}  # fmt: skip


def run_llamacpp(gguf: Path, threads: int, prompt: int, steps: int, reps: int, repack: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", LLAMACPP_CHILD, str(gguf), str(threads), str(prompt), str(steps), str(reps),
         "1" if repack else "0"], capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}", "repack": repack}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (checks the script; numbers mean nothing)")
    p.add_argument("--work", default=None, help="model and outputs (default benchmarks/work/streaming, shared "
                   "with bench_streaming.py)")  # fmt: skip
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--repack", choices=["on", "off"], default="on",
                   help="llama.cpp weight repacking (on: as its users run it; on AMX CPUs its CPU_REPACK buffer "
                        "without the AMX one, which crashes: lowbit.peers.llamacpp.repack_mode)")
    p.add_argument("--calib", default="wiki-calib", help="text the tokenizer of a newly built model is trained on")
    p.add_argument("--results", default=None, help="results path prefix (default benchmarks/results/packed_1b)")
    args = p.parse_args(argv)
    import torch

    from lowbit.gguf import export_gguf
    from lowbit.runtime.packed import bench

    work = Path(args.work or ROOT / "benchmarks" / "work" / ("streaming-tiny" if args.tiny else "streaming"))
    prefix = Path(args.results) if args.results else (work / "packed_1b" if args.tiny else ROOT / "benchmarks/results/packed_1b")
    model = work / ("llama-tiny-bf16" if args.tiny else "llama-1.1b-bf16")
    build_model(model, TINY if args.tiny else FULL, args.calib)
    repack = args.repack == "on"
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.settings:
        out = work / f"packed-{name}"
        row = {"setting": name, **quantize(model, out, SETTINGS[name], args.threads)}
        r = bench(str(out), reference="", prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                  repeats=args.reps, threads=args.threads)  # fmt: skip
        row["lowbit"] = {k: r.get(k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "resident_bytes",
                                               "resident_over_account", "size_account_bytes", "engine")}  # fmt: skip
        gguf = work / f"packed-{name}.gguf"
        report = export_gguf(out, gguf, overwrite=True)
        row["gguf_bytes"] = gguf.stat().st_size
        row["gguf_linear_types"] = report["linear_types"]
        row["gguf_fallback_tensors"] = report["quantized_fallback"]
        row["gguf_bits_per_weight_linear"] = report["bits_per_weight_linear"]
        row["llamacpp"] = run_llamacpp(gguf, args.threads, args.prompt_tokens, args.new_tokens, args.reps, repack)
        lc = row["llamacpp"].get("decode_tokens_per_s")
        row["decode_ratio"] = r["decode_tokens_per_s"] / lc if lc else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        gguf.unlink()  # GBs at full size; the export is reproducible from the folder
    results = {
        "model": model.name, "shapes": TINY if args.tiny else FULL, "threads": args.threads,
        "cpu": cpu_model(), "cpu_flags": cpu_flags(["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "command": "python benchmarks/bench_packed_1b.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "reps": args.reps, "rows": rows,
    }  # fmt: skip
    write_results(results, prefix)
    print(f"wrote {prefix.with_suffix('.json')} and .md")


def write_results(results: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    mb = 1e6
    lines = [
        f"# Packed runtime at size: {results['model']}",
        "",
        f"{results['cpu']} ({', '.join(results['cpu_flags'])}), {results['threads']} threads, torch {results['torch']}. "
        f"Decode of {results['new_tokens']} tokens after a {results['prompt_tokens']}-token prompt, best of "
        f"{results['reps']}; resident = RSS growth of a fresh process that loads the model and decodes.",
        "",
        "| setting | stored (MB) | lowbit decode tok/s | lowbit resident (MB) | resident / stored | GGUF (MB) "
        "| GGUF linear types | llama.cpp decode tok/s | llama.cpp resident (MB) | repack | lowbit / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in results["rows"]:
        lo, lc = r["lowbit"], r["llamacpp"]
        lc_speed = f"{lc['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in lc else f"failed ({lc.get('error', '')[:60]})"
        lc_res = f"{lc['resident_bytes'] / mb:.0f}" if "resident_bytes" in lc else "-"
        ratio = f"{r['decode_ratio']:.2f}x" if r["decode_ratio"] else "-"
        lines.append(
            f"| {r['setting']} | {lo['size_account_bytes'] / mb:.0f} | {lo['decode_tokens_per_s']:.1f} | "
            f"{lo['resident_bytes'] / mb:.0f} | {lo['resident_over_account']:.2f} | {r['gguf_bytes'] / mb:.0f} | "
            f"{', '.join(f'{k} x{v}' for k, v in r['gguf_linear_types'].items())} | {lc_speed} | {lc_res} | {lc.get('repack')} | {ratio} |"
        )
    lines += ["", "Quantize commands (each with `--stream`):", ""]
    lines += [f"- {r['setting']}: `{r['quantize_command']}` ({r['quantize_wall_s']} s)" for r in results["rows"]]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n\nCommand: `" + results["command"] + "`\n")


if __name__ == "__main__":
    main()
