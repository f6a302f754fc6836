"""Streaming vs in-memory quantization: peak resident memory and wall-clock of ``lowbit quantize``.

    python benchmarks/bench_streaming.py                 # random 1.1 B Llama (TinyLlama shapes), bf16 shards
    python benchmarks/bench_streaming.py --tiny          # small shapes: checks that the script works

Builds a random Llama (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000;
2.2 GB in bf16) as a sharded Hugging Face folder, one decoder block at a time (one shard per block,
written with safetensors, never the whole model in memory), with a BPE tokenizer trained on the
calibration text. Then runs ``lowbit quantize`` (RTN and GPTQ, 4-bit g128) with ``--stream`` and
with ``--no-stream``, each in its own process, and records each run's peak RSS (``os.wait4``'s
``ru_maxrss`` of that process) and wall-clock, and whether the two folders store identical tensors.
Writes ``benchmarks/results/streaming.json`` and ``.md`` (``--tiny``: under ``--work`` instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_flags, cpu_model  # noqa: E402

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # fmt: skip
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512)  # fmt: skip


def _tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_model(path: Path, shapes: dict, calib: str, seed: int = 0) -> None:
    """A random Llama as bf16 safetensors shards, one per decoder block (+ one for embedding, norm and
    head): the skeleton is built on the meta device, each tensor drawn N(0, 0.02) (norms 1) when written."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.eval.data import get_text

    if (path / "model.safetensors.index.json").is_file():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**shapes, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name, _ in skeleton.named_parameters():
        parts = name.split(".")
        key = f"block{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append(name)
    params = dict(skeleton.named_parameters())
    weight_map, total = {}, 0
    n = len(groups)
    for i, (_, names) in enumerate(sorted(groups.items())):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            shape = params[name].shape
            t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg.save_pretrained(tmp)
    _tokenizer(get_text(calib)[:2_000_000], min(shapes["vocab_size"], 8192)).save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def run_quantize(model: Path, out: Path, method: str, stream: bool, extra: list[str], threads: int | None) -> dict:
    """One ``lowbit quantize`` in a fresh process: its peak RSS (``os.wait4``'s ``ru_maxrss`` of that
    very process, KiB on Linux) and wall-clock."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", *(["--threads", str(threads)] if threads else []), "quantize",
           "--model", str(model), "--bits", "4", "--group-size", "128", "--method", method,
           "--stream" if stream else "--no-stream", "--out", str(out), "--json", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = out.with_name(out.name + ".log")
    with open(log, "wb") as err, open(log.with_suffix(".json"), "wb") as res:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=res, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    record = json.loads(log.with_suffix(".json").read_text())
    return {"method": method, "stream": stream, "wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "quantize_seconds": record.get("quantize_seconds"), "total_bytes": record.get("total_bytes")}  # fmt: skip


def identical(a: Path, b: Path) -> bool:
    """Whether two quantized folders store the same tensors (read tensor by tensor, mapped)."""
    from lowbit.store.stfile import MappedSafetensors

    fa, fb = MappedSafetensors(a / "model.safetensors"), MappedSafetensors(b / "model.safetensors")
    if sorted(fa.keys()) != sorted(fb.keys()):
        return False
    return all(fa.get(k).dtype == fb.get(k).dtype and torch.equal(fa.get(k), fb.get(k)) for k in fa.keys())


def write_results(results: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    gib = 2**30
    cpu = results.get("cpu", results["machine"])
    flags = ", ".join(results.get("cpu_flags", []))
    g = results["gptq"]
    lines = [
        f"# Streaming quantization: {results['model']}",
        "",
        f"Random Llama, {results['params'] / 1e9:.2f} B parameters, bf16 shards ({results['checkpoint_bytes'] / gib:.2f} GiB); "
        f"4-bit g128 (RTN, and GPTQ on {g['calib_tokens']:,} {g['calib']} tokens in windows of {g['seq_len']}); "
        f"{cpu}{f' ({flags})' if flags else ''}, {results['machine']}. Peak RSS of each `lowbit quantize` process "
        "(`os.wait4`), GB = 10^9 bytes; output = bytes of the weights file written.",
        "",
        "| method | mode | peak RSS (GB) | wall-clock (s) | output (MB) | same tensors |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        same = results["identical"][r["method"]]
        rss = r["peak_rss_bytes"] / 1e9 if r["peak_rss_bytes"] else float("nan")
        mode = "--stream" if r["stream"] else "in memory"
        out = f"{r['total_bytes'] / 1e6:.1f}" if r.get("total_bytes") else "-"
        lines.append(f"| {r['method']} | {mode} | {rss:.2f} | {r['wall_s']:.1f} | {out} | {'yes' if same else 'NO'} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n\nCommand: `" + results["command"] + "`\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes (checks the script; numbers mean nothing)")
    p.add_argument("--work", default=None, help="folder for the model and outputs (default benchmarks/work/streaming)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    p.add_argument("--calib", default="wiki-calib")
    p.add_argument("--calib-tokens", type=int, default=None, help="GPTQ calibration tokens (default 16384; tiny 512)")
    p.add_argument("--seq-len", type=int, default=None, help="GPTQ window length (default 512; tiny 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of each quantize run")
    p.add_argument("--results", default=None, help="results path prefix (default benchmarks/results/streaming)")
    args = p.parse_args(argv)
    work = Path(args.work or ROOT / "benchmarks" / "work" / ("streaming-tiny" if args.tiny else "streaming"))
    prefix = Path(args.results) if args.results else (work / "streaming" if args.tiny else ROOT / "benchmarks/results/streaming")
    shapes = TINY if args.tiny else FULL
    model = work / ("llama-tiny-bf16" if args.tiny else "llama-1.1b-bf16")
    build_model(model, shapes, args.calib)
    tokens = args.calib_tokens or (512 if args.tiny else 16384)
    seq = args.seq_len or (64 if args.tiny else 512)
    gptq = ["--calib", args.calib, "--calib-tokens", str(tokens), "--seq-len", str(seq)]
    runs, same = [], {}
    for method in args.methods:
        outs = {}
        for stream in (True, False):
            outs[stream] = work / f"out-{method}-{'stream' if stream else 'memory'}"
            r = run_quantize(model, outs[stream], method, stream, gptq if method == "gptq" else [], args.threads)
            runs.append(r)
            print(json.dumps(r), flush=True)
        same[method] = identical(outs[True], outs[False])
    ckpt = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    from lowbit.store.stfile import Checkpoint

    params = Checkpoint(model).nbytes_as(torch.float32) // 4
    write_results({
        "model": model.name, "shapes": shapes, "params": params, "checkpoint_bytes": ckpt,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
        "cpu": cpu_model(), "cpu_flags": cpu_flags(["avx2", "avx512f", "avx512_vnni", "amx_int8"]),
        "command": "python benchmarks/bench_streaming.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gptq": {"calib": args.calib, "calib_tokens": tokens, "seq_len": seq}, "runs": runs, "identical": same,
    }, prefix)  # fmt: skip
    print(f"wrote {prefix.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
