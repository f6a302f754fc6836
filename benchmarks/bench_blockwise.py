"""Below 3.5 bits: byte-budget PTQ, then block-wise distillation (Block-AP), then end-to-end step sizes.

Three stages, each saved as a lowbit folder under ``--work`` and scored on held-out text (``--data``,
not the calibration or training text) in windows of 512 against the full-precision model (KL per
token): (1) ``Budget(budget_bpw=B)`` (Fisher-planned bits/group/grid per layer, GPTQ); (2)
``BlockAP`` on that start point (each decoder block trained to reproduce the full-precision block);
(3) EfficientQAT's E2E-QP: ``lowbit train --init <stage 2> --train-params scales`` (KL distillation
from the full-precision model, step sizes only). A killed run continues where it stopped (stage
folders are reused, Block-AP resumes from its work folder, training from its checkpoint). Writes
``blockwise.json`` (one record per budget: every stage's KL, perplexity, top-1, bits, tokens and
seconds, and the per-block MSE curve) and ``blockwise.md``::

    python benchmarks/bench_blockwise.py --budget-bpw 3.5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags, cpu_model  # noqa: E402

BLOCKWISE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8")


class Scorer:
    """Held-out windows and the full-precision model's cached log-probs, scored once per stage."""

    def __init__(self, fp, tokenizer, data: str, tokens: int):
        import torch

        from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos
        from lowbit.eval.evaluation import cache_reference

        self.windows = tokenize_windows(tokenizer, get_text(data), 512, max_tokens=tokens,
                                        bos=tokenizer_adds_bos(tokenizer))  # fmt: skip
        with torch.inference_mode():
            self.reference = cache_reference(fp, self.windows, batch_size=4, progress=False)

    def __call__(self, model) -> dict:
        import torch

        from lowbit.eval.evaluation import evaluate, size_account

        with torch.inference_mode():
            q = evaluate(model, self.windows, reference=self.reference, batch_size=4, progress=False)
        size = size_account(model)
        return {"kl_to_reference": q["kl_to_reference"], "perplexity": q["perplexity"],
                "top1_agreement": q["top1_agreement"], "eval_tokens": q["tokens"],
                "bits_per_weight_linear": size["bits_per_weight_linear"], "total_bytes": size["total_bytes"]}  # fmt: skip


def stage_budget(args, work: Path, score) -> dict:
    from lowbit.api import load, quantize_to_dir
    from lowbit.budget.planner import Budget
    from lowbit.ptq.methods import GPTQ
    from lowbit.quant.surgery import QuantConfig

    folder = work / "budget"
    t0 = time.time()
    if args.bits is not None:  # a uniform grid (e.g. ternary) with GPTQ instead of the planner
        config = QuantConfig(bits=args.bits, group_size=args.group_size, rotate=args.rotate)
        method = GPTQ(calib=args.train_text, calib_tokens=16384, sample="random")
    else:
        config = QuantConfig(bits=4, rotate=args.rotate)
        method = Budget(budget_bpw=args.budget_bpw, calib=args.train_text)
    if not (folder / "lowbit.json").exists():
        quantize_to_dir(args.model, str(folder), config, method=method, progress=False)
    meta = json.loads((folder / "lowbit.json").read_text())
    model = load(str(folder))[0]
    settings = meta["info"]["settings"]
    return {"stage": "budget" if args.bits is None else "gptq", **score(model),
            "seconds": meta["info"]["quantize_seconds"],
            "tokens": settings["calib_tokens"] + settings.get("fisher_tokens", 0),
            "wall_seconds_this_run": round(time.time() - t0, 1)}  # fmt: skip


