"""Export a lowbit quantized folder of a Llama-family model to a GGUF file for llama.cpp.

Quantized codes are written straight into llama.cpp's block formats when lowbit's grid is exactly
representable there; nothing is re-quantized. A lowbit layer stores ``W = step * (u - zero)`` per
group; with ``c = 1`` when every zero is an integer and ``c = 2`` when every zero is a half-integer
(binary, 2-bit SEQ), ``W = (step / c) * k`` with integer ``k = c * (u - zero)``. A tensor maps
exactly onto a GGML type when

- its rows split into whole blocks of the type (32 for Q4_0 / Q8_0, 256 for Q6_K / TQ2_0 / TQ1_0),
- every block lies inside one lowbit group (group size a multiple of the block, per-channel rows a
  multiple of the block, or one scale per tensor), so one block scale ``d = step / c`` suffices,
- ``d`` is exactly representable in fp16 (lowbit rounds steps to fp16 when it saves in fp16), and
- every ``k`` lies in the type's integer range: TQ2_0 / TQ1_0 ``{-1, 0, 1}``; Q4_0 ``[-8, 7]``;
  Q6_K ``[-32, 31]`` (written with every 16-value sub-block scale 1, the block scale ``d``);
  Q8_0 ``[-128, 127]`` (its int8 storage holds -128 exactly although llama.cpp's own quantizer
  only emits [-127, 127]; the result reports how many tensors use -128).

6-bit lowbit grids (levels -32..31 for LSQ, -31..31 for abs-max) are thus exact Q6_K per channel (rows a
multiple of 256) or in groups that are multiples of 256, and exact Q8_0 in groups of 32, 64 or 128.
The first exact type in the order ternary (TQ2_0 or TQ1_0) -> Q4_0 -> Q6_K -> Q8_0 is written; otherwise
the tensor falls back to ``fallback`` (f16, f32 or q8_0) and the error of that fallback against
lowbit's weight is measured and reported. High-precision tensors are written in the dtype they
are stored in (fp16 / bf16 / fp32), norms and biases as F32 as llama.cpp expects.

After writing, the file is read back with :class:`gguf.GGUFReader`, every tensor is dequantized
with :func:`gguf.quants.dequantize` and compared with the weight lowbit's model computes with; a
tensor that was claimed exact but differs aborts the export (the file is not left behind). Sizes
are the bytes actually written, never a format's nominal bits.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.gguf.quants import dequantize_tensor, ggml_type, hp_array, pack_fallback, plan_exact
from lowbit.gguf.tokenizer import tokenizer_metadata
from lowbit.store.folder import META, QuantizedFolder, is_quantized_dir, open_folder, quantized_model
from lowbit.store.fsio import OutputKind, atomic_path, prepare_out

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
FALLBACK_TYPES = ("f16", "f32", "q8_0")
TERNARY_TYPES = ("tq2_0", "tq1_0")

# llama.cpp names of a Llama decoder block's tensors -> Hugging Face module names
_BLOCK_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@dataclass
class TensorReport:
    """What was written for one GGUF tensor."""

    name: str
    source: str
    shape: list[int]
    type: str
    bytes: int
    exact: bool
    max_abs_error: float = 0.0
    lowbit: str | None = None  # e.g. "lsq 4-bit g32"; None for high-precision tensors
    reason: str | None = None  # why no exact quantized type was possible
    notes: list[str] = field(default_factory=list)



class GGUFTensor(NamedTuple):
    """One tensor to write: its GGUF name, bytes (or float array), GGML type, the weight lowbit
    computes with (what the written tensor must dequantize to) and its report."""

    name: str
    data: np.ndarray
    qtype: str
    expected: np.ndarray
    report: TensorReport


def is_lowbit_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file that lowbit wrote (it carries ``lowbit.version``)."""
    try:
        import gguf

        return "lowbit.version" in gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001  (any unreadable file is simply not ours)
        return False


