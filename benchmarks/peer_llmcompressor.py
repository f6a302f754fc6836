"""GPTQ from llmcompressor on the default model, scored with lowbit's evaluator: a peer point per scheme.

Runs in a Python environment that has llmcompressor (it pins its own transformers), e.g.::

    python -m venv --system-site-packages /opt/peers
    /opt/peers/bin/pip install llmcompressor==0.14.0.1 -c <(echo torch==2.13.0)
    /opt/peers/bin/python benchmarks/peer_llmcompressor.py --schemes w4g64-sym w4g64-asym

llmcompressor runs as its users run it: ``oneshot`` + ``GPTQModifier`` with its defaults (static
act-order, damping 0.01, block 128, min-max observer, sequential onloading), calibration on
``--calib-windows`` random windows of 512 tokens of ``wiki-calib``; ``lm_head`` ignored (tied
embedding kept in full precision, as lowbit's default). Quality: KL(P_fp || P_q) per token and
top-1 agreement on ``--data`` (held out; not the calibration text) with ``lowbit.evaluation``.
Bytes: counted on the tensors llmcompressor actually writes (``save_compressed=True``) for the
decoder linears (packed weights, scales, zero points, g_idx if any).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

SCHEMES = {  # name -> (bits, group, symmetric)
    "w4g64-sym": (4, 64, True),
    "w4g64-asym": (4, 64, False),
    "w4g128-sym": (4, 128, True),
    "w3g64-sym": (3, 64, True),
    "w3g64-asym": (3, 64, False),
    "w2g64-sym": (2, 64, True),
    "w2g64-asym": (2, 64, False),
}


def recipe(bits: int, group: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def calibration_dataset(tokenizer, n_windows: int, seq_len: int, seed: int):
    from datasets import Dataset

    from lowbit.data import get_text, tokenize_windows, tokenizer_adds_bos

    windows = tokenize_windows(tokenizer, get_text("wiki-calib"), seq_len, bos=tokenizer_adds_bos(tokenizer))
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n_windows]
    ids = windows[pick].tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in ids]}), len(ids) * seq_len


def decoder_linears(model) -> dict[str, int]:
    """Decoder linear layer names and their weight counts (taken before saving: saving compresses in place)."""
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def linear_bytes(folder: Path, names: set[str]) -> int:
    """Bytes llmcompressor stored for the decoder linears ``names``."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key.rpartition(".")[0] in names:
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def run_scheme(name: str, args, reference_cache, tokenizer) -> dict:
    from llmcompressor import oneshot

    from lowbit.api import load
    from lowbit.evaluation import evaluate

    bits, group, symmetric = SCHEMES[name]
    model, _, _ = load(args.model)
    dataset, calib_tokens = calibration_dataset(tokenizer, args.calib_windows, 512, args.seed)
    t0 = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe(bits, group, symmetric),
            max_seq_length=512, num_calibration_samples=args.calib_windows)
    seconds = time.time() - t0
    with torch.inference_mode():
        quality = evaluate(model, reference_cache.windows, reference=reference_cache, progress=False)
    linears = decoder_linears(model)
    params = sum(linears.values())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        stored = linear_bytes(Path(tmp), set(linears))
    return {
        "peer": "llmcompressor",
        "scheme": name,
        "bits": bits,
        "group_size": group,
        "symmetric": symmetric,
        "linear_bytes": stored,
        "linear_params": params,
        "bits_per_weight_linear": 8 * stored / params,
        "kl_to_reference": quality["kl_to_reference"],
        "top1_agreement": quality["top1_agreement"],
        "perplexity": quality["perplexity"],
        "tokens": quality["tokens"],
        "calib_tokens": calib_tokens,
        "quantize_seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--schemes", nargs="+", default=["w4g64-sym", "w4g64-asym"], choices=sorted(SCHEMES))
    p.add_argument("--data", default="wiki-eval", help="held-out eval text")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--calib-windows", type=int, default=128, help="random 512-token windows of wiki-calib")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/peer_llmcompressor.json")
    args = p.parse_args()

    import llmcompressor

    from lowbit.api import load
    from lowbit.data import get_text, tokenize_windows, tokenizer_adds_bos
    from lowbit.evaluation import cache_reference

    fp, tokenizer, _ = load(args.model)
    windows = tokenize_windows(tokenizer, get_text(args.data), 512, max_tokens=args.eval_tokens,
                               bos=tokenizer_adds_bos(tokenizer))
    with torch.inference_mode():
        cache = cache_reference(fp, windows, progress=False)
    del fp
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"points": []}
    for name in args.schemes:
        point = run_scheme(name, args, cache, tokenizer)
        point.update(model=args.model, data=args.data, llmcompressor=llmcompressor.__version__,
                     cpu=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"))
        print(json.dumps(point))
        results["points"] = [q for q in results["points"] if q["scheme"] != name or q["data"] != args.data] + [point]
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