def stage_blockap(args, work: Path, fp, score) -> tuple[dict, list]:
    from lowbit.api import load
    from lowbit.eval.models import reference_identity
    from lowbit.store.folder import save_quantized
    from lowbit.train.blockap import BlockAP

    folder = work / "blockap"
    method = BlockAP(calib=args.train_text, calib_tokens=args.blockap_tokens, epochs=args.epochs,
                     work_dir=str(work / "blockap-work"), loss=args.loss, check_windows=args.check_windows,
                     time_budget=args.blockap_minutes * 60 if args.blockap_minutes else None)
    if not (folder / "lowbit.json").exists():
        model, tokenizer, _ = load(str(work / "budget"))
        reference = fp
        if args.rotate:  # the targets are the rotated full-precision blocks (seed 0, as the start point)
            from lowbit.quant.rotation import rotate_model_

            reference = copy.deepcopy(fp)
            rotate_model_(reference)
        t0 = time.time()
        model.to(args.device)
        reference.to(args.device)  # fp (or its rotated copy) is not used after this stage
        report = method.apply(model, model.lowbit_config, tokenizer, progress=not args.quiet, reference=reference)
        model.to("cpu")
        seconds = sum(b["seconds"] for b in report["blocks"])
        save_quantized(model, tokenizer, folder, info={**reference_identity(args.model), "method": "budget+blockap",
                       "quantize_seconds": round(seconds, 1), "report": report,
                       "wall_seconds_last_run": round(time.time() - t0, 1)})  # fmt: skip
    meta = json.loads((folder / "lowbit.json").read_text())
    report = meta["info"]["report"]
    model = load(str(folder))[0]
    record = {"stage": "blockap", **score(model), "seconds": meta["info"]["quantize_seconds"],
              "tokens": report.get("train_tokens_total", report["train_tokens_per_block"]), "windows": report["windows"],
              "epochs": args.epochs, "steps_per_block": report.get("steps_per_block")}  # fmt: skip
    return record, report["blocks"]


def stage_e2e(args, work: Path, score) -> tuple[dict, list]:
    import torch

    from lowbit.api import load
    from lowbit.quant.surgery import ROTATION_FIELDS, QuantConfig
    from lowbit.store.folder import read_meta
    from lowbit.train import TrainConfig, run

    init = work / ("budget" if args.no_blockap else "blockap")
    quant = {k: v for k, v in read_meta(init)["quant_config"].items() if k not in ROTATION_FIELDS}
    cfg = TrainConfig(out=str(work / "e2e"), quant=QuantConfig(**quant), steps=args.e2e_steps, model=args.model,
                      data=args.train_text, init=str(init), train_params=args.e2e_params, lr=args.e2e_lr,
                      scale_lr=args.e2e_scale_lr or args.e2e_lr, batch_size=args.e2e_batch, seq_len=256,
                      warmup=min(10, args.e2e_steps - 1), schedule=args.e2e_schedule, eval_every=args.e2e_eval_every,
                      eval_text=args.data)  # fmt: skip
    resume = (work / "e2e" / "checkpoint.pt").exists() or (work / "e2e" / "lowbit.json").exists()
    result = run(cfg, resume=resume, progress=not args.quiet).result
    model = load(str(work / "e2e"))[0]
    curve = [{"step": r["step"], "loss": r["loss"]} for r in _metrics(work / "e2e")]
    held_out = work / "e2e" / "eval.jsonl"
    if held_out.is_file():  # KL on the first --eval-every-tokens of the held-out text, during training
        rows = [json.loads(line) for line in held_out.read_text().splitlines() if line.strip()]
        by_step = {r["step"]: r for r in rows}
        for point in curve:
            if point["step"] in by_step:
                point.update(tokens=by_step[point["step"]]["tokens"], eval_kl=by_step[point["step"]]["eval_kl"])
        if 0 in by_step:  # the start point, scored before the first step
            curve.insert(0, {"step": 0, "tokens": 0, "eval_kl": by_step[0]["eval_kl"]})
    return {"stage": "e2e", **score(model), "seconds": result.get("train_seconds"),
            "tokens": result.get("train_tokens"), "steps": args.e2e_steps, "lr": args.e2e_lr, "schedule": args.e2e_schedule,
            "params": args.e2e_params, "batch": args.e2e_batch, "device": "cuda" if torch.cuda.is_available() else "cpu"}, curve  # fmt: skip


def target_kl(args) -> float | None:
    """The issue's KL target of this run: ternary 2.0, <= 2.5 bits/weight 1.5, <= 3.5 bits/weight 0.35."""
    if args.bits is not None:
        return 2.0 if args.bits <= 1.6 else None
    return 1.5 if args.budget_bpw <= 2.5 else 0.35 if args.budget_bpw <= 3.5 else None


def _e2e_stage(rec: dict) -> dict | None:
    return next((s for s in rec["stages"] if s["stage"] == "e2e"), None)


def fit_record(rec: dict, target: float | None) -> dict | None:
    """The extrapolation of one run's end-to-end curve, on the final measure (see :func:`extrapolate`)."""
    curve, e2e = rec.get("e2e_curve", []), _e2e_stage(rec)
    last = next((c for c in reversed(curve) if "eval_kl" in c), None)
    if e2e is None or last is None:
        return None
    return extrapolate(curve, target, e2e["kl_to_reference"] / last["eval_kl"])


