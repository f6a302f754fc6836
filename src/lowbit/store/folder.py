"""The quantized model folder: HF config + tokenizer + packed safetensors + ``lowbit.json``.

Quantized layers are stored as packed codes at their true width (:mod:`lowbit.quant.packing`),
fp16 steps and (min-max only) uint8 zero points; every other tensor in ``hp_dtype``.
``lowbit.json`` (the manifest) records the quantization config, each layer's layout, the library
version, the base model's identity and every file of the folder with its size and SHA-256;
``lowbit.sha256`` holds the SHA-256 of ``lowbit.json`` itself (``sha256sum -c`` reads it).
Loading checks all of it and refuses, with one line, a folder that is incomplete, edited or
corrupted, or that only looks like a lowbit output (a weights file marked lowbit, a temporary
folder of an interrupted save): such a folder is never loaded as something else.
Folders are written to a temporary sibling and renamed into place, so a killed save never
leaves a half-written model behind, and only where :func:`lowbit.store.fsio.prepare_out` allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.quant.packing import default_layout, pack_codes, unpack_codes
from lowbit.quant.quantizers import QuantizedWeight, alpha_for_step
from lowbit.quant.surgery import HP_DTYPES, QuantConfig, quantize_model, quantized_modules
from lowbit.store.fsio import OutputKind, atomic_dir, is_tmp_name, prepare_out, sha256_file
from lowbit.store.stfile import MappedSafetensors, SafetensorsWriter

FORMAT = "lowbit-quantized"
FORMAT_VERSION = 2  # 2: whole-folder manifest, lowbit.sha256, base model fingerprint
WEIGHTS = "model.safetensors"
META = "lowbit.json"
META_HASH = "lowbit.sha256"
_SPILL = ".spill"  # SafetensorsWriter's spill files while the weights file is written
_META_KEYS = ("quant_config", "layers", "files", "weights_file", "weights_bytes", "info")


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
            if qw.n_levels == 3 and config is not None:
                layout = config.ternary_storage
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


def save_quantized(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    info: dict | None = None,
    overwrite: bool = False,
    inputs: tuple = (),
) -> Path:
    """Write the quantized model folder atomically; returns its path. An existing ``out_dir`` is
    refused unless ``overwrite`` and it is a previous lowbit quantized folder; ``inputs`` (model
    paths) must not overlap it (:func:`lowbit.store.fsio.prepare_out`)."""
    config: QuantConfig | None = getattr(model, "lowbit_config", None)
    if config is None:
        raise LowbitError("save_quantized needs a quantized model (run quantize_model, rtn or gptq first)")
    target = prepare_out(out_dir, QUANTIZED_OUT, overwrite, inputs)
    with atomic_dir(target) as tmp:
        write_quantized(model, tokenizer, tmp, info)
    return Path(out_dir)


def write_quantized(model: nn.Module, tokenizer, folder: Path, info: dict | None = None) -> None:
    """Write the folder's files into the existing folder ``folder``, the manifest last (not atomic:
    :func:`save_quantized` writes into a temporary folder)."""
    config: QuantConfig = model.lowbit_config
    tensors, layers = build_state(model)
    write_config_files(folder, model.config, tokenizer)
    writer = SafetensorsWriter(folder / WEIGHTS, folder / _SPILL)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish(weights_metadata())
    shutil.rmtree(folder / _SPILL)
    write_manifest(folder, config, layers, info)


def weights_metadata() -> dict[str, str]:
    """The safetensors header metadata of a quantized folder's weights file."""
    return {"format": FORMAT, "lowbit_version": __version__}


def write_config_files(folder: Path, hf_config, tokenizer) -> None:
    """``config.json`` (without a quantization_config) and the tokenizer files, if any."""
    config = hf_config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_manifest(folder: Path, config: QuantConfig, layers: dict[str, dict], info: dict | None = None) -> None:
    """``lowbit.json`` listing every file already in ``folder`` (size, SHA-256), then ``lowbit.sha256``."""
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (META, META_HASH)
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "quant_config": config.to_dict(),
        "layers": layers,
        "weights_file": WEIGHTS,
        "weights_bytes": files[WEIGHTS]["bytes"],
        "weights_sha256": files[WEIGHTS]["sha256"],
        "files": files,
        "info": info or {},
    }
    text = json.dumps(meta, indent=2).encode("utf-8")
    (folder / META).write_bytes(text)
    (folder / META_HASH).write_text(f"{hashlib.sha256(text).hexdigest()}  {META}\n")


