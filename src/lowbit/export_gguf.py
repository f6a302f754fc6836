"""Export a lowbit quantized folder of a Llama-family model to a GGUF file for llama.cpp.

Quantized codes are written straight into llama.cpp's block formats when lowbit's grid is exactly
representable there; nothing is re-quantized. A lowbit layer stores ``W = step * (u - zero)`` per
group; with ``c = 1`` when every zero is an integer and ``c = 2`` when every zero is a half-integer
(binary, 2-bit SEQ), ``W = (step / c) * k`` with integer ``k = c * (u - zero)``. A tensor maps
exactly onto a GGML type when

- its rows split into whole blocks of the type (32 for Q4_0 / Q8_0, 256 for TQ2_0 / TQ1_0),
- every block lies inside one lowbit group (group size a multiple of the block, per-channel rows a
  multiple of the block, or one scale per tensor), so one block scale ``d = step / c`` suffices,
- ``d`` is exactly representable in fp16 (lowbit rounds steps to fp16 when it saves in fp16), and
- every ``k`` lies in the type's integer range: TQ2_0 / TQ1_0 ``{-1, 0, 1}``; Q4_0 ``[-8, 7]``;
  Q8_0 ``[-128, 127]`` (its int8 storage holds -128 exactly although llama.cpp's own quantizer
  only emits [-127, 127]; the result reports how many tensors use -128).

The first exact type in the order ternary (TQ2_0 or TQ1_0) -> Q4_0 -> Q8_0 is written; otherwise
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.evaluation import compare_logits  # noqa: F401  (re-exported for the llama.cpp checks)
from lowbit.fsio import atomic_path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
FALLBACK_TYPES = ("f16", "f32", "q8_0")
TERNARY_TYPES = ("tq2_0", "tq1_0")

BLOCK = {"q4_0": 32, "q8_0": 32, "tq2_0": 256, "tq1_0": 256}
K_RANGE = {"q4_0": (-8, 7), "q8_0": (-128, 127), "tq2_0": (-1, 1), "tq1_0": (-1, 1)}

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


def _ggml_type(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name.upper())


# --------------------------------------------------------------------------------------------
# block packing (numpy): k are the signed integer levels, d the fp16 scale of each block
# --------------------------------------------------------------------------------------------


def _blocks(k: np.ndarray, d: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    rows, cols = k.shape
    nb = cols // size
    return k.reshape(rows, nb, size), d.astype(np.float16).reshape(rows, nb, 1).view(np.uint8), rows, nb


def pack_q4_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0: per 32 values an fp16 ``d`` then 16 bytes; byte j holds q[j] (low) and q[j+16] (high), q = k + 8."""
    kb, db, rows, nb = _blocks(k, d, 32)
    q = (kb + 8).astype(np.uint8)
    qs = q[..., :16] | (q[..., 16:] << np.uint8(4))
    return np.concatenate([db, qs], axis=-1).reshape(rows, nb * 18)


def pack_q8_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0: per 32 values an fp16 ``d`` then 32 int8 values."""
    kb, db, rows, nb = _blocks(k, d, 32)
    return np.concatenate([db, kb.astype(np.int8).view(np.uint8)], axis=-1).reshape(rows, nb * 34)


def pack_tq2_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ2_0: per 256 values 64 bytes of 2-bit q = k + 1 then an fp16 ``d``.

    Each half of the block (128 values) is 32 bytes; value ``l*32 + m`` of a half sits in byte m
    at bits ``2l``.
    """
    kb, db, rows, nb = _blocks(k, d, 256)
    q = (kb + 1).astype(np.uint8).reshape(rows, nb, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    return np.concatenate([qs.reshape(rows, nb, 64), db], axis=-1).reshape(rows, nb * 66)


_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)


