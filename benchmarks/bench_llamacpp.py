"""Export lowbit quantized folders to GGUF and check them in llama.cpp: logits and decode speed.

For each quantized folder (default: ``runs/q4g32`` and ``runs/ternary-ch`` of the default model):

1. ``lowbit export DIR --format gguf`` (in-process): GGUF types per tensor, bytes actually written,
   bits/weight of the whole file and of the decoder linears, and whether every tensor is exact.
2. Logits: the same token ids (non-overlapping windows of the Wikipedia eval split) through lowbit's
   model (PyTorch, fake-quant weights = the exported values) and through llama.cpp
   (``Llama(path, logits_all=True)``, ``eval(ids)``, ``scores``): max / mean |logit diff|,
   KL(lowbit || llama.cpp) per token, top-1 agreement, and each side's perplexity on that text.
   llama.cpp quantizes activations to 8 bits inside its quantized matmuls, so the logits agree
   closely but not bit for bit.
3. Decode speed: batch-1 forward of one token at a time after a 16-token prompt, with KV cache
   (teacher-forced, so no sampling cost): llama.cpp on the GGUF, the same weights dequantized into
   a plain fp32 PyTorch model, and lowbit's packed runtime (``lowbit.runtime.packed.load_packed`` on
   lowbit's decode loop ``lowbit.runtime.decoder.Decoder``, int8 and float activations); all with the same
   thread count. Median of ``--reps`` runs.

Usage (2 cores shared; keep it short)::

    lowbit quantize --bits 4 --group-size 16 --method rtn --scale-search none --out runs/q4g16
    lowbit quantize --bits 4 --group-size 32 --method rtn --scale-search none --out runs/q4g32
    lowbit quantize --bits ternary --include 'model.layers.[2-9].mlp.down_proj' --method rtn --out runs/ternary-down
    lowbit quantize --bits ternary --method rtn --out runs/ternary-ch
    # runs/qat/qat-ternary: a ternary QAT folder from lowbit train (skipped when absent)
    python benchmarks/bench_llamacpp.py --threads 2 \
        --out benchmarks/results/llamacpp.json --md benchmarks/results/llamacpp.md

A folder given as ``DIR:f32`` is exported with ``--fallback f32`` (runs/q4g16: group 16 has no exact
GGUF type, so every linear is F32 and llama.cpp runs the model without quantized matmuls: the
floor of llama.cpp-vs-PyTorch differences that have nothing to do with quantization).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))  # llamacpp_speed, machine, bench_matvec
from llamacpp_speed import LlamaCppEngine, LowbitEngine  # noqa: E402

from lowbit import __version__
from lowbit.eval.data import get_text
from lowbit.eval.evaluation import compare_logits
from lowbit.gguf import export_gguf
from lowbit.peers.llamacpp import llamacpp_logits, open_llamacpp
from lowbit.store.folder import load_quantized

DEFAULT_DIRS = ["runs/q4g16:f32", "runs/q4g32", "runs/qat/qat-ternary", "runs/ternary-down", "runs/ternary-ch"]
NOTES = [
    "llama.cpp ran with use_extra_bufts=False (open_llamacpp(extra_bufts=False): no AMX / CPU_REPACK weight "
    "repacking, which llama.cpp uses by default): on this AMX CPU "
    "llama-cpp-python 0.3.36 segfaults in the AMX matmul at the first eval of any Q4_0 or Q8_0 file, "
    "llama.cpp's own llama_model_quantize output included (upstream llama.cpp issue #20824). Decode speeds "
    "are therefore for llama.cpp's plain CPU kernels and may be below what repacked Q4_0 reaches.",
    "This CPU reports AVX-512 and AMX, unlike an AVX2-only laptop-class CPU: compare tok/s only within this "
    "file.",
    "The quantized folders' tokenizer was converted by transformers from the SmolLM2 GGUF and splits text with "
    "the plain GPT-2 regex (no per-digit split), so the export writes pre-tokenizer 'gpt-2', matching lowbit's "
    "tokenizer rather than the original 'smollm' one.",
    "Ternary per-channel on this model: the 576-wide rows of q/k/v/o/gate/up are not multiples of TQ2_0's "
    "256-value blocks, so those tensors are written exactly as Q4_0 (4.5 bits/weight); only ffn_down "
    "(1536 inputs) is TQ2_0.",
    "ternary-ch (ternary RTN of every linear, no training) destroys the model (perplexity in the millions); "
    "its chaotic activations amplify llama.cpp's 8-bit activation rounding, so its logit agreement says little "
    "about the export. ternary-down (ternary ffn_down in layers 2-9 only: exact TQ2_0, the rest fp16; ternary "
    "RTN of every ffn_down also wrecks the model) and the QAT ternary folder are the meaningful ternary checks.",
    "Every exported tensor was verified after writing: dequantized with gguf.quants it equals lowbit's weight "
    "exactly (max abs error 0) except fallbacks, whose error is listed per file.",
]


def llamacpp_window_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def lowbit_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llamacpp_decode_speed(path: Path, prompt: list[int], steps: list[int], threads: int, reps: int) -> list[float]:
    engine = LlamaCppEngine(path, threads, repack=False, n_ctx=512)
    speeds = [engine.decode(prompt, steps) for _ in range(reps + 1)][1:]  # the first run warms up
    engine.close()
    return speeds


def torch_decode_speed(model, prompt: list[int], steps: list[int], reps: int) -> list[float]:
    speeds = []
    with torch.no_grad():
        for _ in range(reps + 1):
            out = model(torch.tensor([prompt]), use_cache=True)
            cache = out.past_key_values
            t0 = time.perf_counter()
            for tok in steps:
                cache = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).past_key_values
            speeds.append(len(steps) / (time.perf_counter() - t0))
    return speeds[1:]


def dense_fp32(model):
    """The same model with every quantized linear replaced by a plain fp32 nn.Linear holding its
    dequantized weight (the fake-quant modules would re-quantize the weight at every step)."""
    from lowbit.quant.surgery import QuantizedLinear, set_module

    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                dense.weight.copy_(module.quantized_weight())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
                set_module(model, name, dense)
    return model


def packed_decode_speed(folder: Path, prompt: list[int], steps: list[int], reps: int) -> dict:
    """lowbit's own packed runtime (C kernels), when this checkout has it: int8 activations (the
    default, as llama.cpp) as ``tok_s``, exact float activations as ``float_tok_s``."""
    try:
        from lowbit.runtime.decoder import unsupported_reason
        from lowbit.runtime.packed import load_packed

        out = {}
        for mode, key in (("int8", "tok_s"), ("float", "float_tok_s")):
            model, _, _ = load_packed(folder, verify=False, activations=mode)
            model.eval()
            if unsupported_reason(model) is None:  # lowbit's decode loop, as `lowbit generate` runs it
                engine = LowbitEngine(model, n_ctx=len(prompt) + len(steps) + 1)
                out["engine"] = "lowbit"
                runs = [engine.decode(prompt, steps) for _ in range(reps + 1)][1:]
                engine.close()
            else:
                out["engine"] = "transformers"
                runs = torch_decode_speed(model, prompt, steps, reps)
            out[key] = round(statistics.median(runs), 1)
            out[f"{key}_runs"] = [round(x, 1) for x in runs]
            del model
        return out
    except Exception as exc:  # the packed runtime is optional here
        return {"error": f"{type(exc).__name__}: {exc}"}


def how_made(folder: Path) -> str:
    """The command that made a quantized folder, rebuilt from its lowbit.json."""
    meta = json.loads((folder / "lowbit.json").read_text())
    q, info = meta["quant_config"], meta["info"]
    if info.get("method") == "qat":
        return (
            f"{folder}: made by lowbit train (QAT, {q['bits']:g}-bit {q['quantizer']}); see {folder}/train_config.json"
        )
    parts = [f"lowbit quantize --model {info.get('base_model')} --bits {q['bits']:g}"]
    if q["group_size"] is not None:
        parts.append(f"--group-size {q['group_size']}")
    if q["quantizer"] != "auto":
        parts.append(f"--quantizer {q['quantizer']}")
    if q.get("include", ["*"]) != ["*"]:
        parts.append("--include " + " ".join(f"'{p}'" for p in q["include"]))
    parts.append(f"--method {info.get('method')} --scale-search {q['scale_search']} --out {folder}")
    return " ".join(parts)


def parse_folder(spec: str, default_fallback: str) -> tuple[Path, str]:
    """``DIR`` or ``DIR:FALLBACK`` (e.g. ``runs/q4g16:f32``)."""
    folder, _, fallback = spec.partition(":")
    return Path(folder), fallback or default_fallback


def bench_folder(folder: Path, fallback: str, gguf_dir: Path, args, text_ids: list[int]) -> dict:
    out = gguf_dir / f"{folder.name}-{fallback}.gguf"
    t0 = time.time()
    export = export_gguf(folder, out, fallback=fallback, ternary=args.ternary)
    export_s = time.time() - t0
    export.pop("tensors")
    model, _, meta = load_quantized(folder)
    model.eval()

    llm = open_llamacpp(out, n_ctx=args.window, n_threads=args.threads, logits_all=True, extra_bufts=False)
    windows = [text_ids[i : i + args.window] for i in range(0, len(text_ids) - args.window + 1, args.window)]
    stats, nll_lb, nll_lc, count = [], 0.0, 0.0, 0
    for ids in windows:
        a, b = lowbit_logits(model, ids), llamacpp_window_logits(llm, ids)
        s = compare_logits(a, b, ids=ids)
        stats.append(s)
        nll_lb, nll_lc, count = nll_lb + s["nll_ref"], nll_lc + s["nll_other"], count + s["predicted"]
    llm.close()
    positions = sum(s["positions"] for s in stats)
    cmp = {
        "tokens": positions,
        "windows": len(windows),
        "max_abs_logit_diff": max(s["max_abs_logit_diff"] for s in stats),
        "mean_abs_logit_diff": sum(s["mean_abs_logit_diff"] * s["positions"] for s in stats) / positions,
        "mean_kl_lowbit_to_llamacpp": sum(s["mean_kl"] * s["positions"] for s in stats) / positions,
        "max_kl": max(s["max_kl"] for s in stats),
        "top1_agreement": sum(s["top1_agreement"] * s["positions"] for s in stats) / positions,
        "perplexity_lowbit": float(np.exp(nll_lb / count)),
        "perplexity_llamacpp": float(np.exp(nll_lc / count)),
    }
    prompt, steps = text_ids[:16], text_ids[16 : 16 + args.decode_tokens]
    load_before = round(os.getloadavg()[0], 2)
    lc = llamacpp_decode_speed(out, prompt, steps, args.threads, args.reps)
    tc = torch_decode_speed(dense_fp32(model), prompt, steps, args.reps)
    packed = packed_decode_speed(folder, prompt, steps, args.reps)
    return {
        "folder": str(folder),
        "fallback": fallback,
        "method": meta["info"].get("method"),
        "quant_config": meta["quant_config"],
        "gguf": str(out),
        "export_seconds": round(export_s, 1),
        "export": export,
        "logits": cmp,
        "decode": {
            "tokens": len(steps),
            "threads": args.threads,
            "llamacpp_tok_s": round(statistics.median(lc), 1),
            "llamacpp_tok_s_runs": [round(x, 1) for x in lc],
            "lowbit_torch_fp32_tok_s": round(statistics.median(tc), 1),
            "lowbit_torch_fp32_tok_s_runs": [round(x, 1) for x in tc],
            "lowbit_packed_runtime": packed,
            "loadavg_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        },
    }


TINY_CASES = [
    # (label, bits, group, fallback, ternary, tweak)
    ("4-bit g16 -> F32 fallback", 4, 16, "f32", "tq2_0", None),
    ("4-bit g16 -> F16 fallback", 4, 16, "f16", "tq2_0", None),
    ("8-bit LSQ g32 -> Q8_0", 8, 32, "f16", "tq2_0", None),
    ("8-bit LSQ g32, codes -128 -> Q8_0", 8, 32, "f16", "tq2_0", "shrink"),
    ("4-bit LSQ g32 -> Q4_0", 4, 32, "f16", "tq2_0", None),
    ("ternary SEQ g256 -> TQ2_0", "ternary", 256, "f16", "tq2_0", None),
    ("ternary SEQ g256 -> TQ1_0", "ternary", 256, "f16", "tq1_0", None),
]


def tiny_checks(work: Path, threads: int) -> list[dict]:
    """The unit-test models (random Llama, hidden 256, 2 layers, tiny BPE) through llama.cpp."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import SAMPLE_TEXT, tiny_tokenizer
    from test_export_gguf import _shrink_steps, make_folder

    rows = []
    ids = tiny_tokenizer()(SAMPLE_TEXT[:400])["input_ids"][:64]
    for i, (label, bits, group, fallback, ternary, tweak) in enumerate(TINY_CASES):
        folder = make_folder(work, bits, group, name=f"tiny{i}", tweak=_shrink_steps if tweak else None)
        out = work / f"tiny{i}.gguf"
        export = export_gguf(folder, out, fallback=fallback, ternary=ternary)
        model, _, _ = load_quantized(folder)
        cmp = compare_logits(lowbit_logits(model, ids), llamacpp_logits(out, ids, n_threads=threads, extra_bufts=False))
        rows.append(
            {
                "case": label,
                "linear_types": export["linear_types"],
                "max_abs_weight_error": export["max_abs_error"],
                "q8_0_with_code_-128": export["q8_0_with_code_-128"],
                **cmp,
            }
        )
    return rows


