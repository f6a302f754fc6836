"""llmcompressor's GPTQ as points of a Pareto sweep (``lowbit pareto --peers llmcompressor``).

llmcompressor runs as its users run it: ``oneshot`` + ``GPTQModifier`` with its defaults (static
act-order, damping 0.01, block 128, min-max observer), one scheme ``wBgG-sym|asym`` (integer
weights, ``B`` bits, groups of ``G``) on every ``Linear`` but ``lm_head`` (the tied embedding stays
in full precision, as lowbit's default), calibrated on ``calib_windows`` random windows of
``calib_seq_len`` tokens of the sweep's calibration text (BOS-aware, as lowbit's eval windows).

llmcompressor pins its own transformers, so it may live in another interpreter: the plug-in runs
in-process when ``import llmcompressor`` works, else ``python -m lowbit.peers.llmcompressor REQUEST``
in the interpreter named by ``LOWBIT_PEERS_PYTHON``, with this lowbit first on its path. The
worker writes the weights llmcompressor's model computes with (one safetensors file) and the bytes
its compressed checkpoint stores (``save_pretrained(save_compressed=True)``) for the decoder
linears (packed weights, scales, zero points, g_idx if any) and in all, with its scales and
unquantized tensors saved in ``save_dtype`` (float16 by default, as lowbit stores its own steps and
high-precision tensors; GPTQ itself runs in float32 and its float32 result is what is scored); the sweep loads the
weights into its reference model and scores them with :func:`lowbit.eval.evaluation.evaluate` on its
cached reference, exactly like its own points.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from lowbit.errors import LowbitError

PYTHON_ENV = "LOWBIT_PEERS_PYTHON"
_SCHEME = re.compile(r"^w(\d)g(\d+)-(sym|asym)$")
WEIGHTS = "weights.safetensors"
RESULT = "result.json"


def has_llmcompressor() -> bool:
    """Whether llmcompressor is importable in this interpreter."""
    return importlib.util.find_spec("llmcompressor") is not None


def parse_scheme(name: str) -> tuple[int, int, bool]:
    """``w4g64-asym`` -> (bits 4, group 64, symmetric False)."""
    m = _SCHEME.match(name)
    if not m or not 2 <= int(m.group(1)) <= 8:
        raise LowbitError(f"llmcompressor scheme {name!r} must look like w4g64-sym or w3g128-asym (2 to 8 bits)")
    return int(m.group(1)), int(m.group(2)), m.group(3) == "sym"


@dataclass
class LLMCompressorPeer:
    """``schemes``: default sym and asym at the sweep's integer bit-widths (2-8) with ``group_size``;
    ``python``: the interpreter to run llmcompressor in (default: this one if it has llmcompressor,
    else ``$LOWBIT_PEERS_PYTHON``)."""

    name: ClassVar[str] = "llmcompressor"
    schemes: list[str] | None = None
    group_size: int = 64
    calib_windows: int = 128
    calib_seq_len: int = 512
    save_dtype: str = "float16"
    python: str | None = None

    def interpreter(self) -> str | None:
        """None: in-process; else the Python to run the worker in."""
        if self.python:
            return self.python
        if has_llmcompressor():
            return None
        env = os.environ.get(PYTHON_ENV)
        if not env:
            raise LowbitError(
                f"llmcompressor is not importable here: pip install llmcompressor, or set {PYTHON_ENV} to a "
                "Python that has it (it pins its own transformers)"
            )
        return env

    def check(self) -> None:
        for name in self.schemes or []:
            parse_scheme(name)
        python = self.interpreter()
        if python is not None and not Path(python).exists():
            raise LowbitError(f"{PYTHON_ENV}={python} does not exist: name a Python that has llmcompressor")

    def plan(self, spec) -> list[dict]:
        from lowbit.eval.data import text_fingerprint

        names = self.schemes or [
            f"w{int(b)}g{self.group_size}-{kind}"
            for b in spec.bits
            if b == int(b) and 2 <= b <= 8
            for kind in ("sym", "asym")
        ]
        calib = {
            "calib": spec.calib,
            "calib_sha256": text_fingerprint(spec.calib),
            "calib_windows": self.calib_windows,
            "calib_seq_len": self.calib_seq_len,
            "save_dtype": self.save_dtype,
        }
        points = []
        for name in dict.fromkeys(names):
            bits, group, symmetric = parse_scheme(name)
            points.append({"peer_type": name, "bits": bits, "group_size": group, "symmetric": symmetric, **calib})
        return points

    def version(self) -> str:
        out = _run_python(self.interpreter(), ["-c", "import llmcompressor; print(llmcompressor.__version__)"])
        return out.strip().splitlines()[-1]  # the last line: llmcompressor logs warnings to stdout on import

    def measure(self, ctx, todo: list[dict], progress: bool, log: Callable[[str], None]) -> Iterator[tuple[dict, dict]]:
        python = self.interpreter()
        for settings in todo:
            with tempfile.TemporaryDirectory(prefix="lowbit-llmcompressor-") as tmp:
                request = {"model": ctx.spec, "settings": settings, "out": tmp}
                log(
                    f"pareto: llmcompressor {settings['peer_type']}: running GPTQ ({'in-process' if python is None else python})"
                )
                if python is None:
                    run_worker(request)
                else:
                    (Path(tmp) / "request.json").write_text(json.dumps(request))
                    _run_python(python, ["-m", "lowbit.peers.llmcompressor", str(Path(tmp) / "request.json")])
                yield settings, _score(ctx, Path(tmp), progress)


def _run_python(python: str | None, args: list[str]) -> str:
    """Run ``python args`` with this lowbit first on its path; its stdout, or a one-line error."""
    import lowbit

    env = dict(os.environ)
    src = str(Path(lowbit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([python or sys.executable, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LowbitError(f"llmcompressor worker ({python}) failed with exit code {proc.returncode}: {tail[0]}")
    return proc.stdout


def _score(ctx, folder: Path, progress: bool) -> dict:
    """Load the worker's weights into a copy of the reference model and evaluate it on the cache."""
    from safetensors.torch import load_file

    from lowbit.eval.evaluation import evaluate

    result = json.loads((folder / RESULT).read_text())
    weights = load_file(folder / WEIGHTS)
    model = copy.deepcopy(ctx.reference)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            target = modules.get(name)
            if target is None or tuple(target.weight.shape) != tuple(w.shape):
                raise LowbitError(f"llmcompressor returned weights for {name} that do not fit the model")
            target.weight.copy_(w)
    t0 = time.perf_counter()
    with torch.inference_mode():
        quality = evaluate(model, ctx.cache.windows, reference=ctx.cache, progress=progress)
    return {
        "size": result["size"],
        "quality": quality,
        "quantize_seconds": result["quantize_seconds"],
        "eval_seconds": time.perf_counter() - t0,
        "details": result["details"],
    }