GGUF_OUT = OutputKind("GGUF file", is_lowbit_gguf, file=True, example="model.gguf")


def _check_inputs(path: Path, fallback: str, ternary: str) -> dict:
    if fallback not in FALLBACK_TYPES:
        raise LowbitError(f"unknown fallback type {fallback!r}: choose one of {', '.join(FALLBACK_TYPES)}")
    if ternary not in TERNARY_TYPES:
        raise LowbitError(f"unknown ternary type {ternary!r}: choose one of {', '.join(TERNARY_TYPES)}")
    if not path.is_dir():
        raise LowbitError(f"{path} is not a folder: export needs a lowbit quantized folder (lowbit quantize --out DIR)")
    if not is_quantized_dir(path):
        raise LowbitError(
            f"{path} is not a lowbit quantized folder (no {META}): quantize it first with lowbit quantize --out DIR"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{path}/config.json is missing or not valid JSON: re-run lowbit quantize") from exc
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" or (archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)):
        raise LowbitError(
            f"GGUF export supports only Llama-family models (LlamaForCausalLM) for now; {path} is "
            f"{'/'.join(map(str, archs)) or 'not a Llama'} (model_type {config.get('model_type')!r})"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise LowbitError(f"GGUF export expects a SiLU Llama MLP; {path} uses {config.get('hidden_act')!r}")
    return config


def _rope(config) -> tuple[float, dict | None]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": float(params["factor"])}
    raise LowbitError(f"rope scaling {kind!r} is not supported by lowbit's GGUF export yet (default and linear are)")


def _permute_rows(n_head: int, rows: int) -> np.ndarray:
    """Row order turning Hugging Face's half-split rotary layout into llama.cpp's interleaved pairs."""
    head_dim = rows // n_head
    return np.arange(rows).reshape(n_head, 2, head_dim // 2).transpose(0, 2, 1).reshape(-1)


def _lowbit_desc(info: dict) -> str:
    g = info["group_size"]
    gtxt = {None: "per-channel", 0: "per-tensor"}.get(g, f"g{g}")
    return f"{info['quantizer']} {info['bits']:g}-bit {gtxt}"


class _Collector:
    """Builds the :class:`GGUFTensor` list of a model, in the order they are written."""

    def __init__(self, folder: QuantizedFolder, model, fallback: str, ternary: str):
        self.folder, self.fallback, self.ternary = folder, fallback, ternary
        self.modules = dict(model.named_modules())
        self.tensors: list[GGUFTensor] = []

    def add(self, name: str, data: np.ndarray, qtype: str, expected: np.ndarray, report: TensorReport) -> None:
        report.type = qtype
        self.tensors.append(GGUFTensor(name, np.ascontiguousarray(data), qtype, expected, report))

    def _owner(self, hf: str) -> str | None:
        """The quantized layer whose codes ``hf`` uses (itself, or the layer it is tied to); None if unquantized."""
        info = self.folder.layers.get(hf)
        if info is None:
            return None
        return info.get("tied_to", hf)

    def matrix(self, gg_name: str, hf: str, perm_heads: int | None = None) -> None:
        module = self.modules[hf]
        with torch.no_grad():
            if hasattr(module, "quantizer"):
                expected = module.quantizer(module.weight).float().numpy()
            else:
                expected = module.weight.detach().float().numpy()
        perm = _permute_rows(perm_heads, expected.shape[0]) if perm_heads else None
        if perm is not None:
            expected = expected[perm]
        rows, cols = expected.shape
        report = TensorReport(gg_name, hf, [rows, cols], "", 0, True)
        owner = self._owner(hf)
        if owner is not None:
            qtype, data = self._quantized(owner, expected, perm, report)
        else:
            key = f"{hf}.weight"
            stored = self.folder.tensors
            qtype, data = hp_array(stored[key]) if key in stored else ("f32", expected)
            if perm is not None:
                data = data[perm]
        self.add(gg_name, data, qtype, expected, report)

    def _quantized(self, owner: str, expected: np.ndarray, perm: np.ndarray | None, report: TensorReport):
        """(type, data) of a quantized layer: its codes in the first exact GGML type, else the fallback."""
        layer = self.folder.layer(owner)
        report.lowbit = _lowbit_desc(layer.info)
        qw = layer.unpack()
        codes, step, zero = qw.codes, qw.step, qw.zero
        if perm is not None:
            idx = torch.from_numpy(perm)
            codes = codes[idx]
            step = step[idx] if step.shape[0] > 1 else step
            zero = zero[idx] if zero.shape[0] > 1 else zero
        qtype, data, reasons = plan_exact(codes, step, zero, layer.info["group_size"], self.ternary)
        if qtype is None:
            report.reason = "; ".join(reasons)
            qtype, data, note = pack_fallback(expected, self.fallback)
            if note:
                report.notes.append(note)
        else:
            report.notes.extend(reasons)  # why a smaller type was not possible
        if (
            qtype == "q8_0"
            and report.reason is None
            and int(data.reshape(expected.shape[0], -1, 34)[..., 2:].view(np.int8).min()) == -128
        ):
            report.notes.append("uses int8 code -128 (llama.cpp's own quantizer stays in -127..127)")
        return qtype, data

    def mixed_head(self, gg_name: str, hf_table: str, mix: torch.Tensor) -> None:
        """``table @ mix`` (the tied table as lowbit computes with it, times a rotated model's final-norm
        mix) in the fallback type: logits equal lowbit's up to that type's rounding."""
        module = self.modules[hf_table]
        with torch.no_grad():
            table = module.quantizer(module.weight) if hasattr(module, "quantizer") else module.weight
            expected = (table.double() @ mix).float().numpy()
        rows, cols = expected.shape
        report = TensorReport(gg_name, "lm_head", [rows, cols], "", 0, True)
        report.reason = "rotated model: the tied head times the final-norm mix has no exact GGUF type"
        qtype, data, note = pack_fallback(expected, self.fallback)
        if note:
            report.notes.append(note)
        self.add(gg_name, data, qtype, expected, report)

    def vector(self, gg_name: str, hf_param: str, perm_heads: int | None = None) -> None:
        owner, _, leaf = hf_param.rpartition(".")
        value = getattr(self.modules[owner], leaf).detach().float().numpy()
        if perm_heads:
            value = value[_permute_rows(perm_heads, value.shape[0])]
        report = TensorReport(gg_name, hf_param, [int(value.shape[0])], "f32", 0, True)
        self.add(gg_name, value.astype(np.float32), "f32", value, report)


def _collect(folder: QuantizedFolder, model, fallback: str, ternary: str) -> list[GGUFTensor]:
    """Every tensor of the GGUF file under llama.cpp's names, in llama.cpp's order."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    c = _Collector(folder, model, fallback, ternary)
    c.matrix("token_embd.weight", "model.embed_tokens")
    c.vector("output_norm.weight", "model.norm.weight")
    tied = model.lm_head.weight is model.model.embed_tokens.weight or (
        folder.layers.get("lm_head", {}).get("tied_to") == "model.embed_tokens"
    )
    mix = getattr(model.model.norm, "mix", None)
    if mix is not None:  # a rotated tied model: GGUF has no final-norm mix, so the head gets its own table
        c.mixed_head("output.weight", "model.embed_tokens", mix.detach().double())
    elif not tied:
        c.matrix("output.weight", "lm_head")
    for i in range(cfg.num_hidden_layers):
        base = f"model.layers.{i}"
        for gg, hf in _BLOCK_NORMS.items():
            c.vector(f"blk.{i}.{gg}.weight", f"{base}.{hf}.weight")
        for gg, hf in _BLOCK_LINEARS.items():
            heads = n_head if gg == "attn_q" else n_kv if gg == "attn_k" else None
            c.matrix(f"blk.{i}.{gg}.weight", f"{base}.{hf}", heads)
            if getattr(c.modules[f"{base}.{hf}"], "bias", None) is not None:
                c.vector(f"blk.{i}.{gg}.bias", f"{base}.{hf}.bias", heads)
    return c.tensors


def export_gguf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    fallback: str = "f16",
    ternary: str = "tq2_0",
    tokenizer_pre: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Write ``out`` (GGUF) from the lowbit quantized folder ``path``; returns the export report.

    ``out`` is checked first (:func:`lowbit.store.fsio.prepare_out`): an existing file is replaced only
    with ``overwrite`` and only when lowbit wrote it; ``out`` must not lie inside ``path``.
    """
    import gguf  # noqa: F401  (fail before any work when the gguf package is missing)

    path, out = Path(path), Path(out)
    _check_inputs(path, fallback, ternary)
    prepare_out(out, GGUF_OUT, overwrite, inputs=(path,))
    folder = open_folder(path)
    model = quantized_model(replace(folder, tensors=dict(folder.tensors)))  # ``folder`` keeps every stored tensor
    tokenizer = folder.tokenizer()
    if tokenizer is None:
        raise LowbitError(f"{path} has no tokenizer files: GGUF files carry the tokenizer, re-run lowbit quantize")
    rope = _rope(model.config)
    tensors = _collect(folder, model, fallback, ternary)
    n_vocab = int(model.model.embed_tokens.weight.shape[0])
    tok, warnings = tokenizer_metadata(tokenizer, model.config.to_dict(), n_vocab, tokenizer_pre)
    with atomic_path(out) as writer_path:
        _write(writer_path, folder, model.config, rope, tok, tensors)
        reports = verify_gguf(writer_path, tensors)
    return _summary(out, reports, tok, warnings, fallback, ternary)


def _write(
    target: Path, folder: QuantizedFolder, cfg, rope: tuple[float, dict | None], tok: dict, tensors: list[GGUFTensor]
) -> None:
    """Write the GGUF file: hyperparameters, tokenizer, lowbit's provenance, then the tensors."""
    import gguf

    meta = folder.meta
    writer = gguf.GGUFWriter(target, "llama")
    writer.add_name(str(meta.get("info", {}).get("base_model_id") or folder.path.resolve().name))
    _write_hparams(writer, cfg, rope, n_vocab=len(tok["tokens"]))  # one token per embedding row
    linear_types = Counter(t.qtype for t in tensors if t.name.startswith("blk.") and len(t.report.shape) == 2)
    writer.add_file_type(int(_file_type(linear_types.most_common(1)[0][0] if linear_types else "f32")))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(writer, tok)
    writer.add_string("lowbit.version", __version__)
    writer.add_string("lowbit.quant_config", json.dumps(meta["quant_config"]))
    writer.add_string("lowbit.source", str(meta.get("info", {}).get("base_model", "")))
    for t in tensors:
        raw = None if t.qtype in ("f16", "f32") else ggml_type(t.qtype)  # others: uint8 bytes per row
        writer.add_tensor(t.name, t.data, raw_dtype=raw)
        t.report.bytes = int(t.data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer, cfg, rope: tuple[float, dict | None], n_vocab: int) -> None:
    import gguf

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope_theta, rope_scaling = rope
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_rope_freq_base(rope_theta)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling["factor"])
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(n_vocab)


def _write_tokenizer(writer, tok: dict) -> None:
    writer.add_tokenizer_model(tok["model"])
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if tok[key] is not None:
            add(int(tok[key]))
    writer.add_add_bos_token(bool(tok["add_bos"]))
    writer.add_add_eos_token(bool(tok["add_eos"]))
    if isinstance(tok["chat_template"], str) and tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _file_type(qtype: str):
    import gguf

    names = {
        "f32": "ALL_F32",
        "f16": "MOSTLY_F16",
        "bf16": "MOSTLY_BF16",
        "q4_0": "MOSTLY_Q4_0",
        "q6_k": "MOSTLY_Q6_K",
        "q8_0": "MOSTLY_Q8_0",
        "tq2_0": "MOSTLY_TQ2_0",
        "tq1_0": "MOSTLY_TQ1_0",
    }
    return getattr(gguf.LlamaFileType, names[qtype])



def verify_gguf(gguf_path: Path, tensors: list[GGUFTensor]) -> list[TensorReport]:
    """Dequantize every tensor of the written file and compare with lowbit's weight."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    reports = []
    for t in tensors:
        tensor = by_name.get(t.name)
        if tensor is None or tensor.tensor_type != ggml_type(t.qtype):
            raise LowbitError(f"internal error: {t.name} is missing or has the wrong type in the written GGUF")
        got = dequantize_tensor(tensor)
        expected = t.expected.astype(np.float64)
        err = float(np.abs(got.astype(np.float64) - expected).max()) if got.size else 0.0
        t.report.max_abs_error = err
        t.report.exact = err == 0.0
        if t.report.reason is None and not t.report.exact:  # only fallbacks may differ
            raise LowbitError(f"internal error: {t.name} was written as exact {t.qtype} but differs by {err:g}")
        reports.append(t.report)
    del reader
    return reports


def _summary(
    out: Path, reports: list[TensorReport], tok: dict, warnings: list[str], fallback: str, ternary: str
) -> dict:
    file_bytes = out.stat().st_size
    tensor_bytes = sum(r.bytes for r in reports)
    n_params = sum(int(np.prod(r.shape)) for r in reports)
    linears = [r for r in reports if r.name.startswith("blk.") and len(r.shape) == 2]
    linear_params = sum(int(np.prod(r.shape)) for r in linears)
    types: dict[str, dict] = {}
    for r in reports:
        entry = types.setdefault(r.type, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += int(np.prod(r.shape))
        entry["bytes"] += r.bytes
    for entry in types.values():
        entry["bits_per_weight"] = round(8 * entry["bytes"] / max(entry["params"], 1), 4)
    quantized = [r for r in reports if r.lowbit is not None]
    fallbacks = [r for r in quantized if r.reason is not None]
    inexact = [r for r in reports if not r.exact]
    if any(r.reason for r in quantized):
        warnings = warnings + [
            f"{len(fallbacks)} of {len(quantized)} quantized tensors had no exact GGUF type and were written as "
            f"{'/'.join(sorted({r.type for r in fallbacks}))} (see 'reason' per tensor)"
        ]
    return {
        "out": str(out),
        "format": "gguf",
        "architecture": "llama",
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "metadata_bytes": file_bytes - tensor_bytes,
        "params": n_params,
        "bits_per_weight": round(8 * file_bytes / n_params, 4),
        "bits_per_weight_tensors": round(8 * tensor_bytes / n_params, 4),
        "bits_per_weight_linear": round(8 * sum(r.bytes for r in linears) / max(linear_params, 1), 4),
        "types": types,
        "linear_types": dict(Counter(r.type for r in linears)),
        "quantized_tensors": len(quantized),
        "quantized_exact": len(quantized) - len(fallbacks),
        "quantized_fallback": len(fallbacks),
        "inexact_tensors": len(inexact),
        "max_abs_error": max((r.max_abs_error for r in reports), default=0.0),
        "q8_0_with_code_-128": sum(1 for r in reports if any("-128" in n for n in r.notes)),
        "fallback": fallback,
        "ternary_type": ternary,
        "tokenizer": {
            "model": tok["model"],
            "pre": tok["pre"],
            "tokens": len(tok["tokens"]),
            "merges": len(tok["merges"]),
            "bos": tok["bos"],
            "eos": tok["eos"],
            "add_bos": tok["add_bos"],
        },
        "warnings": warnings,
        "tensors": [asdict(r) for r in reports],
    }