def _base3_bytes(q: np.ndarray, digits: int) -> np.ndarray:
    """Combine ``digits`` trits along axis -2 (most significant first) into a byte holding the
    fixed-point fraction ceil(value * 256 / 243), as TQ1_0 stores them."""
    value = (q.astype(np.int32) * _POW3[:digits].reshape(digits, 1)).sum(axis=-2)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def pack_tq1_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ1_0: per 256 values 48 bytes of 5 trits, 4 bytes of 4 trits, then an fp16 ``d`` (54 bytes).

    Values 0..159 fill 32 bytes (trit n of byte m is value n*32+m), values 160..239 fill 16 bytes
    (value 160 + n*16 + m) and values 240..255 fill the 4 ``qh`` bytes (value 240 + n*4 + m).
    """
    kb, db, rows, nb = _blocks(k, d, 256)
    q = (kb + 1).astype(np.uint8)
    qs0 = _base3_bytes(q[..., :160].reshape(rows, nb, 5, 32), 5)
    qs1 = _base3_bytes(q[..., 160:240].reshape(rows, nb, 5, 16), 5)
    qh = _base3_bytes(q[..., 240:].reshape(rows, nb, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, db], axis=-1).reshape(rows, nb * 54)


PACKERS = {"q4_0": pack_q4_0, "q8_0": pack_q8_0, "tq2_0": pack_tq2_0, "tq1_0": pack_tq1_0}


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """llama.cpp's reference Q8_0 quantization (absmax / 127 per 32, round half away from zero).

    Used only for ``--fallback q8_0``: this *re-quantizes* and its error is reported.
    """
    rows, cols = w.shape
    wb = w.astype(np.float32).reshape(rows, cols // 32, 32)
    d = np.abs(wb).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = wb * inv
    k = (np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))).astype(np.int8)
    return pack_q8_0(k.reshape(rows, cols), d.reshape(rows, cols // 32))


# --------------------------------------------------------------------------------------------
# choosing a type per tensor
# --------------------------------------------------------------------------------------------


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


def _group_len(group_size: int | None, cols: int) -> int | None:
    """Inputs per lowbit group along a row; None for one scale per tensor."""
    if group_size == 0:
        return None
    return cols if group_size is None else group_size


def _expand(values: torch.Tensor, rows: int, cols: int, group_size: int | None) -> np.ndarray:
    """Per-group (R or 1, G or 1) values -> per element (rows, cols), float64."""
    v = values.double()
    g = _group_len(group_size, cols)
    col_group = torch.zeros(cols, dtype=torch.long) if g is None else torch.arange(cols) // g
    col_group = col_group.clamp(max=v.shape[1] - 1)
    return v[:, col_group].expand(rows, cols).numpy()


def exact_candidates(ternary: str) -> list[str]:
    return [ternary, "q4_0", "q8_0"]


def plan_exact(
    codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, group_size: int | None, ternary: str = "tq2_0"
) -> tuple[str | None, np.ndarray | None, list[str]]:
    """(type, packed bytes, reasons) for the first exactly representable type, or (None, None, reasons)."""
    rows, cols = codes.shape
    g = _group_len(group_size, cols)
    z = _expand(zero, rows, cols, group_size)
    if np.all(z == np.round(z)):
        c = 1
    elif np.all(2 * z == np.round(2 * z)):
        c = 2
    else:
        return None, None, ["zero points are not integers or half-integers"]
    k = np.round(c * (codes.numpy().astype(np.float64) - z)).astype(np.int32)
    kmin, kmax = int(k.min()), int(k.max())
    d_el = _expand(step, rows, cols, group_size) / c
    reasons = []
    for qtype in exact_candidates(ternary):
        size = BLOCK[qtype]
        lo, hi = K_RANGE[qtype]
        if cols % size:
            reasons.append(f"{qtype}: row length {cols} is not a multiple of {size}")
            continue
        if g is not None and g % size:
            reasons.append(f"{qtype}: group size {g} is not a multiple of the {size}-value block")
            continue
        if kmin < lo or kmax > hi:
            reasons.append(f"{qtype}: integer levels {kmin}..{kmax} outside {lo}..{hi}")
            continue
        d = d_el[:, ::size]
        d16 = d.astype(np.float16)
        if not (np.all(np.isfinite(d16)) and np.array_equal(d16.astype(np.float64), d)):
            reasons.append(f"{qtype}: step / {c} is not exactly representable in fp16")
            continue
        return qtype, PACKERS[qtype](k, d16), reasons
    return None, None, reasons


def pack_fallback(w: np.ndarray, fallback: str) -> tuple[str, np.ndarray, str | None]:
    """(type, data, note) for a tensor written in the fallback type."""
    if fallback == "q8_0":
        if w.shape[1] % 32 == 0:
            return "q8_0", quantize_q8_0(w), None
        return (
            "f16",
            w.astype(np.float16),
            f"q8_0 impossible: row length {w.shape[1]} is not a multiple of 32; wrote f16",
        )
    if fallback == "f32":
        return "f32", w.astype(np.float32), None
    return "f16", w.astype(np.float16), None


def _hp_array(tensor: torch.Tensor) -> tuple[str, np.ndarray]:
    """A high-precision tensor in the dtype it was stored in."""
    if tensor.dtype == torch.float16:
        return "f16", tensor.numpy()
    if tensor.dtype == torch.bfloat16:
        return "bf16", tensor.view(torch.int16).numpy().view(np.uint8).reshape(tensor.shape[0], -1)
    return "f32", tensor.float().numpy()


# --------------------------------------------------------------------------------------------
# reading the quantized folder
# --------------------------------------------------------------------------------------------


def _check_inputs(path: Path, out: Path, fallback: str, ternary: str) -> dict:
    from lowbit.io import META, is_quantized_dir

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
    if out.is_dir():
        raise LowbitError(f"--out {out} is a folder: give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise LowbitError(f"the folder of --out {out} does not exist: create {out.parent} first")
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


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def detect_pre_tokenizer(tok_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, when it is recognised."""
    pre = tok_json.get("pre_tokenizer") or {}

    def is_bytelevel(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if is_bytelevel(pre):
        return "gpt-2"  # the GPT-2 split regex, which HF ByteLevel(use_regex=True) applies
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and is_bytelevel(parts[1])
        ):
            return "smollm"  # single digits, then the GPT-2 regex
    return None


