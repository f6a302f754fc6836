"""Speed of lowbit's packed runtime beside llama.cpp, in one run (``bench_llamacpp.py --speed``).

Subjects, all from the default model (SmolLM2-135M):

* lowbit folders exported to GGUF with every tensor exact (``q4g32`` -> Q4_0; ``ternary-ch`` ->
  TQ2_0 + Q4_0 where rows do not fit TQ2_0's 256-value blocks): lowbit on the folder, llama.cpp on
  the file, **repacking on** (as its users run it) **and off**;
* llama.cpp's own quantizations of the fp32 model (``llama_model_quantize``, its defaults): Q4_0,
  Q2_K, TQ2_0, IQ4_NL, Q4_K_M, repacking on and off; the fastest is "llama.cpp's fastest own type";
* lowbit's own 2-bit and ternary settings (per channel, RTN), with the fp16 head and with an 8-bit
  head (``--quantize-embeddings --override embeddings=8``; llama.cpp's own types store the tied
  head as Q8_0).

lowbit's rows also give the resident memory of a fresh process that loads the folder and decodes 24
tokens on lowbit's loop, over the bytes the folder stores (:func:`lowbit.runtime.resident.measure_resident`);
``ternary-ch-u2-head8`` stores its ternary codes at 2 bits (``--ternary-storage u2``), which the
runtime reads in place (the default 1.6-bit t5 codes are unpacked to 2 bits in memory).

Each engine: decode (``--decode-tokens`` after a 16-token prompt, teacher-forced, batch 1) and
prefill of a ``--prefill-tokens`` prompt (last position's logits only, as both engines do by
default), best and median of ``--reps`` timed runs after one warm-up; every engine with the same
thread count. All engines are loaded first and timed round-robin (each round runs every engine
once, the order rotated each round): this shared VM's speed drifts by tens of percent within a run,
and round-robin spreads that drift over every engine, so the ratios compare like with like. Bytes read per token: every weight tensor the file stores (the tied embedding is read
whole as the output head; one embedding row besides). The memory-bandwidth bound is that over the
read bandwidth measured in the same run (a torch sum over 512 MB).

On CPUs with AMX, llama.cpp's "repack on" is its CPU_REPACK buffer for every Q4_0 / IQ4_NL / Q4_K
tensor without the AMX buffer, whose matmul segfaults in llama-cpp-python 0.3.36
(:func:`lowbit.peers.llamacpp.repack_mode` says which ran).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_flags, cpu_model  # noqa: E402

FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512bw", "amx_int8", "amx_tile", "f16c", "fma")
# (name, quantize arguments, export to GGUF for llama.cpp)
LOWBIT_FOLDERS = [
    ("q4g32", ["--bits", "4", "--group-size", "32", "--scale-search", "none"], True),
    ("ternary-ch", ["--bits", "ternary"], True),
    ("2bit-ch", ["--bits", "2"], False),
    ("2bit-ch-head8", ["--bits", "2", "--quantize-embeddings", "--override", "embeddings=8"], False),
    ("ternary-ch-head8", ["--bits", "ternary", "--quantize-embeddings", "--override", "embeddings=8"], False),
    ("ternary-ch-u2-head8", ["--bits", "ternary", "--ternary-storage", "u2", "--quantize-embeddings", "--override",
                             "embeddings=8"], False),
]
OWN_TYPES = ("Q4_0", "Q2_K", "TQ2_0", "IQ4_NL", "Q4_K_M")


def _summary(runs: list[float]) -> dict:
    return {"best": round(max(runs), 1), "median": round(statistics.median(runs), 1), "runs": [round(r, 1) for r in runs]}


class LlamaCppEngine:
    """One llama.cpp model (repacking on or off), timed by :meth:`decode` / :meth:`once`."""

    def __init__(self, path: Path, threads: int, repack: bool, n_ctx: int):
        from lowbit.peers.llamacpp import open_llamacpp

        self.llm = open_llamacpp(path, n_ctx=n_ctx, n_threads=threads, logits_all=False, extra_bufts=repack)
        self.info = {"engine": "llama.cpp", "repack": self.llm.lowbit_repack}

    def decode(self, prompt: list[int], steps: list[int]) -> float:
        """tok/s of ``steps`` fed one at a time after ``prompt`` (teacher-forced)."""
        self.llm.reset()
        self.llm.eval(prompt)
        t0 = time.perf_counter()
        for tok in steps:
            self.llm.eval([tok])
        return len(steps) / (time.perf_counter() - t0)

    def prefill(self, long: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(long)
        return len(long) / (time.perf_counter() - t0)

    def once(self, prompt: list[int], steps: list[int], long: list[int]) -> tuple[float, float]:
        return self.decode(prompt, steps), self.prefill(long)

    def close(self) -> None:
        self.llm.close()


class LowbitEngine:
    """A packed model (``lowbit.runtime.packed.load_packed``) on lowbit's decode loop, timed by
    :meth:`decode` / :meth:`once`."""

    def __init__(self, model, n_ctx: int):
        from lowbit.runtime.decoder import Decoder

        self.model = model
        self.dec = Decoder(model, max_len=n_ctx)
        self.info = {"engine": "lowbit", "c_decode_step": self.dec.c_layers is not None}

    @classmethod
    def load(cls, folder: Path, n_ctx: int, activations: str = "int8") -> LowbitEngine:
        from lowbit.runtime.packed import load_packed

        return cls(load_packed(folder, verify=False, activations=activations)[0], n_ctx)

    def decode(self, prompt: list[int], steps: list[int]) -> float:
        dec = self.dec
        dec.reset()
        dec.forward(torch.tensor(prompt))
        toks = [torch.tensor([t]) for t in steps]
        t0 = time.perf_counter()
        for tok in toks:
            dec.forward(tok)
        return len(steps) / (time.perf_counter() - t0)

    def prefill(self, long: list[int]) -> float:
        self.dec.reset()
        lg = torch.tensor(long)
        t0 = time.perf_counter()
        self.dec.forward(lg)
        return len(long) / (time.perf_counter() - t0)

    def once(self, prompt: list[int], steps: list[int], long: list[int]) -> tuple[float, float]:
        return self.decode(prompt, steps), self.prefill(long)

    def close(self) -> None:
        del self.dec, self.model


def round_robin(engines: list, prompt, steps, long, reps: int) -> list[dict]:
    """Every engine warmed up once, then ``reps`` rounds in which each engine runs once (the order
    rotated by one each round), so that a machine whose speed drifts during the run (a shared 2-core
    VM does) slows every engine alike and the ratios stay comparable."""
    for e in engines:
        e.once(prompt, steps[:8], long[:64])
    decode = [[] for _ in engines]
    prefill = [[] for _ in engines]
    for rep in range(reps):
        order = list(range(len(engines)))
        order = order[rep % len(order):] + order[: rep % len(order)]
        print(f"round {rep + 1}/{reps}", flush=True)
        for i in order:
            d, p = engines[i].once(prompt, steps, long)
            decode[i].append(d)
            prefill[i].append(p)
    return [
        {**e.info, "decode": _summary(d), "prefill": _summary(p)}
        for e, d, p in zip(engines, decode, prefill, strict=True)
    ]


def _folder_bytes(folder: Path) -> int:
    """Bytes of every tensor the folder stores (its safetensors headers, lowbit.store.stfile's reader)."""
    from lowbit.store.stfile import MappedSafetensors

    return sum(end - begin for f in sorted(folder.glob("*.safetensors"))
               for _, _, begin, end in MappedSafetensors(f).entries.values())


def _quantize(folder: Path, args: list[str]) -> str:
    cmd = ["lowbit", "quantize", *args, "--method", "rtn", "--out", str(folder)]
    if not (folder / "lowbit.json").is_file():
        subprocess.run([sys.executable, "-m", "lowbit.cli", *cmd[1:]], check=True, capture_output=True)
    return " ".join(cmd)


def run(args, text_ids: list[int]) -> dict:
    from bench_matvec import memory_bandwidth

    from lowbit.eval.models import load_model
    from lowbit.gguf import export_gguf
    from lowbit.peers.llamacpp import gguf_account, quantize_gguf, repack_mode, write_fp_gguf
    from lowbit.runtime.resident import measure_resident

    work = Path(args.speed_dir)
    work.mkdir(parents=True, exist_ok=True)
    prompt, steps = text_ids[:16], text_ids[16 : 16 + args.decode_tokens]
    long = text_ids[: args.prefill_tokens]
    if len(long) < args.prefill_tokens:
        raise SystemExit(f"the text has {len(long)} tokens, fewer than --prefill-tokens {args.prefill_tokens}")
    out = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": cpu_model(), "flags": cpu_flags(FLAGS), "threads": args.threads,
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "repack_on_mode": repack_mode(True),
        "decode_tokens": len(steps), "prompt_tokens": len(prompt), "prefill_tokens": len(long),
        "reps": args.reps, "subjects": [],
    }
    print("preparing folders and GGUF files", flush=True)
    fp32 = work / "fp32.gguf"
    if not fp32.is_file():
        model, tok = load_model()
        write_fp_gguf(model, tok, fp32, "smollm2-135m")
        del model
    subjects = []
    for name, qargs, export in LOWBIT_FOLDERS:
        folder = work / name
        cmd = _quantize(folder, qargs)
        gguf = None
        if export:
            gguf = work / f"{name}.gguf"
            if not gguf.is_file():
                export_gguf(folder, gguf, fallback="f16", ternary="tq2_0")
        subjects.append({"name": name, "kind": "lowbit", "folder": str(folder), "made_by": cmd,
                         "stored_bytes": _folder_bytes(folder), "gguf": None if gguf is None else str(gguf)})
    for t in OWN_TYPES:
        gguf = work / f"own-{t}.gguf"
        if not gguf.is_file():
            quantize_gguf(fp32, gguf, t, threads=args.threads)
        subjects.append({"name": f"llama.cpp {t}", "kind": "own", "gguf": str(gguf)})
    for s in subjects:
        if s["gguf"]:
            acc = gguf_account(s["gguf"])
            s["gguf_bytes"] = acc["total_bytes"]
            s["gguf_linear_types"] = acc["gguf_linear_types"]
    bw = memory_bandwidth()
    out["bandwidth_GBps"] = round(bw["GBps_median"], 1)
    print(f"memory read bandwidth {out['bandwidth_GBps']} GB/s", flush=True)
    n_ctx = max(1024, len(long) + len(steps) + 32)
    engines, owners = [], []
    for s in subjects:
        s["runs"] = []
        if s["gguf"]:
            for repack in (True, False):
                engines.append(LlamaCppEngine(Path(s["gguf"]), args.threads, repack, n_ctx))
                owners.append(s)
        if s["kind"] == "lowbit":
            engines.append(LowbitEngine.load(Path(s["folder"]), n_ctx))
            owners.append(s)
    print(f"{len(engines)} engines loaded; timing them round-robin", flush=True)
    for s, r in zip(owners, round_robin(engines, prompt, steps, long, args.reps), strict=True):
        r["bytes_per_token"] = s["gguf_bytes"] if r["engine"] == "llama.cpp" else s["stored_bytes"]
        r["bandwidth_bound_fraction"] = round(
            r["decode"]["median"] * r["bytes_per_token"] / (out["bandwidth_GBps"] * 1e9), 3
        )
        s["runs"].append(r)
        print(s["name"], json.dumps(r), flush=True)
    for e in engines:
        e.close()
    del engines
    for s in subjects:  # resident memory: a fresh process each, after the timings
        for r in s["runs"]:
            if r["engine"] == "lowbit":
                mem = measure_resident("packed", s["folder"], "int8", args.threads, "u2", "lowbit")
                r["resident_bytes"] = mem["resident_bytes_after_decode"]
                r["resident_over_stored"] = round(mem["resident_bytes_after_decode"] / s["stored_bytes"], 3)
    out["subjects"] = subjects
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["ratios"] = ratios(subjects)
    return out


