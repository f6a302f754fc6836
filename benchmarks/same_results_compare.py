"""Compare two runs of benchmarks/same_results.sh: eval numbers, stored tensors (bit for bit) and GGUF bytes."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

a, b = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("rtn4g128", "gptq3g128", "budget35"):
    ea, eb = (json.loads((d / f"{name}.eval.json").read_text()) for d in (a, b))
    keys = ("kl_to_reference", "perplexity", "top1_agreement", "total_bytes", "bits_per_weight_linear")
    same = {k: ea[k] == eb[k] for k in keys}
    ta, tb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
    tens = sorted(ta) == sorted(tb) and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    ia, ib = (json.loads((d / name / "lowbit.json").read_text())["info"] for d in (a, b))
    print(f"{name}: KL {ea['kl_to_reference']:.6g} vs {eb['kl_to_reference']:.6g}; ppl {ea['perplexity']:.6g} vs {eb['perplexity']:.6g}; "
          f"bytes {ea['total_bytes']} vs {eb['total_bytes']}; eval equal: {all(same.values())}; tensors bit-equal: {tens}; "
          f"streamed old/new: {ia.get('streamed', False)}/{ib.get('streamed', False)}")
ga, gb = (json.loads((d / "export.json").read_text()) if (d / "export.json").stat().st_size else None for d in (a, b))
print("gguf export json equal (minus paths):", {k: v for k, v in (ga or {}).items() if "path" not in k and k != "out"} == {k: v for k, v in (gb or {}).items() if "path" not in k and k != "out"})
print("gguf bytes equal:", (a / "rtn4g128.gguf").read_bytes() == (b / "rtn4g128.gguf").read_bytes() if (a / "rtn4g128.gguf").exists() and (b / "rtn4g128.gguf").exists() else "missing")
