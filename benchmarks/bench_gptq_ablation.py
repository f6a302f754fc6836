"""GPTQ ablation on the default model: 4-bit g64 (symmetric LSQ grid), KL to fp32 on 8,192 wiki-eval tokens.

    python benchmarks/bench_gptq_ablation.py v0 v1 v2 v3 >> benchmarks/results/gptq_ablation.jsonl

v0: GPTQ as before (first 16k tokens of wiki-calib, no act-order); v1: act-order (static groups);
v2: + true-sequential stages; v3: + 128 random 512-token windows of wiki-train (65k tokens);
v4: v3 on the asymmetric min-max grid; r0: RTN. One JSON line per variant (s: quantize seconds).
"""

import copy
import json
import sys
import time

import torch

import lowbit
from lowbit.eval.data import get_text, tokenize_windows
from lowbit.eval.evaluation import cache_reference, evaluate
from lowbit.ptq.methods import GPTQ, RTN
from lowbit.quant.surgery import QuantConfig

RANDOM_65K = {"calib": "wiki-train", "calib_tokens": 65536, "sample": "random"}
VARIANTS = {
    "v0": ("auto", GPTQ(act_order=False)),
    "v1": ("auto", GPTQ(act_order=True)),
    "v2": ("auto", GPTQ(act_order=True, sequential=True)),
    "v3": ("auto", GPTQ(act_order=True, sequential=True, **RANDOM_65K)),
    "v4": ("minmax", GPTQ(act_order=True, sequential=True, **RANDOM_65K)),
    "r0": ("auto", RTN()),
}


def main(names: list[str]) -> None:
    fp, tok, _ = lowbit.load("smollm2-135m")
    windows = tokenize_windows(tok, get_text("wiki-eval"), 512, max_tokens=8192)
    with torch.inference_mode():
        cache = cache_reference(fp, windows, progress=False)
    for name in names:
        quantizer, method = VARIANTS[name]
        model = copy.deepcopy(fp)
        t0 = time.time()
        lowbit.quantize(model, QuantConfig(bits=4, group_size=64, quantizer=quantizer), method, tokenizer=tok,
                        progress=False)
        seconds = time.time() - t0
        with torch.inference_mode():
            r = evaluate(model, windows, reference=cache, progress=False)
        size = lowbit.size_account(model)
        print(json.dumps({"v": name, "m": repr(method), "quantizer": quantizer, "kl": round(r["kl_to_reference"], 4),
                          "top1": round(r["top1_agreement"], 4), "ppl": round(r["perplexity"], 3),
                          "bpw_lin": round(size["bits_per_weight_linear"], 4), "s": round(seconds)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
