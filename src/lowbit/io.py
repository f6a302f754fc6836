"""The quantized model folder: HF config + tokenizer + packed safetensors + ``lowbit.json``.

Quantized layers are stored as packed codes at their true width (:mod:`lowbit.packing`),
fp16 steps and (min-max only) uint8 zero points; every other tensor in ``hp_dtype``.
``lowbit.json`` records the quantization config, each layer's layout, the library version and
the SHA-256 of the weights file; loading checks all of it and refuses a corrupted file.
Folders are written to a temporary sibling and renamed into place, so a killed save never
leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.fsio import atomic_dir, sha256_file
from lowbit.packing import default_layout, pack_codes, unpack_codes
from lowbit.quantizers import QuantizedWeight, alpha_for_step
from lowbit.surgery import HP_DTYPES, QuantConfig, quantize_model, quantized_modules

FORMAT = "lowbit-quantized"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "lowbit.json"


def build_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors exactly as stored, and per-layer metadata. Tied tensors are stored once."""
    config: QuantConfig | None = getattr(model, "lowbit_config", None)
    hp = HP_DTYPES[config.hp_dtype] if config else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    skip: set[int] = set()
    quantizers_seen: dict[int, str] = {}
    for name, module in quantized_modules(model):
        skip.add(id(module.weight))
        qid = id(module.quantizer)
        if qid in quantizers_seen:  # tied embedding / head share one quantized table
            layers[name] = {"tied_to": quantizers_seen[qid]}
        else:
            quantizers_seen[qid] = name
            qw = module.quantizer.quantize(module.weight)
            layout = default_layout(qw.n_levels)
            tensors[f"{name}.qweight"] = pack_codes(qw.codes, layout)
            step16 = qw.step.half()
            exact = torch.equal(step16.float(), qw.step)
            tensors[f"{name}.step"] = step16 if exact else qw.step
            if not module.quantizer.symmetric_zero:
                tensors[f"{name}.zero"] = qw.zero.to(torch.uint8)
            layers[name] = {
                "shape": list(qw.codes.shape),
                "bits": qw.bits,
                "quantizer": qw.quantizer,
                "group_size": qw.group_size,
                "n_levels": qw.n_levels,
                "layout": layout,
                "grid_zero": float(module.quantizer.grid_zero),
            }
        bias = getattr(module, "bias", None)
        if bias is not None:
            skip.add(id(bias))
            tensors[f"{name}.bias"] = bias.detach().to(hp).contiguous()
    seen: set[int] = set()
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(_persistent_buffers(model)):
        if ".quantizer." in name or id(p) in skip or id(p) in seen:
            continue
        seen.add(id(p))
        dtype = hp if p.is_floating_point() else p.dtype
        tensors[name] = p.detach().to(dtype).contiguous()
    return tensors, layers


def _persistent_buffers(model: nn.Module):
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set and mname.rpartition(".")[2] != "quantizer":
                yield (f"{mname}.{bname}" if mname else bname), buf


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, info: dict | None = None) -> Path:
    """Write the quantized model folder atomically; returns its path."""
    config: QuantConfig | None = getattr(model, "lowbit_config", None)
    if config is None:
        raise LowbitError("save_quantized needs a quantized model (run quantize_model, rtn or gptq first)")
    tensors, layers = build_state(model)
    with atomic_dir(out_dir) as tmp:
        hf_config = model.config.to_dict()
        hf_config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT, "lowbit_version": __version__})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowbit_version": __version__,
            "quant_config": config.to_dict(),
            "layers": layers,
            "weights_file": WEIGHTS,
            "weights_bytes": (tmp / WEIGHTS).stat().st_size,
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "info": info or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{path}/{META} is missing or not valid JSON: re-run lowbit quantize") from exc
    if meta.get("format") != FORMAT:
        raise LowbitError(f"{path} is not a lowbit quantized model folder (format {meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit ({meta.get('lowbit_version')}): upgrade lowbit")
    return meta


@dataclass
class PackedLayer:
    """One quantized layer's tensors exactly as the folder stores them (codes still packed)."""

    name: str
    info: dict
    qweight: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None

    def unpack(self) -> QuantizedWeight:
        """The layer as a :class:`QuantizedWeight`: codes unpacked, float32 steps and zero points."""
        info = self.info
        codes = unpack_codes(self.qweight, info["layout"], info["shape"][1])
        step = self.step.float()
        zero = self.zero.float() if self.zero is not None else torch.full_like(step, info["grid_zero"])
        return QuantizedWeight(codes, step, zero, info["group_size"], info["n_levels"], info["bits"], info["quantizer"])