def _weights_format(path: Path) -> str | None:
    """The ``format`` in the safetensors header metadata of ``path/model.safetensors``, if any."""
    try:
        with open(path / WEIGHTS, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < (1 << 26) else {}
        return (header.get("__metadata__") or {}).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is, or looks like, a lowbit quantized folder (manifest, manifest hash, a
    weights file marked lowbit, or the temporary folder of a save): such a folder is opened by
    :func:`open_folder`, which refuses it if it is not whole, never by a full-precision loader."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / META).is_file() or (path / META_HASH).is_file() or is_tmp_name(path.name):
        return True
    return _weights_format(path) == FORMAT


def _not_whole(path: Path) -> str:
    if is_tmp_name(path.name):
        return (
            f"{path} is the temporary folder of an interrupted lowbit save, not a model: run the "
            "command that wrote it again with the same --out (that removes it)"
        )
    return f"{path} is an incomplete lowbit folder (no {META}: its save was interrupted): re-run lowbit quantize"


def read_meta(path: str | os.PathLike) -> dict:
    """``lowbit.json``, checked against ``lowbit.sha256`` (an edited or damaged manifest is refused)."""
    path = Path(path)
    if is_tmp_name(path.name) or not (path / META).is_file():
        raise LowbitError(_not_whole(path))
    raw = (path / META).read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise LowbitError(f"{path}/{META} is not valid JSON: re-run lowbit quantize") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise LowbitError(f"{path} is not a lowbit quantized model folder ({META} format {found!r})")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LowbitError(f"{path} was written by a newer lowbit ({meta.get('lowbit_version')}): upgrade lowbit")
    if version < FORMAT_VERSION:
        raise LowbitError(
            f"{path} was written by lowbit {meta.get('lowbit_version')} (format {version}, without a whole-folder "
            "manifest): re-run lowbit quantize (or train) to write it in the current format"
        )
    try:
        stored = (path / META_HASH).read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise LowbitError(f"{path} has no {META_HASH} (its save was interrupted): re-run lowbit quantize") from exc
    if hashlib.sha256(raw).hexdigest() != stored:
        raise LowbitError(
            f"{path}/{META} fails its SHA-256 check in {META_HASH}: it was edited or damaged after lowbit wrote it; "
            "re-run lowbit quantize with the settings you want instead of editing it"
        )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta["files"], dict):
        raise LowbitError(f"{path}/{META} lacks {', '.join(missing) or 'its file list'}: re-run lowbit quantize")
    return meta


def check_files(path: Path, meta: dict, verify: bool = True) -> None:
    """Every file the manifest lists is present, of its size and (``verify``) its SHA-256."""
    for name, entry in meta["files"].items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise LowbitError(f"{path}/{META} lists {name!r}, a path outside the folder: re-run lowbit quantize")
        if not file.is_file():
            raise LowbitError(f"{file} is missing: the folder is incomplete, re-run lowbit quantize")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise LowbitError(f"{file} is {size} bytes, expected {entry['bytes']}: the file is truncated or corrupted")
        if verify and sha256_file(file) != entry["sha256"]:
            raise LowbitError(f"{file} fails its SHA-256 check: the file is corrupted, re-run lowbit quantize")


def _previous_output(path: Path) -> bool:
    """A folder lowbit wrote: its manifest holds, and it has no file the manifest does not list."""
    try:
        meta = read_meta(path)
    except LowbitError:
        return False
    listed = set(meta["files"]) | {META, META_HASH}
    return all(p.relative_to(path).as_posix() in listed for p in path.rglob("*") if not p.is_dir())


QUANTIZED_OUT = OutputKind("quantized model folder", _previous_output)


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


def open_folder(path: str | os.PathLike, verify: bool = True, mmap: bool = False) -> QuantizedFolder:
    """Read ``lowbit.json`` and the weights file, refusing an edited manifest and a missing,
    truncated or (``verify``: SHA-256) corrupted file. The one reader of quantized folders.
    ``mmap``: the tensors are views of the file mapped copy-on-write (:mod:`lowbit.store.stfile`), read
    from disk when touched, instead of copies in memory; writing to them never changes the file."""
    path = Path(path)
    meta = read_meta(path)
    check_files(path, meta, verify)
    weights = path / meta["weights_file"]
    if meta["weights_file"] not in meta["files"]:
        raise LowbitError(f"{path}/{META} does not list its weights file: re-run lowbit quantize")
    if mmap:
        mapped = MappedSafetensors(weights)
        return QuantizedFolder(path, meta, {name: mapped.get(name) for name in mapped.keys()})
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

    from lowbit.quant.rotation import install_saved_mixes_

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
        install_saved_mixes_(model, rest)
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
