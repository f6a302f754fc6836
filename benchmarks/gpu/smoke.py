"""Seconds-long check of the device paths on a tiny random Llama (run first on a GPU machine): Block-AP on the
model's device (a given start point, both objectives), then lowbit train (all parameters, from that folder)."""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from lowbit.ptq.gptq import rtn  # noqa: E402
from lowbit.quant.surgery import QuantConfig  # noqa: E402
from lowbit.store.folder import save_quantized  # noqa: E402
from lowbit.train import TrainConfig, run  # noqa: E402
from lowbit.train.blockap import BlockAP  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp())
    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (6000,), generator=torch.Generator().manual_seed(3))
    (tmp / "calib.txt").write_text(tok.decode(ids.tolist()))
    fp = tiny_llama(vocab_size=len(tok))
    fp.save_pretrained(tmp / "fp")
    tok.save_pretrained(tmp / "fp")
    config = QuantConfig(bits="ternary", group_size=32)
    start = copy.deepcopy(fp)
    rtn(start, config)
    for loss in ("mse", "normed"):
        model = copy.deepcopy(start).to(device)
        method = BlockAP(calib=str(tmp / "calib.txt"), calib_tokens=2048, seq_len=32, batch_size=4, loss=loss, check_windows=8)
        report = method.apply(model, config, tok, progress=False, reference=copy.deepcopy(fp).to(device))
        print(device, "Block-AP", loss, [(round(b["mse_initial"], 4), round(b["mse_final"], 4)) for b in report["blocks"]])
    save_quantized(model.to("cpu"), tok, tmp / "q", info={"method": "smoke"})
    cfg = TrainConfig(out=str(tmp / "e2e"), quant=config, steps=4, model=str(tmp / "fp"), data=str(tmp / "calib.txt"),
                      init=str(tmp / "q"), train_params="all", batch_size=4, seq_len=32, warmup=1, eval_every=2,
                      eval_text=str(tmp / "calib.txt"), eval_every_tokens=256)  # fmt: skip
    result = run(cfg, progress=False).result
    print(device, "train", {k: result.get(k) for k in ("first_loss", "final_loss", "train_tokens")})
    print((tmp / "e2e" / "eval.jsonl").read_text().strip())
    print(f"smoke ok on {device} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
