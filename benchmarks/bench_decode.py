"""Default-model decode speed and resident memory on packed weights vs fp32 transformers, plus the
quality cost of the int8-activation kernels.

For each quantized folder of the default model (made with ``lowbit quantize`` if missing):

1. ``lowbit.runtime.packed.bench`` with ``activations="int8"`` and ``"float"`` on lowbit's decode loop,
   and int8 on the transformers forward: prefill / decode tokens/s of the packed model and of the
   fp32 ``transformers`` model in the same process (greedy decode with KV cache, batch 1; the fp32
   model also on lowbit's loop), resident memory of each (a fresh process's RSS growth while it
   loads and decodes) against the folder's size account (bytes stored).
2. Quality of the packed model with each activation mode on the Wikipedia eval split (first
   ``--eval-windows`` windows of 512 tokens): perplexity, KL to the fp32 model, top-1 agreement;
   and KL(int8 || float) — what rounding the activations alone costs.

``--head-bits 8 6 4:32`` adds, for each folder, a copy with the tied embedding / output head
quantized too (``--quantize-embeddings --override embeddings=BITS:GROUP``; group default: per
channel), so the table shows what a quantized head buys in decode speed and resident bytes (6-bit
codes run as u8: a byte each) and costs in KL (column "KL cost of the head": its KL to fp32 minus
that of the same folder with the fp16 head). ``--dry-run`` prints the folders, quantize commands and
runs, and stops; ``--model`` quantizes another model (a tiny one to check the script).

Usage (idle machine; ~10 min on 2 cores, plus ~3 min per head setting and folder)::

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

from lowbit import __version__
from lowbit.eval.data import get_text, tokenize_windows
from lowbit.eval.models import DEFAULT_MODEL, load_model
from lowbit.runtime import kernels
from lowbit.runtime.packed import bench, load_packed

# folder -> lowbit quantize arguments
FOLDERS = {
    "runs/bench/q4g128": ["--bits", "4", "--group-size", "128", "--method", "rtn"],
    "runs/bench/q2g128": ["--bits", "2", "--group-size", "128", "--method", "rtn"],
    "runs/bench/ternary-ch": ["--bits", "ternary", "--method", "rtn"],
}


def head_setting(text: str) -> str:
    """``--head-bits`` entry ``BITS[:GROUP]`` -> ``BITS:GROUP`` (group default: per channel)."""
    bits, _, group = text.partition(":")
    if bits not in ("8", "6", "4") or (group and group != "channel" and not group.isdigit()):
        raise argparse.ArgumentTypeError(f"--head-bits takes 8, 6 or 4, optionally :GROUP or :channel, got {text!r}")
    return f"{bits}:{group or 'channel'}"


def head_folders(folders: dict[str, list[str]], settings: list[str]) -> dict[str, list[str]]:
    """For each folder with known quantize arguments, one more per head setting (folder suffix
    ``-head8``, ``-head4g32``): the same arguments with the tied embedding / head quantized."""
    out = {}
    for folder, args in folders.items():
        for setting in settings:
            bits, group = setting.split(":")
            name = f"{folder}-head{bits}" + ("" if group == "channel" else f"g{group}")
            out[name] = [*args, "--quantize-embeddings", "--override", f"embeddings={setting}"]
    return out


def quantize_command(folder: str, args: list[str], model: str | None) -> list[str] | None:
    """The ``lowbit quantize`` command that makes ``folder`` (None: it exists)."""
    if (Path(folder) / "lowbit.json").exists():
        return None
    model_args = [] if model is None else ["--model", model]
    return [sys.executable, "-m", "lowbit.cli", "quantize", *model_args, *args, "--out", folder]


def ensure_folder(folder: str, args: list[str], model: str | None = None) -> None:
    cmd = quantize_command(folder, args, model)
    if cmd is None:
        return
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def head_label(meta: dict) -> str:
    """The output head as the folder stores it: "fp16", or its quantized setting (``8:channel``)."""
    qc = meta.get("quant_config", {})
    if not qc.get("quantize_embeddings"):
        return "fp16"
    spec = {"bits": qc.get("bits"), "group_size": qc.get("group_size"), **qc.get("overrides", {}).get("embeddings", {})}
    return f"{spec['bits']:g}:{spec['group_size'] or 'channel'}"


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


def plan_folders(args) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(every folder to run -> its quantize arguments, the head variants among them)."""
    if args.runs_dir:  # the default folders, elsewhere (e.g. of a tiny --model)
        FOLDERS.update({str(Path(args.runs_dir) / Path(f).name): a for f, a in list(FOLDERS.items())})
        args.folders = [str(Path(args.runs_dir) / Path(f).name) if f in FOLDERS else f for f in args.folders]
    known = {f: FOLDERS[f] for f in args.folders if f in FOLDERS}
    variants = head_folders(known, args.head_bits)
    return {**{f: FOLDERS.get(f, []) for f in args.folders}, **variants}, variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--folders", nargs="*", default=list(FOLDERS))
    ap.add_argument("--head-bits", nargs="*", type=head_setting, default=[], metavar="BITS[:GROUP]",
                    help="also each folder with the tied embedding / head quantized at these settings (8 6 4:32)")
    ap.add_argument("--model", default=None, help=f"model to quantize and compare with (default {DEFAULT_MODEL})")
    ap.add_argument("--runs-dir", default=None, help="make / read the default folders here instead of runs/bench")
    ap.add_argument("--dry-run", action="store_true", help="print the folders, commands and runs, then stop")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--md", default="benchmarks/results/decode.md")
    args = ap.parse_args()
    folders, variants = plan_folders(args)
    if args.dry_run:
        for folder, qargs in folders.items():
            cmd = quantize_command(folder, qargs, args.model)
            print(f"{folder}: " + ("exists" if cmd is None else "+ " + " ".join(cmd)))
            print(f"  runs: {', '.join(label for label, *_ in bench_modes(qargs))}; quality: int8, float")
        return
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    for folder, qargs in folders.items():
        ensure_folder(folder, qargs, args.model)

    ref, tok = load_model(args.model or DEFAULT_MODEL)
    windows = tokenize_windows(tok, get_text("wiki-eval"), 512)[: args.eval_windows]
    with torch.inference_mode():
        ref_logp = [F.log_softmax(ref(input_ids=w, use_cache=False).logits[:, :-1].float(), -1) for w in windows.split(1)]
    del ref

    rows = []
    for folder in folders:
        meta = json.loads((Path(folder) / "lowbit.json").read_text())
        row = {"folder": folder, "quant_config": meta.get("quant_config", {}), "head": head_label(meta), "speed": {}}
        if folder in variants:
            row["base_folder"] = folder.rsplit("-head", 1)[0]
        ternary = meta["quant_config"].get("bits") == 1.58
        for key, mode, tlayout, engine in bench_modes(["--bits", "ternary"] if ternary else []):
            t0 = time.time()
            row["speed"][key] = bench(folder, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                      repeats=args.repeats, threads=args.threads, activations=mode,
                                      ternary_layout=tlayout, engine=engine, memory=engine == "auto")
            print(f"{folder} {key}: {json.dumps(row['speed'][key])} ({time.time() - t0:.0f} s)", flush=True)
        row["quality"] = quality(folder, windows, ref_logp)
        print(f"{folder} quality: {json.dumps(row['quality'])}", flush=True)
        rows.append(row)
    by_folder = {row["folder"]: row for row in rows}
    for row in rows:  # what quantizing the head costs: KL to fp32 beyond the same folder's with the fp16 head
        base = by_folder.get(row.get("base_folder"))
        if base is not None:
            row["quality"]["head_kl_cost"] = {
                mode: row["quality"][mode]["kl_to_fp32"] - base["quality"][mode]["kl_to_fp32"] for mode in ("int8", "float")
            }

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {
        "lowbit": __version__,
        "torch": torch.__version__,
        "cpu": cpu,
        "platform": platform.platform(),
        "threads": args.threads,
        "head_bits": args.head_bits,
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


def bench_modes(quantize_args: list[str]) -> list[tuple[str, str, str, str]]:
    """(label, activations, ternary layout, engine) of each timed run of a folder."""
    modes = [("int8", "int8", "u2", "auto"), ("float", "float", "u2", "auto"),
             ("int8, transformers loop", "int8", "u2", "transformers")]
    if "ternary" in quantize_args or "1.58" in quantize_args:  # also the file's own 1.6-bit layout in memory
        modes.append(("int8, t5 layout", "int8", "t5", "auto"))
    return modes


def markdown(r: dict) -> str:
    mb = 1e6
    head_flag = " --head-bits " + " ".join(r["head_bits"]) if r.get("head_bits") else ""
    lines = [
        "# Default-model decode on packed weights vs fp32 transformers",
        "",
        f"`python benchmarks/bench_decode.py --threads {r['threads']}{head_flag}` (raw: `decode.json`). {r['cpu']}, "
        f"torch {r['torch']}, {r['threads']} threads, int8 kernels: {r['q8_isa']}, float kernels: {r['float_isa']}. "
        f"Prompt {r['prompt_tokens']} random tokens, then {r['new_tokens']} greedy tokens with KV cache, batch 1; "
        f"best of {r['repeats']}. Each row's fp32 reference (`transformers` model, same loop) ran in the same process "
        "right after the packed model. Resident: growth of a fresh process's RSS while it loads the model and "
        "decodes 24 tokens (after load: before decoding), over a baseline that already holds torch, transformers, the kernels, an empty model "
        "of the architecture and the tokenizer (`lowbit.runtime.resident.measure_resident`); size account: the bytes the "
        "folder stores (fp32: parameter bytes).",
        "",
        "| folder | head | activations | engine | decode tok/s | fp32 transformers decode tok/s | decode speedup | "
        "fp32 on lowbit loop tok/s | prefill tok/s | fp32 prefill tok/s | resident MB | size account MB | "
        "resident / account | after load / account | fp32 resident MB | fp32 account MB | fp32 resident / account |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        for mode, s in row["speed"].items():
            lines.append(
                f"| {row['folder']} | {row.get('head', 'fp16')} | {mode} | {s.get('engine', 'transformers')} | {s['decode_tokens_per_s']:.1f} | "
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
        "| folder | head | ppl int8 act. | ppl float act. | KL to fp32, int8 | KL to fp32, float | top-1 int8 | "
        "top-1 float | KL(float \\|\\| int8) | KL cost of the head, int8 | KL cost of the head, float |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        q = row["quality"]
        cost = q.get("head_kl_cost", {})
        lines.append(
            f"| {row['folder']} | {row.get('head', 'fp16')} | {q['int8']['perplexity']:.2f} | {q['float']['perplexity']:.2f} | "
            f"{q['int8']['kl_to_fp32']:.4f} | {q['float']['kl_to_fp32']:.4f} | {q['int8']['top1']:.3f} | "
            f"{q['float']['top1']:.3f} | {q['kl_int8_vs_float']:.2e} | {cost.get('int8', float('nan')):+.2e} | "
            f"{cost.get('float', float('nan')):+.2e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
