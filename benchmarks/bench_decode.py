"""Default-model decode speed and resident memory on packed weights vs fp32 transformers, plus the
quality cost of the int8-activation kernels.

For each quantized folder of the default model (made with ``lowbit quantize`` if missing):

1. ``lowbit.runtime.bench`` with ``activations="int8"`` and ``"float"`` on lowbit's decode loop,
   and int8 on the transformers forward: prefill / decode tokens/s of the packed model and of the
   fp32 ``transformers`` model in the same process (greedy decode with KV cache, batch 1; the fp32
   model also on lowbit's loop), resident memory of each (a fresh process's RSS growth while it
   loads and decodes) against the folder's size account (bytes stored).
2. Quality of the packed model with each activation mode on the Wikipedia eval split (first
   ``--eval-windows`` windows of 512 tokens): perplexity, KL to the fp32 model, top-1 agreement;
   and KL(int8 || float) — what rounding the activations alone costs.

Usage (idle machine; ~10 min on 2 cores)::

    python benchmarks/bench_decode.py --threads 2 \\
        --out benchmarks/results/decode.json --md benchmarks/results/decode.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import __version__, kernels
from lowbit.data import get_text, tokenize_windows
from lowbit.models import DEFAULT_MODEL, load_model
from lowbit.runtime import bench, load_packed

# folder -> lowbit quantize arguments
FOLDERS = {
    "runs/bench/q4g128": ["--bits", "4", "--group-size", "128", "--method", "rtn"],
    "runs/bench/q2g128": ["--bits", "2", "--group-size", "128", "--method", "rtn"],
    "runs/bench/ternary-ch": ["--bits", "ternary", "--method", "rtn"],
}


def ensure_folder(folder: str, args: list[str]) -> None:
    if (Path(folder) / "lowbit.json").exists():
        return
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", *args, "--out", folder]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


@torch.inference_mode()
def quality(folder: str, windows: torch.Tensor, ref_logp: list[torch.Tensor]) -> dict:
    out = {}
    logps = {}
    for mode in ("int8", "float"):
        model, _, _ = load_packed(folder, activations=mode)
        nll = kl = agree = n = 0.0
        lp_all = []
        for ids, ref in zip(windows.split(1), ref_logp, strict=True):
            lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            lp_all.append(lp)
            tgt = ids[:, 1:]
            nll += -lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
            kl += (ref.exp() * (ref - lp)).sum().item()
            agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()
            n += tgt.numel()
        out[mode] = {"perplexity": float(torch.tensor(nll / n).exp()), "kl_to_fp32": kl / n, "top1": agree / n}
        logps[mode] = lp_all
        del model
    kl_if = sum((f.exp() * (f - i)).sum().item() for i, f in zip(logps["int8"], logps["float"], strict=True))
    out["kl_int8_vs_float"] = kl_if / n
    out["tokens"] = int(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--folders", nargs="*", default=list(FOLDERS))
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--md", default="benchmarks/results/decode.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    for folder in args.folders:
        ensure_folder(folder, FOLDERS.get(folder, []))

    ref, tok = load_model(DEFAULT_MODEL)
    windows = tokenize_windows(tok, get_text("wiki-eval"), 512)[: args.eval_windows]
    with torch.inference_mode():
        ref_logp = [F.log_softmax(ref(input_ids=w, use_cache=False).logits[:, :-1].float(), -1) for w in windows.split(1)]
    del ref

    rows = []
    for folder in args.folders:
        meta = json.loads((Path(folder) / "lowbit.json").read_text())
        row = {"folder": folder, "quant_config": meta.get("quant_config", {}), "speed": {}}
        ternary = meta["quant_config"].get("bits") == 1.58
        # (label, activations, ternary layout, engine)
        modes = [("int8", "int8", "u2", "auto"), ("float", "float", "u2", "auto"),
                 ("int8", "int8", "u2", "transformers")]
        if ternary:  # also the file's own 1.6-bit layout in memory
            modes.append(("int8, t5 layout", "int8", "t5", "auto"))
        for label, mode, tlayout, engine in modes:
            key = label if engine == "auto" else f"{label}, {engine} loop"
            t0 = time.time()
            row["speed"][key] = bench(folder, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                      repeats=args.repeats, threads=args.threads, activations=mode,
                                      ternary_layout=tlayout, engine=engine, memory=engine == "auto")
            print(f"{folder} {key}: {json.dumps(row['speed'][key])} ({time.time() - t0:.0f} s)", flush=True)
        row["quality"] = quality(folder, windows, ref_logp)
        print(f"{folder} quality: {json.dumps(row['quality'])}", flush=True)
        rows.append(row)

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {
        "lowbit": __version__,
        "torch": torch.__version__,
        "cpu": cpu,
        "platform": platform.platform(),
        "threads": args.threads,
        "q8_isa": kernels.q8_isa(),
        "float_isa": kernels.isa(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "eval_tokens": rows[0]["quality"]["tokens"] if rows else 0,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    Path(args.md).write_text(markdown(result))
    print(f"wrote {args.out} and {args.md}")


def markdown(r: dict) -> str:
    mb = 1e6
    lines = [
        "# Default-model decode on packed weights vs fp32 transformers",
        "",
        f"`python benchmarks/bench_decode.py --threads {r['threads']}` (raw: `decode.json`). {r['cpu']}, "
        f"torch {r['torch']}, {r['threads']} threads, int8 kernels: {r['q8_isa']}, float kernels: {r['float_isa']}. "
        f"Prompt {r['prompt_tokens']} random tokens, then {r['new_tokens']} greedy tokens with KV cache, batch 1; "
        f"best of {r['repeats']}. Each row's fp32 reference (`transformers` model, same loop) ran in the same process "
        "right after the packed model. Resident: growth of a fresh process's RSS while it loads the model and "
        "decodes 24 tokens (after load: before decoding), over a baseline that already holds torch, transformers, the kernels, an empty model "
        "of the architecture and the tokenizer (`lowbit.resident.measure_resident`); size account: the bytes the "
        "folder stores (fp32: parameter bytes).",
        "",
        "| folder | activations | engine | decode tok/s | fp32 transformers decode tok/s | decode speedup | "
        "fp32 on lowbit loop tok/s | prefill tok/s | fp32 prefill tok/s | resident MB | size account MB | "
        "resident / account | after load / account | fp32 resident MB | fp32 account MB | fp32 resident / account |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        for mode, s in row["speed"].items():
            lines.append(
                f"| {row['folder']} | {mode} | {s.get('engine', 'transformers')} | {s['decode_tokens_per_s']:.1f} | "
                f"{s.get('reference_decode_tokens_per_s', float('nan')):.1f} | {s.get('decode_speedup', float('nan')):.2f}x | "
                f"{s.get('reference_lowbit_engine_decode_tokens_per_s', float('nan')):.1f} | "
                f"{s['prefill_tokens_per_s']:.0f} | {s.get('reference_prefill_tokens_per_s', float('nan')):.0f} | "
                f"{s.get('resident_bytes', float('nan')) / mb:.1f} | {s['size_account_bytes'] / mb:.1f} | "
                f"{s.get('resident_over_account', float('nan')):.2f} | "
                f"{s.get('resident_bytes_after_load', float('nan')) / s['size_account_bytes']:.2f} | "
                f"{s.get('reference_resident_bytes', float('nan')) / mb:.1f} | "
                f"{s.get('reference_size_account_bytes', float('nan')) / mb:.1f} | "
                f"{s.get('reference_resident_over_account', float('nan')):.2f} |"
            )
    lines += [
        "",
        f"Quality on the first {r['eval_tokens']} predicted tokens of the Wikipedia eval split (windows of 512):",
        "",
        "| folder | ppl int8 act. | ppl float act. | KL to fp32, int8 | KL to fp32, float | top-1 int8 | top-1 float | "
        "KL(float \\|\\| int8) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        q = row["quality"]
        lines.append(
            f"| {row['folder']} | {q['int8']['perplexity']:.2f} | {q['float']['perplexity']:.2f} | "
            f"{q['int8']['kl_to_fp32']:.4f} | {q['float']['kl_to_fp32']:.4f} | {q['int8']['top1']:.3f} | "
            f"{q['float']['top1']:.3f} | {q['kl_int8_vs_float']:.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