# ---------------------------------------------------------------- the worker (runs where llmcompressor is)


def _recipe(bits: int, group: int, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    return GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )


def _calibration(tokenizer, settings: dict):
    """``calib_windows`` random windows (seeded) of the calibration text, as a datasets.Dataset."""
    from datasets import Dataset

    from lowbit.eval.data import get_text, tokenize_windows, tokenizer_adds_bos

    seq_len = settings["calib_seq_len"]
    windows = tokenize_windows(tokenizer, get_text(settings["calib"]), seq_len, bos=tokenizer_adds_bos(tokenizer))
    pick = torch.randperm(len(windows), generator=torch.Generator().manual_seed(settings["seed"]))
    ids = windows[pick[: settings["calib_windows"]]].tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in ids]}), len(ids)


def _stored_bytes(folder: Path, linears: set[str]) -> tuple[int, int]:
    """(all tensor bytes, decoder-linear tensor bytes) of a saved checkpoint."""
    from safetensors import safe_open

    total = linear = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
                linear += t.numel() * t.element_size() if key.rpartition(".")[0] in linears else 0
    return total, linear


def run_worker(request: dict) -> None:
    """Quantize ``request["model"]`` with llmcompressor as ``request["settings"]`` say; write the
    weights it computes with and its stored bytes into ``request["out"]``."""
    import llmcompressor
    from llmcompressor import oneshot
    from safetensors.torch import save_file

    from lowbit.api import load

    settings, out = request["settings"], Path(request["out"])
    model, tokenizer, _ = load(request["model"])
    dataset, n_windows = _calibration(tokenizer, settings)
    torch.manual_seed(settings["seed"])
    t0 = time.perf_counter()
    recipe = _recipe(settings["bits"], settings["group_size"], settings["symmetric"])
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
            max_seq_length=settings["calib_seq_len"], num_calibration_samples=n_windows)  # fmt: skip
    seconds = time.perf_counter() - t0
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    # the weights its forward uses (GPTQ leaves the quantized-dequantized values in .weight)
    save_file({n: m.weight.detach().float().contiguous() for n, m in linears.items()}, out / WEIGHTS)
    params = _count_params(model)
    lin_params = sum(m.weight.numel() for m in linears.values())
    with tempfile.TemporaryDirectory() as saved:
        model.to(getattr(torch, settings["save_dtype"]))  # scales and unquantized tensors as stored
        model.save_pretrained(saved, save_compressed=True)
        total, linear = _stored_bytes(Path(saved), set(linears))
    size = {
        "total_bytes": total,
        "params": params,
        "bits_per_weight": 8.0 * total / params,
        "bits_per_weight_linear": 8.0 * linear / lin_params,
        "linear_bytes": linear,
        "linear_params": lin_params,
        "other_bytes": total - linear,
    }
    details = {"calib_tokens": n_windows * settings["calib_seq_len"], "llmcompressor": llmcompressor.__version__}
    (out / RESULT).write_text(json.dumps({"size": size, "quantize_seconds": seconds, "details": details}))


def _count_params(model) -> int:
    """Weights counted once (tied tensors once), llmcompressor's scales and zero points excluded."""
    seen, n = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.rpartition(".")[2].startswith("weight_") or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n


if __name__ == "__main__":
    run_worker(json.loads(Path(sys.argv[1]).read_text()))