def _run(subjects, name, engine, repack=None):
    for s in subjects:
        if s["name"] == name:
            for r in s["runs"]:
                if r["engine"] == engine and (repack is None or (r.get("repack") != "off") == repack):
                    return r
    return None


def ratios(subjects) -> dict:
    """The issue's ratios (medians): lowbit vs llama.cpp with repacking on."""
    own = [(s["name"], _run(subjects, s["name"], "llama.cpp", True)) for s in subjects if s["kind"] == "own"]
    fastest_name, fastest = max(own, key=lambda x: x[1]["decode"]["median"])
    out = {"llamacpp_fastest_own_type": fastest_name, "llamacpp_fastest_own_decode": fastest["decode"]["median"]}
    for name in ("2bit-ch", "2bit-ch-head8", "ternary-ch", "ternary-ch-head8", "ternary-ch-u2-head8"):
        r = _run(subjects, name, "lowbit")
        out[f"decode {name} / fastest own"] = round(r["decode"]["median"] / fastest["decode"]["median"], 2)
    for name in ("q4g32", "ternary-ch"):
        lb, lc = _run(subjects, name, "lowbit"), _run(subjects, name, "llama.cpp", True)
        out[f"decode {name} / llama.cpp same weights"] = round(lb["decode"]["median"] / lc["decode"]["median"], 2)
        out[f"prefill {name} / llama.cpp same weights"] = round(lb["prefill"]["median"] / lc["prefill"]["median"], 2)
    return out