def _power_law(points: list[tuple[float, float]], floor: float = 0.0) -> tuple[float, float, float]:
    """(a, b, squared error) of KL = floor + a * tokens^-b, least squares in log-log on KL - floor."""
    import math

    xs, ys = [math.log(t) for t, _ in points], [math.log(k - floor) for _, k in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    a, b = math.exp(my - slope * mx), -slope
    return a, b, sum((floor + a * t**-b - k) ** 2 for t, k in points)


def extrapolate(curve: list[dict], target: float | None, scale: float = 1.0) -> dict | None:
    """Tokens until the held-out KL reaches ``target``, read off the end-to-end curve (``eval_kl`` per
    ``tokens``, on the short in-training measure, times ``scale``: the final measure's KL over the
    curve's last point, so that the curve is on the target's measure). Two fits: a power law
    KL = a * tokens^-b on the curve's last half (no floor), and KL = c + a *
    tokens^-b on all of it (c, the floor, by grid search: when c >= target no token count reaches it).
    The two readings can differ by orders of magnitude on a short, noisy curve: read them as a range.
    None without a target or two points."""
    points = [(c["tokens"], c["eval_kl"] * scale) for c in curve if "eval_kl" in c and c["tokens"] > 0]
    if target is None or len(points) < 2:
        return None
    tail = points[len(points) // 2 :] if len(points) >= 4 else points
    a, b, _ = _power_law(tail)
    fit = {"target": target, "scale": scale, "a": a, "b": b, "points": len(tail)}
    if b <= 0:
        fit["text"] = f"The held-out KL did not fall over the last {len(tail)} points: no extrapolation to {target}."
        return fit
    fit["tokens_to_target"] = (a / target) ** (1 / b)
    fit["text"] = (f"Power law fitted to the last {len(tail)} points of the curve (times {scale:.3f}, the final "
                   f"measure's ratio to the curve's at its last point): KL = {a:.3g} x tokens^-{b:.3f}; it reaches "
                   f"the target {target} after ~{fit['tokens_to_target']:.3g} end-to-end tokens (no floor).")  # fmt: skip
    if len(points) >= 4:
        low = min(k for _, k in points)
        best = min((_power_law(points, low * i / 200) + (low * i / 200,) for i in range(200)), key=lambda f: f[2])
        fa, fb, _, floor = best
        fit["floor"] = {"c": floor, "a": fa, "b": fb, "points": len(points)}
        if floor >= target or fb <= 0:
            fit["text"] += (f" With a floor (KL = c + a x tokens^-b on all {len(points)} points): c = {floor:.3f}, "
                            f"at or above the target: this recipe would not reach {target} at any token count.")  # fmt: skip
        else:
            fit["floor"]["tokens_to_target"] = (fa / (target - floor)) ** (1 / fb)
            fit["text"] += (f" With a floor (KL = c + a x tokens^-b on all {len(points)} points): c = {floor:.3f}, "
                            f"target after ~{fit['floor']['tokens_to_target']:.3g} tokens.")  # fmt: skip
    return fit


def _metrics(folder: Path) -> list[dict]:
    from lowbit.train import METRICS, read_metrics

    return read_metrics(folder / METRICS) if (folder / METRICS).exists() else []


def write_markdown(path: Path, results: dict) -> None:
    lines = ["# Block-wise distillation below 3.5 bits (`bench_blockwise.py`)", ""]
    for key, rec in sorted(results["runs"].items(), key=lambda kv: -float(kv[0].split("-")[0].rstrip("b"))):
        lines += [
            f"## {'Budget ' + key + ' bits/weight' if 'b-g' not in key else key}",
            "",
            f"`{rec['command']}` on {rec['cpu']} ({rec['cpu_flags']}), {rec['threads']} torch threads, {rec['date']}; "
            f"model {rec['model']}, held-out text {rec['data']} ({rec['stages'][0]['eval_tokens']} tokens, windows of "
            f"512; calibration and training on {rec.get('train_text', 'wiki-train')}), KL to the full-precision model per token.",
            "",
            "| stage | bits/weight (linears) | KL | perplexity | top-1 | tokens | seconds | cumulative minutes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        total = 0.0
        for s in rec["stages"]:
            total += s["seconds"] or 0
            lines.append(
                f"| {s['stage']} | {s['bits_per_weight_linear']:.3f} | {s['kl_to_reference']:.4f} | {s['perplexity']:.2f} "
                f"| {s['top1_agreement']:.4f} | {s['tokens']} | {s['seconds']:.0f} | {total / 60:.1f} |"
            )
        held = [c for c in rec.get("e2e_curve", []) if "eval_kl" in c]
        if held:
            lines += ["", "End-to-end held-out curve (KL on the first 4,096 held-out tokens in windows of the training length, tokens trained -> KL): "
                      + ", ".join(f"{c['tokens']:,} -> {c['eval_kl']:.3f}" for c in held)]  # fmt: skip
            fit = rec.get("extrapolation")
            if fit and (_e2e_stage(rec) or {}).get("schedule", "cosine") == "cosine":
                lines += ["", fit["text"] + " This run decays the learning rate on a cosine schedule, so the "
                          "curve's tail flattens partly by design and the fit overstates the tokens needed; a "
                          "constant-rate run (`--e2e-schedule constant`) is the honest basis for an extrapolation."]  # fmt: skip
            elif fit:
                lines += ["", fit["text"] + " Constant learning rate after a 10-step warm-up: the curve is not bent "
                          "by a schedule; the two fits are a range, not an estimate to trust to the digit."]  # fmt: skip
        curve = rec.get("blocks", [])
        if curve:
            lines += ["", "Block-AP relative MSE per block (before -> after): " + ", ".join(
                f"{b['block']}: {b['mse_initial']:.3g}->{b['mse_final']:.3g}" for b in curve)]  # fmt: skip
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, results: dict) -> None:
    """Left: KL per stage for every run; right: Block-AP's relative MSE per block, before and after."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    for key, rec in sorted(results["runs"].items()):
        stages = rec["stages"]
        ax1.plot([s["stage"] for s in stages], [s["kl_to_reference"] for s in stages], marker="o",
                 label=f"{key} ({stages[0]['bits_per_weight_linear']:.2f} b/w)")  # fmt: skip
        blocks = rec.get("blocks", [])
        if blocks:
            x = [b["block"] for b in blocks]
            line = ax2.plot(x, [b["mse_initial"] for b in blocks], linestyle="--")[0]
            ax2.plot(x, [b["mse_final"] for b in blocks], color=line.get_color(), label=key)
        held = [c for c in rec.get("e2e_curve", []) if "eval_kl" in c and c["tokens"] > 0]
        fit = rec.get("extrapolation")
        if held and fit and "scale" in fit:  # on the final measure (the fit's scale), to the fit's horizon
            line = ax3.plot([c["tokens"] for c in held], [c["eval_kl"] * fit["scale"] for c in held], marker="o",
                            markersize=3, label=key)[0]  # fmt: skip
            horizon = min(max(fit.get("tokens_to_target", 0), 10 * held[-1]["tokens"]), 1e9)
            xs = [held[0]["tokens"] * (horizon / held[0]["tokens"]) ** (i / 40) for i in range(41)]
            if fit.get("b", 0) > 0:
                ax3.plot(xs, [fit["a"] * x ** -fit["b"] for x in xs], linestyle=":", color=line.get_color())
            if "floor" in fit:
                f = fit["floor"]
                ax3.plot(xs, [f["c"] + f["a"] * x ** -f["b"] for x in xs], linestyle="--", color=line.get_color())
            ax3.axhline(fit["target"], color="grey", linewidth=0.6)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("end-to-end training tokens")
    ax3.set_ylabel("held-out KL, final measure\n(dotted: power law; dashed: with floor; grey: target)")
    if ax3.lines:
        ax3.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("KL to full precision (held-out text)")
    ax1.legend(fontsize=8)
    ax2.set_yscale("log")
    ax2.set_xlabel("decoder block")
    ax2.set_ylabel("relative MSE (dashed: start, solid: after Block-AP)")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--budget-bpw", type=float, help="start from the byte-budget planner + GPTQ")
    what.add_argument("--bits", help="start from GPTQ on one grid instead (e.g. ternary)")
    p.add_argument("--group-size", type=int, default=None, help="with --bits: inputs per scale (default per channel)")
    p.add_argument("--rotate", action="store_true", help="rotate before planning (QuaRot-style)")
    p.add_argument("--blockap-tokens", type=int, default=65536, help="Block-AP calibration tokens")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--blockap-minutes", type=float, default=None, help="Block-AP time budget (steps cut to fit)")
    p.add_argument("--check-windows", type=int, default=0, help="Block-AP windows held out for the revert test")
    p.add_argument("--loss", default="mse", choices=("normed", "mse"), help="Block-AP objective (see BlockAP.loss)")
    p.add_argument("--e2e-steps", type=int, default=0, help="end-to-end step-size training steps (0: skip)")
    p.add_argument("--e2e-lr", type=float, default=2e-5, help="step-size lr (EfficientQAT E2E-QP: 1e-5 to 2e-5)")
    p.add_argument("--e2e-params", default="scales", choices=("scales", "all"),
                   help="end to end: step sizes only (E2E-QP) or all weights too")
    p.add_argument("--e2e-scale-lr", type=float, default=None, help="step-size lr with --e2e-params all (default --e2e-lr)")
    p.add_argument("--e2e-batch", type=int, default=8, help="end to end: windows of 256 tokens per step")
    p.add_argument("--no-blockap", action="store_true", help="end to end straight from the start point")
    p.add_argument("--e2e-schedule", default="cosine", choices=("cosine", "constant"),
                   help="end-to-end lr after warm-up; constant gives a curve that can be extrapolated")
    p.add_argument("--e2e-eval-every", type=int, default=None, help="score the held-out text every N e2e steps")
    p.add_argument("--train-text", default="wiki-train", help="calibration and training text (a name or a file)")
    p.add_argument("--device", default="cpu", help="Block-AP's device (cpu, cuda); lowbit train picks the GPU itself")
    p.add_argument("--data", default="wiki-eval")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--work", default=None, help="stage folders (default runs/blockwise-B)")
    p.add_argument("--out", default="benchmarks/results/blockwise.json")
    p.add_argument("--md", default="benchmarks/results/blockwise.md")
    p.add_argument("--tag", default=None, help="suffix of this run's key in the results (beside other runs at the same bits)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: refit every stored run's extrapolation, rewrite --md and its plot from --out")
    args = p.parse_args()
    if args.report_only:
        from lowbit.quant.quantizers import parse_bits

        results = json.loads(Path(args.out).read_text())
        for rec in results["runs"].values():
            if rec.get("e2e_curve"):  # the run's own flags say which target applies
                run = p.parse_args(shlex.split(rec["command"])[2:])
                run.bits = None if run.bits is None else parse_bits(run.bits)
                rec["extrapolation"] = fit_record(rec, target_kl(run))
        Path(args.out).write_text(json.dumps(results, indent=2))
        write_markdown(Path(args.md), results)
        write_plot(Path(args.md).with_suffix(".png"), results)
        return
    if args.bits is None and args.budget_bpw is None:
        p.error("give --budget-bpw B or --bits BITS (or --report-only)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from lowbit.api import load

    if args.bits is not None:
        from lowbit.quant.quantizers import parse_bits

        args.bits = parse_bits(args.bits)
    name = f"{args.budget_bpw:g}" if args.bits is None else f"{args.bits:g}b-g{args.group_size or 'channel'}"
    key = f"{name}{'-rot' if args.rotate else ''}{'-' + args.tag if args.tag else ''}"
    work = Path(args.work or f"runs/blockwise-{key}")
    work.mkdir(parents=True, exist_ok=True)
    fp, tokenizer, _ = load(args.model)
    score = Scorer(fp, tokenizer, args.data, args.eval_tokens)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    commit = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()
    rec = {"command": shlex.join(["python", *sys.argv]), "commit": commit, "cpu": cpu_model(), "cpu_flags": " ".join(cpu_flags(BLOCKWISE_FLAGS)),
           "threads": torch.get_num_threads(), "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "date": time.strftime("%Y-%m-%d"), "model": args.model,
           "data": args.data, "train_text": args.train_text, "stages": []}  # fmt: skip

    def save():
        results["runs"][key] = rec
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        write_markdown(Path(args.md), results)
        write_plot(Path(args.md).with_suffix(".png"), results)

    rec["stages"].append(stage_budget(args, work, score))
    print(json.dumps(rec["stages"][-1]), flush=True)
    save()
    if not args.no_blockap:
        stage, rec["blocks"] = stage_blockap(args, work, fp, score)
        rec["stages"].append(stage)
        print(json.dumps(stage), flush=True)
        save()
    if args.e2e_steps:
        stage, rec["e2e_curve"] = stage_e2e(args, work, score)
        rec["stages"].append(stage)
        rec["extrapolation"] = fit_record(rec, target_kl(args))
        print(json.dumps(stage), flush=True)
        save()


if __name__ == "__main__":
    main()