@dataclass
class QuantizedFolder:
    """A quantized folder opened by :func:`open_folder`: ``meta`` (``lowbit.json``) and every tensor
    of the weights file as stored. :meth:`layer` hands out one quantized layer's tensors; with
    ``take=True`` they leave ``tensors``, so that what remains is the high-precision state."""

    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def layers(self) -> dict[str, dict]:
        """Per-layer metadata; a tied layer's entry is ``{"tied_to": owner}``."""
        return self.meta["layers"]

    def stored_layers(self) -> list[str]:
        """Names of the quantized layers that own their tensors (tied layers excluded)."""
        return [name for name, info in self.layers.items() if "tied_to" not in info]

    def layer(self, name: str, take: bool = False) -> PackedLayer:
        """Layer ``name``'s packed codes, steps, zero points (None when symmetric) and bias (or None)."""
        get = self.tensors.pop if take else self.tensors.__getitem__
        find = self.tensors.pop if take else self.tensors.get
        return PackedLayer(
            name, self.layers[name], get(f"{name}.qweight"), get(f"{name}.step"),
            find(f"{name}.zero", None), find(f"{name}.bias", None),
        )  # fmt: skip

    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)

    def tokenizer(self):
        """The folder's tokenizer, or None when it has no tokenizer files."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path) if (self.path / "tokenizer_config.json").exists() else None


def open_folder(path: str | os.PathLike, verify: bool = True) -> QuantizedFolder:
    """Read ``lowbit.json`` and the weights file, refusing a missing, truncated or (``verify``:
    SHA-256) corrupted file. The one reader of quantized folders."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / meta["weights_file"]
    if not weights.is_file():
        raise LowbitError(f"{weights} is missing: the folder is incomplete, re-run lowbit quantize")
    size = weights.stat().st_size
    if size != meta["weights_bytes"]:
        raise LowbitError(f"{weights} is {size} bytes, expected {meta['weights_bytes']}: the file is truncated or corrupted")
    if verify and sha256_file(weights) != meta["weights_sha256"]:
        raise LowbitError(f"{weights} fails its SHA-256 check: the file is corrupted, re-run lowbit quantize")
    try:
        return QuantizedFolder(path, meta, load_file(weights))
    except SafetensorError as exc:
        raise LowbitError(f"{weights} cannot be read ({exc}): the file is corrupted") from exc


def load_quantized(path: str | os.PathLike, verify: bool = True):
    """Load a quantized model folder; returns (model, tokenizer, meta)."""
    folder = open_folder(path, verify)
    model = quantized_model(folder)
    return model, folder.tokenizer(), folder.meta


def quantized_model(folder: QuantizedFolder) -> nn.Module:
    """The fake-quant float32 model of an opened folder (consumes ``folder.tensors``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(folder.hf_config(), dtype=torch.float32)
    model.eval()
    quantize_model(model, QuantConfig.from_dict(folder.meta["quant_config"]), initialize=False)
    modules = dict(quantized_modules(model))
    if set(modules) != set(folder.layers):
        raise LowbitError(f"{folder.path}: quantized layers in the file do not match the model config (file damaged?)")
    tensors = folder.tensors
    with torch.no_grad():
        for name in folder.stored_layers():
            module, layer = modules[name], folder.layer(name, take=True)
            qw = layer.unpack()
            module.weight.copy_(qw.dequantize())
            module.quantizer.set_scales(alpha_for_step(qw.step, module.quantizer.step_per_alpha), qw.zero)
            if layer.bias is not None:
                module.bias.copy_(layer.bias.float())
        rest = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if ".quantizer." not in k and not _is_covered(k, modules)]
    if unexpected or _really_missing(model, missing):
        raise LowbitError(
            f"{folder.path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model


def _is_covered(key: str, modules: dict) -> bool:
    owner, _, leaf = key.rpartition(".")
    return owner in modules and leaf in ("weight", "bias")


def _really_missing(model: nn.Module, missing: list[str]) -> bool:
    """Keys absent from the file that are not tied copies of a stored tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unique = dict(model.named_parameters())
    return any(k in params and k in unique for k in missing)