def write_md(results: dict, path: Path) -> None:
    lines = _md_header(results) + _md_sizes(results) + _md_logits(results) + _md_decode(results) + _md_tiny(results)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    path.write_text("\n".join(lines) + "\n")


def _md_header(results: dict) -> list[str]:
    lines = [
        "# lowbit -> GGUF -> llama.cpp",
        "",
        f"Generated by `{results['command']}` on {results['machine']['cpu']} "
        f"({results['machine']['threads']} threads, load average at start {results['machine']['loadavg']}; "
        "the 2 cores are shared, so speeds are noisy).",
        f"lowbit {results['lowbit_version']}, llama-cpp-python {results['llama_cpp_version']}, gguf {results['gguf_version']}.",
        f"Text: {results['text']}, {results['runs'][0]['logits']['tokens'] if results['runs'] else 0} tokens "
        f"in windows of {results['window']}.",
        "",
        "Quantized folders were made with:",
        "",
    ]
    return lines + [f"    {c}" for c in results["quantize_commands"]]


def _md_sizes(results: dict) -> list[str]:
    lines = [
        "",
        "## Size (bytes actually written to the GGUF file)",
        "",
        "| folder | lowbit setting | linear GGUF types | file bytes | bits/weight (file) | bits/weight (linears) | exact tensors |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        e, q = r["export"], r["quant_config"]
        group = {None: "per-channel", 0: "per-tensor"}.get(q["group_size"], f"group {q['group_size']}")
        setting = f"{q['bits']:g}-bit {q['quantizer']} {group}, {r['method']}"
        if q.get("include", ["*"]) != ["*"]:
            setting += f", only {' '.join(q['include'])}"
        types = ", ".join(f"{k} x{v}" for k, v in sorted(e["linear_types"].items()))
        lines.append(
            f"| {Path(r['folder']).name} ({r['fallback']}) | {setting} | {types} | {e['file_bytes']:,} | {e['bits_per_weight']:.3f} | "
            f"{e['bits_per_weight_linear']:.3f} | {e['quantized_exact']}/{e['quantized_tensors']} quantized, "
            f"{e['inexact_tensors']} inexact, max err {e['max_abs_error']:g} |"
        )
    return lines + ["", "The embedding (tied with the output head, 28.3 M parameters) stays fp16 and is about half the file."]


def _md_logits(results: dict) -> list[str]:
    lines = [
        "",
        "## llama.cpp vs lowbit on the same token ids",
        "",
        "| folder | max abs logit diff | mean abs logit diff | mean KL(lowbit \\|\\| llama.cpp) | max KL | top-1 agreement | ppl lowbit | ppl llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        c = r["logits"]
        lines.append(
            f"| {Path(r['folder']).name} ({r['fallback']}) | {c['max_abs_logit_diff']:.4f} | {c['mean_abs_logit_diff']:.5f} | "
            f"{c['mean_kl_lowbit_to_llamacpp']:.2e} | {c['max_kl']:.2e} | {c['top1_agreement']:.4f} | "
            f"{c['perplexity_lowbit']:.3f} | {c['perplexity_llamacpp']:.3f} |"
        )
    return lines + [
        "",
        "llama.cpp quantizes activations to 8 bits inside Q4_0 / Q8_0 / TQ matmuls, so agreement is close, not exact.",
    ]


def _md_decode(results: dict) -> list[str]:
    lines = [
        "",
        f"## Decode speed (batch 1, one token per step after a 16-token prompt, {results['threads']} threads)",
        "",
        "| folder | llama.cpp tok/s | PyTorch fp32 (dequantized) tok/s | lowbit packed, int8 act. tok/s "
        "| lowbit packed, float act. tok/s | lowbit int8 / llama.cpp | runs (llama.cpp) | runs (PyTorch fp32) "
        "| load avg before/after |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results["runs"]:
        d = r["decode"]
        p = d["lowbit_packed_runtime"]
        ratio = f"{p['tok_s'] / d['llamacpp_tok_s']:.2f}x" if "tok_s" in p else "n/a"
        lines.append(
            f"| {Path(r['folder']).name} ({r['fallback']}) | {d['llamacpp_tok_s']} | {d['lowbit_torch_fp32_tok_s']} | "
            f"{p.get('tok_s', 'n/a')} | {p.get('float_tok_s', 'n/a')} | {ratio} | "
            f"{d['llamacpp_tok_s_runs']} | {d['lowbit_torch_fp32_tok_s_runs']} | {d['loadavg_1min_before_after']} |"
        )
    return lines


def _md_tiny(results: dict) -> list[str]:
    if not results.get("tiny"):
        return []
    lines = [
        "",
        "## Tiny random Llama (hidden 256, 2 layers; the unit-test models), 64 tokens",
        "",
        "| case | linear types | max weight error in file | max abs logit diff | mean KL | top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for t in results["tiny"]:
        types = ", ".join(f"{k} x{v}" for k, v in t["linear_types"].items())
        lines.append(
            f"| {t['case']} | {types} | {t['max_abs_weight_error']:.3g} | {t['max_abs_logit_diff']:.4g} | "
            f"{t['mean_kl']:.2e} | {t['top1_agreement']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=DEFAULT_DIRS, help="lowbit quantized folders")
    parser.add_argument("--gguf-dir", default="runs/gguf", help="where the GGUF files go")
    parser.add_argument("--text", default="wiki-eval")
    parser.add_argument("--tokens", type=int, default=1024, help="eval tokens for the logit comparison")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fallback", default="f16")
    parser.add_argument("--ternary", default="tq2_0")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny random-model checks")
    parser.add_argument("--out", default="benchmarks/results/llamacpp.json")
    parser.add_argument("--md", default="benchmarks/results/llamacpp.md")
    parser.add_argument("--speed", action="store_true",
                        help="only the speed run (llamacpp_speed.py): decode and prefill, repacking on and off, "
                             "llama.cpp's own types and lowbit's 2-bit / ternary settings")
    parser.add_argument("--speed-dir", default="runs/llamacpp-speed", help="folders and GGUF files of --speed")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--speed-out", default="benchmarks/results/llamacpp_speed.json")
    parser.add_argument("--speed-md", default="benchmarks/results/llamacpp_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.speed:
        import llamacpp_speed

        from lowbit.eval.models import load_model
        from lowbit.runtime import kernels

        kernels.set_num_threads(args.threads)
        _, tok = load_model()
        need = max(args.prefill_tokens, 16 + args.decode_tokens)
        ids = tok(get_text(args.text)[: 40 * need], add_special_tokens=False)["input_ids"][:need]
        res = llamacpp_speed.run(args, ids)
        Path(args.speed_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.speed_out).write_text(json.dumps(res, indent=2))
        llamacpp_speed.write_md(res, Path(args.speed_md))
        print(json.dumps(res["ratios"], indent=1))
        print(f"wrote {args.speed_out} and {args.speed_md}")
        return

    import llama_cpp

    gguf_dir = Path(args.gguf_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    specs = [parse_folder(f, args.fallback) for f in args.folders]
    missing = [str(f) for f, _ in specs if not (f / "lowbit.json").is_file()]
    if missing:
        print(f"skipping missing folders: {', '.join(missing)}", flush=True)
        specs = [(f, fb) for f, fb in specs if str(f) not in missing]
    folders = [f for f, _ in specs]
    _, tokenizer, _ = load_quantized(folders[0], verify=False)
    text_ids = tokenizer(get_text(args.text)[: 20 * args.tokens], add_special_tokens=False)["input_ids"][: args.tokens]
    quantize_commands = [how_made(f) for f in folders]
    results = {
        "command": "python " + " ".join(sys.argv),
        "quantize_commands": quantize_commands,
        "export_commands": [
            f"lowbit export {f} --format gguf --out {gguf_dir / f'{f.name}-{fb}.gguf'} "
            f"--fallback {fb} --ternary {args.ternary}"
            for f, fb in specs
        ],
        "lowbit_version": __version__,
        "llama_cpp_version": llama_cpp.__version__,
        "gguf_version": importlib.metadata.version("gguf"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "text": args.text,
        "window": args.window,
        "threads": args.threads,
        "runs": [],
        "notes": NOTES,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                results["machine"]["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not args.no_tiny:
        with tempfile.TemporaryDirectory() as work:
            results["tiny"] = tiny_checks(Path(work), args.threads)
        print(json.dumps(results["tiny"], indent=1), flush=True)
    for folder, fallback in specs:
        print(f"== {folder} (fallback {fallback})", flush=True)
        run = bench_folder(folder, fallback, gguf_dir, args, text_ids)
        print(json.dumps({k: run[k] for k in ("logits", "decode")}, indent=1), flush=True)
        results["runs"].append(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    write_md(results, Path(args.md))
    print(f"wrote {args.out} and {args.md}")


if __name__ == "__main__":
    main()
