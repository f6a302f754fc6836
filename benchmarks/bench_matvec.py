"""Batch-1 matvec speed of PackedLinear (lowbit C kernels) against fp32 ``F.linear``.

For 4096x4096 and 2048x2048 weights it times fp32 ``F.linear`` and PackedLinear in every layout
and reports milliseconds, speedup over fp32 and the bytes of weight read per second. The same
run measures the machine's memory read bandwidth (a torch sum over a 512 MB tensor), the
physical limit of a memory-bound matvec.

Two clocks, because the machine is shared:
- wall: wall-clock time with ``--threads`` threads (default 2), median and 10th percentile of
  ``--reps`` calls after warm-up. With other jobs running, a call waits whenever one of its
  threads is descheduled, so the median then measures the scheduler; the 10th percentile is
  the unloaded time.
- cpu1: CPU time of one thread (``time.thread_time``), median: insensitive to other jobs.
All callables of a table take turns in short blocks of calls, so background load hits them alike.

Two cache regimes:
- hot: the same weight every call, as a micro-benchmark usually does. When the last-level
  cache holds the fp32 matrix (64 MB), fp32 then runs from cache, not from memory.
- cold: each call uses the next of several copies of the weight, together larger than the
  last-level cache, so every call reads its weight from memory, as a model larger than the
  cache does for every generated token.

Every u1/u2/u4/u8 format is timed twice: exact float32 activations, and "int8-act"
(``PackedLinear.activations = "int8"``: the input rounded to int8 per 32 columns, integer dot
products with VNNI / vpmaddubsw, as llama.cpp's CPU matvec does).

A batch sweep (PackedLinear forward, which switches to dequantize + GEMM above
``KERNEL_MAX_BATCH`` rows) shows where the matvec kernel stops paying off.

Usage: python benchmarks/bench_matvec.py [--threads 2] [--out benchmarks/results/matvec.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_flags, cpu_model

from lowbit.quant.quantizers import QuantizedWeight
from lowbit.runtime import kernels
from lowbit.runtime.packed_linear import KERNEL_MAX_BATCH, PackedLinear

# (label, layout, n_levels, group_size)
FORMATS = [
    ("8-bit u8 g128", "u8", 256, 128),
    ("4-bit u4 g32", "u4", 16, 32),
    ("4-bit u4 g128", "u4", 16, 128),
    ("4-bit u4 per-channel", "u4", 16, None),
    ("3-bit u3 g128", "u3", 8, 128),
    ("2-bit u2 g128", "u2", 4, 128),
    ("2-bit u2 per-channel", "u2", 4, None),
    ("ternary u2 per-channel", "u2", 3, None),
    ("ternary t5 per-channel", "t5", 3, None),
    ("1-bit u1 per-channel", "u1", 2, None),
]
# The same weights through the int8-activation kernels (PackedLinear activations="int8"): x rounded
# to int8 per 32 columns, integer dot products; layouts u1/u2/u4/u8 only.
INT8 = " int8-act"
FORMATS += [(label + INT8, lay, lv, g) for label, lay, lv, g in FORMATS if lay in ("u1", "u2", "u4", "u8")]
COLD_FORMATS = ["4-bit u4 g128", "2-bit u2 per-channel", "ternary u2 per-channel", "ternary t5 per-channel"]
COLD_FORMATS += [f + INT8 for f in COLD_FORMATS if "t5" not in f]
SWEEP_FORMATS = ["4-bit u4 g128", "2-bit u2 per-channel", "4-bit u4 g128" + INT8, "2-bit u2 per-channel" + INT8]
FP32 = "fp32 F.linear"


# ------------------------------------------------------------------------------ machine


MATVEC_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")


def llc_bytes() -> int | None:
    """Last-level cache size as the OS reports it (a VM may report the host's)."""
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            size = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        value = int(size.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        if best is None or level >= best[0]:
            best = (level, value)
    return best[1] if best else None


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    kernels.set_num_threads(n)


# ------------------------------------------------------------------------------ timing


def timed_round_robin(fns: dict, reps: int, warmup: int = 10, clock=time.perf_counter, block: int = 1) -> dict:
    """Median and 10th percentile (ms) of ``reps`` calls of each callable. The callables take
    turns in blocks of ``block`` timed calls, each block after one untimed call, so background
    load hits all of them alike while a block still sees its weight as warm as a loop would."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(max(1, reps // block)):
        for name, fn in fns.items():
            if block > 1:
                fn()
            for _ in range(block):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {
        name: {"ms_median": 1e3 * statistics.median(t), "ms_p10": 1e3 * sorted(t)[len(t) // 10]}
        for name, t in times.items()
    }


def measure(fns: dict, reps: int, threads: int, block: int = 1) -> dict:
    """{name: {wall_ms_median, wall_ms_p10, cpu1_ms_median}}."""
    set_threads(threads)
    wall = timed_round_robin(fns, reps, block=block)
    set_threads(1)
    cpu1 = timed_round_robin(fns, max(10, reps // 4), warmup=3, clock=time.thread_time, block=min(block, 5))
    set_threads(threads)
    return {
        name: {
            "wall_ms_median": wall[name]["ms_median"],
            "wall_ms_p10": wall[name]["ms_p10"],
            "cpu1_ms_median": cpu1[name]["ms_median"],
        }
        for name in fns
    }


def memory_bandwidth(mbytes: int = 512, reps: int = 10) -> dict:
    """GB/s of a torch sum over an ``mbytes`` float32 tensor (from the median and the p10 time)."""
    t = torch.empty(mbytes * 2**20 // 4).uniform_()
    r = timed_round_robin({"sum": t.sum}, reps, warmup=2)["sum"]
    gb = mbytes * 2**20 / 1e9
    return {"GBps_median": gb / (r["ms_median"] / 1e3), "GBps_p10": gb / (r["ms_p10"] / 1e3)}


# ------------------------------------------------------------------------------ weights


def random_quantized(n: int, n_levels: int, group_size: int | None, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size is None else -(-n // group_size)
    codes = torch.randint(0, n_levels, (n, n), generator=g, dtype=torch.uint8)
    step = (torch.rand(n, n_groups, generator=g) * 0.01 + 0.001).half().float()
    zero = torch.full((n, n_groups), (n_levels - 1) / 2)
    return QuantizedWeight(codes, step, zero, group_size, n_levels, 0.0, "bench")


def make_layer(label: str, layout: str, n_levels: int, group_size: int | None, n: int) -> PackedLinear:
    layer = PackedLinear.from_quantized(random_quantized(n, n_levels, group_size), layout=layout)
    layer.activations = "int8" if label.endswith(INT8) else "float"
    return layer


def layer_copy(layer: PackedLinear) -> PackedLinear:
    b = layer._buffers
    copy = PackedLinear(
        b["packed"].clone(),
        b["step"].clone(),
        b["zero"].clone(),
        layer.in_features,
        layer.group_size,
        layer.layout,
        layer.n_levels,
        layer.bits,
        layer.quantizer,
    )
    copy.activations = layer.activations
    return copy


def rotating(items: list, call):
    """A callable that applies ``call`` to the next item each time (cold-cache timing)."""
    state = {"i": 0}

    def fn():
        state["i"] = (state["i"] + 1) % len(items)
        return call(items[state["i"]])

    return fn


# ------------------------------------------------------------------------------ benchmarks


def bench_shape(n: int, args, bandwidth: float, results: list) -> None:
    x = torch.randn(1, n)
    w32 = torch.randn(n, n)
    layers = {label: make_layer(label, lay, lv, g, n) for label, lay, lv, g in FORMATS}
    for label, layer in layers.items():  # the int8 rows must run the int8 kernel, not a fallback
        assert layer.uses_int8(x) == label.endswith(INT8), label
    nbytes = {FP32: w32.numel() * 4} | {label: layer.nbytes() for label, layer in layers.items()}
    cold_bytes = args.cold_mb * 2**20
    with torch.inference_mode():
        hot = {FP32: lambda: F.linear(x, w32)} | {label: (lambda m=m: m(x)) for label, m in layers.items()}
        runs = [("hot", measure(hot, args.reps, args.threads, block=10))]
        if cold_bytes and n >= 4096:  # one packed format at a time next to fp32: bounded memory
            copies = [w32] + [torch.randn(n, n) for _ in range(cold_bytes // nbytes[FP32])]
            cold_fp32 = rotating(copies, lambda w: F.linear(x, w))
            for label in COLD_FORMATS:
                m = layers[label]
                packed = rotating([m] + [layer_copy(m) for _ in range(cold_bytes // nbytes[label])], lambda c: c(x))
                runs.append(("cold", measure({FP32: cold_fp32, label: packed}, args.reps, args.threads)))
                del packed
            del copies, cold_fp32
    for regime, timings in runs:  # each table carries its own fp32 baseline, timed alongside
        base = timings[FP32]
        for label, r in timings.items():
            layer = layers.get(label)
            results.append(
                {
                    "shape": [n, n],
                    "batch": 1,
                    "format": label,
                    "layout": None if layer is None else layer.layout,
                    "activations": None if layer is None else layer.activations,
                    "group_size": None if layer is None else layer.group_size,
                    "regime": regime,
                    "bytes": nbytes[label],
                    "bits_per_weight": 8.0 * nbytes[label] / (n * n),
                    **r,
                    "speedup_wall_median": base["wall_ms_median"] / r["wall_ms_median"],
                    "speedup_wall_p10": base["wall_ms_p10"] / r["wall_ms_p10"],
                    "speedup_cpu1": base["cpu1_ms_median"] / r["cpu1_ms_median"],
                    "GBps_wall_p10": nbytes[label] / (r["wall_ms_p10"] / 1e3) / 1e9,
                    "memory_bound_ms": nbytes[label] / bandwidth / 1e6,
                }
            )


def batch_sweep(n: int, args, results: list) -> None:
    w32 = torch.randn(n, n)
    layers = {label: make_layer(label, lay, lv, g, n) for label, lay, lv, g in FORMATS if label in SWEEP_FORMATS}
    with torch.inference_mode():
        for batch in (1, 2, 4, 8, 16, 17, 24, 32, 64):
            x = torch.randn(batch, n)
            fns = {FP32: lambda x=x: F.linear(x, w32)} | {label: (lambda m=m, x=x: m(x)) for label, m in layers.items()}
            timings = measure(fns, max(10, args.reps // 5), args.threads, block=5)
            for label, r in timings.items():
                path = "GEMM" if label == FP32 else ("int8 kernel" if label.endswith(INT8) else "kernel") if batch <= KERNEL_MAX_BATCH else "dequantize+GEMM"
                results.append(
                    {
                        "shape": [n, n],
                        "batch": batch,
                        "format": label,
                        "path": path,
                        **r,
                        "speedup_wall_p10": timings[FP32]["wall_ms_p10"] / r["wall_ms_p10"],
                        "speedup_cpu1": timings[FP32]["cpu1_ms_median"] / r["cpu1_ms_median"],
                    }
                )


def markdown(report: dict) -> str:
    t = report["machine"]["threads"]
    lines = [
        f"| shape | format | cache | bits/w | wall {t}T median ms | wall {t}T p10 ms | speedup (p10) | "
        "cpu 1T ms | speedup (1T) | GB/s (p10) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["matvec"]:
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['format']} | {r['regime']} | {r['bits_per_weight']:.2f} | "
            f"{r['wall_ms_median']:.3f} | {r['wall_ms_p10']:.3f} | {r['speedup_wall_p10']:.1f}x | "
            f"{r['cpu1_ms_median']:.3f} | {r['speedup_cpu1']:.1f}x | {r['GBps_wall_p10']:.1f} |"
        )
    lines += [
        "",
        f"| batch | format | path | wall {t}T p10 ms | speedup (p10) | cpu 1T ms | speedup (1T) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in report["batch_sweep"]:
        lines.append(
            f"| {r['batch']} | {r['format']} | {r['path']} | {r['wall_ms_p10']:.3f} | {r['speedup_wall_p10']:.1f}x | "
            f"{r['cpu1_ms_median']:.3f} | {r['speedup_cpu1']:.1f}x |"
        )
    return "\n".join(lines)


def isa_ab(n: int, args) -> list[dict]:
    """The int8 kernel's code paths this CPU has (256-bit AVX2 / AVX-VNNI / AVX512-VNNI tiles,
    512-bit tiles), on the same n x n weights in one round-robin: what each instruction set buys."""
    rows = []
    x = torch.randn(1, n)
    for label, layout, levels, group in (("4-bit u4 g128", "u4", 16, 128), ("2-bit u2 per-channel", "u2", 4, None)):
        layer = make_layer(label + INT8, layout, levels, group, n)
        w = layer.kernel_weight().struct
        isas = [name for name in kernels.Q8_ISA_NAMES.values() if name != "portable" and kernels.q8_isa_ok(name)]
        fns = {isa: (lambda isa=isa, w=w: kernels.linear_q8(x, w, isa=isa)) for isa in isas}
        timed = timed_round_robin(fns, args.reps, block=10)
        for isa in isas:
            rows.append({"format": label, "isa": isa, "ms_p10": timed[isa]["ms_p10"], "ms_median": timed[isa]["ms_median"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--cold-mb", type=int, default=768, help="MB of weight copies for the cold regime (0: skip)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "matvec.json")
    args = parser.parse_args()

    if not kernels.available():
        raise SystemExit("lowbit kernels are not available: nothing to benchmark")
    set_threads(args.threads)
    torch.manual_seed(0)
    bandwidth = memory_bandwidth()
    report = {
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": cpu_flags(MATVEC_FLAGS),
            "logical_cpus": os.cpu_count(),
            "last_level_cache_bytes": llc_bytes(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "kernel_isa": kernels.isa(),
            "kernel_int8_isa": kernels.q8_isa(),
            "kernel_openmp": kernels.has_openmp(),
            "load_average_at_start": os.getloadavg(),
        },
        "memory_read": bandwidth,
        "method": (
            f"batch 1; wall = wall clock with {args.threads} threads over {args.reps} calls after 10 warm-up "
            f"calls (median and 10th percentile); cpu1 = thread CPU time with 1 thread, median of "
            f"{max(10, args.reps // 4)} calls; callables take turns in blocks of 10 (hot) or 1 (cold) calls; "
            f"hot = same weight every call, cold = rotating over copies of the weight totalling about "
            f"{args.cold_mb} MB"
        ),
        "matvec": [],
        "batch_sweep": [],
    }
    for n in args.sizes:
        bench_shape(n, args, bandwidth["GBps_p10"], report["matvec"])
    batch_sweep(args.sizes[0], args, report["batch_sweep"])
    report["int8_isa_ab"] = isa_ab(args.sizes[0], args)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"memory read bandwidth (torch sum over 512 MB, {args.threads} threads): "
        f"{bandwidth['GBps_p10']:.1f} GB/s (p10 time), {bandwidth['GBps_median']:.1f} GB/s (median time)"
    )
    print(f"load average: {report['machine']['load_average_at_start']} -> {report['machine']['load_average_at_end']}")
    print(markdown(report))
    print("\n| format | int8 code path | p10 ms | median ms |\n|---|---|---:|---:|")
    for r in report["int8_isa_ab"]:
        print(f"| {r['format']} | {r['isa']} | {r['ms_p10']:.3f} | {r['ms_median']:.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