def tokenizer_metadata(tokenizer, config: dict, n_vocab: int, pre: str = "auto") -> tuple[dict, list[str]]:
    """Everything llama.cpp needs to rebuild a GPT-2 style (byte-level BPE) tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizers) tokenizer in the quantized folder")
    tok_json = json.loads(backend.to_str())
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"GGUF export supports byte-level BPE tokenizers only, not {model.get('type')!r}")
    uses_bytes = any(
        (tok_json.get(part) or {}).get("type") == "ByteLevel"
        or any(p.get("type") == "ByteLevel" for p in (tok_json.get(part) or {}).get("pretokenizers", []))
        for part in ("pre_tokenizer", "decoder")
    )
    if not uses_bytes or model.get("byte_fallback"):
        raise LowbitError(
            "GGUF export supports GPT-2 style byte-level BPE tokenizers only (not SentencePiece-style BPE)"
        )
    warnings: list[str] = []
    vocab: dict[str, int] = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise LowbitError(f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, idx in vocab.items():
        tokens[idx] = text
        types[idx] = int(gguf.TokenType.NORMAL)
    for idx, t in added.items():
        types[idx] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if pre == "auto":
        detected = detect_pre_tokenizer(tok_json)
        if detected is None:
            warnings.append(
                "pre-tokenizer not recognised: wrote 'default' (llama.cpp may split text differently); "
                "pass --tokenizer-pre NAME to choose llama.cpp's"
            )
        pre = detected or "default"

    def special(name):
        value = getattr(tokenizer, f"{name}_token_id", None)
        return value if value is not None else config.get(f"{name}_token_id")

    probe = "Hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    bos, eos = special("bos"), special("eos")
    add_bos = len(with_special) > len(plain) and bos is not None and with_special[0] == bos
    add_eos = len(with_special) > len(plain) and eos is not None and with_special[-1] == eos
    meta = {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "unk": special("unk"),
        "pad": special("pad"),
        "add_bos": add_bos,
        "add_eos": add_eos,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return meta, warnings


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _lowbit_desc(info: dict) -> str:
    g = info["group_size"]
    gtxt = {None: "per-channel", 0: "per-tensor"}.get(g, f"g{g}")
    return f"{info['quantizer']} {info['bits']:g}-bit {gtxt}"


class _Tensors:
    """Collects (name, data, type, expected weight, report) before writing."""

    def __init__(self):
        self.items: list[tuple[str, np.ndarray, str, np.ndarray, TensorReport]] = []

    def add(self, name, data, qtype, expected, report):
        self.items.append((name, data, qtype, expected, report))


def export_gguf(
    path: str | os.PathLike,
    out: str | os.PathLike,
    fallback: str = "f16",
    ternary: str = "tq2_0",
    tokenizer_pre: str = "auto",
) -> dict:
    """Write ``out`` (GGUF) from the lowbit quantized folder ``path``; returns the export report."""
    import gguf
    from safetensors.torch import load_file

    from lowbit.io import load_quantized
    from lowbit.packing import unpack_codes

    path, out = Path(path), Path(out)
    _check_inputs(path, out, fallback, ternary)
    model, tokenizer, meta = load_quantized(path)
    if tokenizer is None:
        raise LowbitError(f"{path} has no tokenizer files: GGUF files carry the tokenizer, re-run lowbit quantize")
    cfg = model.config
    layers_meta = meta["layers"]
    stored = load_file(path / meta["weights_file"])
    modules = dict(model.named_modules())

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope_theta, rope_scaling = _rope(cfg)
    collected = _Tensors()

    def quant_info(hf: str) -> tuple[str, dict] | None:
        info = layers_meta.get(hf)
        if info is None:
            return None
        if "tied_to" in info:
            return info["tied_to"], layers_meta[info["tied_to"]]
        return hf, info

    def add_matrix(gg_name: str, hf: str, perm_heads: int | None = None):
        module = modules[hf]
        q = quant_info(hf)
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
        if q is not None:
            owner, info = q
            report.lowbit = _lowbit_desc(info)
            codes = unpack_codes(stored[f"{owner}.qweight"], info["layout"], cols)
            step = stored[f"{owner}.step"].float()
            zero_t = stored.get(f"{owner}.zero")
            zero = zero_t.float() if zero_t is not None else torch.full_like(step, info["grid_zero"])
            if perm is not None:
                idx = torch.from_numpy(perm)
                codes = codes[idx]
                step = step[idx] if step.shape[0] > 1 else step
                zero = zero[idx] if zero.shape[0] > 1 else zero
            qtype, data, reasons = plan_exact(codes, step, zero, info["group_size"], ternary)
            if qtype is None:
                report.reason = "; ".join(reasons)
                qtype, data, note = pack_fallback(expected, fallback)
                if note:
                    report.notes.append(note)
            else:
                report.notes.extend(reasons)  # why a smaller type was not possible
            if (
                qtype == "q8_0"
                and report.reason is None
                and int(data.reshape(rows, -1, 34)[..., 2:].view(np.int8).min()) == -128
            ):
                report.notes.append("uses int8 code -128 (llama.cpp's own quantizer stays in -127..127)")
        else:
            key = f"{hf}.weight"
            qtype, data = _hp_array(stored[key]) if key in stored else ("f32", expected)
            if perm is not None:
                data = data[perm]
        report.type = qtype
        collected.add(gg_name, np.ascontiguousarray(data), qtype, expected, report)

    def add_vector(gg_name: str, hf_param: str, perm_heads: int | None = None):
        owner, _, leaf = hf_param.rpartition(".")
        value = getattr(modules[owner], leaf).detach().float().numpy()
        if perm_heads:
            value = value[_permute_rows(perm_heads, value.shape[0])]
        report = TensorReport(gg_name, hf_param, [int(value.shape[0])], "f32", 0, True)
        collected.add(gg_name, np.ascontiguousarray(value.astype(np.float32)), "f32", value, report)

    add_matrix("token_embd.weight", "model.embed_tokens")
    add_vector("output_norm.weight", "model.norm.weight")
    tied = model.lm_head.weight is model.model.embed_tokens.weight or (
        layers_meta.get("lm_head", {}).get("tied_to") == "model.embed_tokens"
    )
    if not tied:
        add_matrix("output.weight", "lm_head")
    for i in range(cfg.num_hidden_layers):
        base = f"model.layers.{i}"
        for gg, hf in _BLOCK_NORMS.items():
            add_vector(f"blk.{i}.{gg}.weight", f"{base}.{hf}.weight")
        for gg, hf in _BLOCK_LINEARS.items():
            heads = n_head if gg == "attn_q" else n_kv if gg == "attn_k" else None
            add_matrix(f"blk.{i}.{gg}.weight", f"{base}.{hf}", heads)
            bias = getattr(modules[f"{base}.{hf}"], "bias", None)
            if bias is not None:
                add_vector(f"blk.{i}.{gg}.bias", f"{base}.{hf}.bias", heads)

    n_vocab = int(model.model.embed_tokens.weight.shape[0])
    tok, warnings = tokenizer_metadata(tokenizer, cfg.to_dict(), n_vocab, tokenizer_pre)

    linear_types = Counter(
        r.type for _, _, _, _, r in collected.items if r.name.startswith("blk.") and len(r.shape) == 2
    )
    file_type = _file_type(linear_types.most_common(1)[0][0] if linear_types else "f32")

    with atomic_path(out) as writer_path:
        writer = gguf.GGUFWriter(writer_path, "llama")
        writer.add_name(str(meta.get("info", {}).get("base_model_id") or path.resolve().name))
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
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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
        writer.add_string("lowbit.version", __version__)
        writer.add_string("lowbit.quant_config", json.dumps(meta["quant_config"]))
        writer.add_string("lowbit.source", str(meta.get("info", {}).get("base_model", "")))
        for name, data, qtype, _, report in collected.items:
            raw = None if qtype in ("f16", "f32") else _ggml_type(qtype)  # others: uint8 bytes per row
            writer.add_tensor(name, data, raw_dtype=raw)
            report.bytes = int(data.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        reports = verify_gguf(writer_path, collected)
    return _summary(out, reports, tok, warnings, fallback, ternary)


def _file_type(qtype: str):
    import gguf

    names = {
        "f32": "ALL_F32",
        "f16": "MOSTLY_F16",
        "bf16": "MOSTLY_BF16",
        "q4_0": "MOSTLY_Q4_0",
        "q8_0": "MOSTLY_Q8_0",
        "tq2_0": "MOSTLY_TQ2_0",
        "tq1_0": "MOSTLY_TQ1_0",
    }
    return getattr(gguf.LlamaFileType, names[qtype])


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 in (rows, cols) / (n,) order."""
    from gguf.quants import dequantize

    shape = [int(s) for s in reversed(tensor.shape)]
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name == "BF16":
        values = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = dequantize(data, tensor.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(shape)


def verify_gguf(gguf_path: Path, collected: _Tensors) -> list[TensorReport]:
    """Dequantize every tensor of the written file and compare with lowbit's weight."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    reports = []
    for name, _, qtype, expected, report in collected.items:
        tensor = by_name.get(name)
        if tensor is None or tensor.tensor_type != _ggml_type(qtype):
            raise LowbitError(f"internal error: {name} is missing or has the wrong type in the written GGUF")
        got = dequantize_tensor(tensor)
        err = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max()) if got.size else 0.0
        report.max_abs_error = err
        report.exact = err == 0.0
        if report.reason is None and not report.exact:  # only fallbacks may differ
            raise LowbitError(f"internal error: {name} was written as exact {qtype} but differs by {err:g}")
        reports.append(report)
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


# --------------------------------------------------------------------------------------------
# llama.cpp comparison helpers (need llama-cpp-python)
# --------------------------------------------------------------------------------------------


@contextmanager
def _extra_buffer_types(enabled: bool):
    """llama-cpp-python builds its model params from ``llama_model_default_params()``; flip
    ``use_extra_bufts`` there for the duration of one ``Llama(...)`` construction."""
    from llama_cpp import llama_cpp as lib

    original = lib.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = enabled
        return params

    lib.llama_model_default_params = patched
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llamacpp(
    gguf_path: str | os.PathLike,
    n_ctx: int = 512,
    n_threads: int = 2,
    logits_all: bool = True,
    extra_bufts: bool = False,
):
    """A ``llama_cpp.Llama`` for ``gguf_path``.

    ``extra_bufts=False`` (default) turns off llama.cpp's weight-repacking buffer types (AMX,
    CPU_REPACK): in llama-cpp-python 0.3.36 built with GGML_NATIVE on an AMX (Sapphire Rapids)
    CPU the AMX matmul segfaults on the first eval for Q4_0 and Q8_0 files, llama.cpp's own
    quantizations included (upstream llama.cpp issue #20824). Plain CPU kernels are used instead.
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise LowbitError(
            "llama.cpp comparison needs llama-cpp-python: pip install llama-cpp-python diskcache"
        ) from exc
    with _extra_buffer_types(extra_bufts):
        return Llama(
            str(gguf_path),
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )


def llamacpp_logits(
    gguf_path: str | os.PathLike, ids: list[int], n_threads: int = 2, n_ctx: int | None = None
) -> np.ndarray:
    """Per-position logits (len(ids), vocab) from llama.cpp for exactly these token ids."""
    llm = open_llamacpp(gguf_path, n_ctx=n_ctx or max(64, len(ids)), n_threads=n_threads)
    try:
        llm.reset()
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
