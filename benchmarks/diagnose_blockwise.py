"""Why a Block-AP model can score a worse KL than its start: the numbers quoted in the README's "below 3.5
bits" section and docs/methods.md ("Block-AP"), on the first 8 calibration windows Block-AP trains on
(wiki-train, 512 tokens each, the same sample as BlockAP's defaults):

1. massive activations: the share of the residual stream's energy held by the first position, per layer;
2. per quantized folder: KL to the full-precision model, the relative error of the final hidden state
   (after the final norm), the ratio of logit standard deviations (quantized / full precision), and the KL
   at logit temperatures 0.5..1.1 (the best one says how much is only over- or under-confidence).

Writes ``benchmarks/results/blockwise_diagnosis.md``::

    python benchmarks/diagnose_blockwise.py runs/blockwise-1.58b-g64-rot/budget runs/blockwise-1.58b-g64-rot/blockap
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from pathlib import Path

TAUS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="quantized folders of the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--md", default="benchmarks/results/blockwise_diagnosis.md")
    args = p.parse_args()
    import torch

    from lowbit.api import load
    from lowbit.ptq.methods import calibration_windows
    from lowbit.quant.rotation import rotate_model_

    fp, tok, _ = load(args.model)
    ids = calibration_windows(tok, "wiki-train", 65536, 512, "random", 0)[:8]
    lines = ["# Block-AP diagnosis (`diagnose_blockwise.py`)", "", f"`{shlex.join(['python', *sys.argv])}`; "
             "the first 8 of Block-AP's calibration windows (wiki-train, 512 tokens each).", "",
             "## Massive activations", "", "| hidden state after layer | share of energy at position 0 |", "|---:|---:|"]  # fmt: skip
    with torch.no_grad():
        out = fp(ids, output_hidden_states=True)
        ref_logp = out.logits.float().log_softmax(-1)
        ref_std = out.logits.float().std(-1).mean()
        ref_final = out.hidden_states[-1]
        rotated = copy.deepcopy(fp)
        rotate_model_(rotated)  # rotated folders (seed 0, as lowbit quantize --rotate) keep a rotated stream
        rot_final = rotated(ids, output_hidden_states=True).hidden_states[-1]
        for i, h in enumerate(out.hidden_states[1:-1], start=1):
            e = h.double().pow(2)
            lines.append(f"| {i} | {(e[:, 0].sum() / e.sum()).item():.3f} |")
        lines += ["", "## Quantized folders", "",
                  "| folder | KL | final hidden relative error | logit std ratio | KL at temperature "
                  + " / ".join(f"{t:g}" for t in TAUS) + " |", "|---|---:|---:|---:|---|"]  # fmt: skip
        for folder in args.folders:
            m = load(folder)[0]
            o = m(ids, output_hidden_states=True)
            logits = o.logits.float()
            kls = [(ref_logp.exp() * (ref_logp - (logits * t).log_softmax(-1))).sum(-1).mean().item() for t in TAUS]
            h, r = o.hidden_states[-1], rot_final if m.lowbit_config.rotate else ref_final
            rel = ((h - r).double().pow(2).sum() / r.double().pow(2).sum()).item()
            std = (logits.std(-1).mean() / ref_std).item()
            lines.append(f"| {folder} | {kls[TAUS.index(1.0)]:.3f} | {rel:.3f} | {std:.3f} | "
                         + " / ".join(f"{k:.3f}" for k in kls) + " |")  # fmt: skip
            print(lines[-1], flush=True)
    Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