def write_md(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [
        "# lowbit vs llama.cpp: decode and prefill, one run",
        "",
        f"Generated by `{res['command']}`. CPU: {m['cpu']}; flags: {', '.join(m['flags'])}; {m['threads']} threads; "
        f"load average at start {m['loadavg_start']}, at end {m['loadavg_end']}. Memory read bandwidth measured in "
        f"the run: {res['bandwidth_GBps']} GB/s. llama.cpp repacking 'on' ran as `{res['repack_on_mode']}` "
        "(see the notes). Decode: "
        f"{res['decode_tokens']} tokens after a {res['prompt_tokens']}-token prompt; prefill: a "
        f"{res['prefill_tokens']}-token prompt; best and median of {res['reps']} runs (tok/s); ratios use medians.",
        "",
        "| subject | engine | repack | bytes / token (MB) | decode best | decode median | prefill best | "
        "prefill median | decode / bandwidth bound | resident / stored |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["subjects"]:
        for r in s["runs"]:
            resident = f"{r['resident_over_stored']:.2f}" if "resident_over_stored" in r else "-"
            lines.append(
                f"| {s['name']} | {r['engine']} | {r.get('repack', '-')} | {r['bytes_per_token'] / 1e6:.1f} | "
                f"{r['decode']['best']} | {r['decode']['median']} | {r['prefill']['best']} | {r['prefill']['median']} | "
                f"{r['bandwidth_bound_fraction']:.0%} | {resident} |"
            )
    lines += ["", "## Ratios (medians)", "", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in res["ratios"].items()]
    lines += ["", "## How the subjects were made", ""]
    for s in res["subjects"]:
        if s["kind"] == "lowbit":
            extra = f"; GGUF linears {s['gguf_linear_types']}" if s.get("gguf") else ""
            lines.append(f"- {s['name']}: `{s['made_by']}` ({s['stored_bytes'] / 1e6:.1f} MB stored{extra})")
        else:
            lines.append(f"- {s['name']}: llama_model_quantize of the fp32 GGUF; linears {s['gguf_linear_types']}")
    lines += ["", "## Notes", "", __doc__.split("\n\n", 1)[1].strip()]
    path.write_text("\n".join(lines) + "\n")
