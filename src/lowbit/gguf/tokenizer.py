"""Tokenizer metadata for GGUF: what llama.cpp needs to rebuild a GPT-2 style byte-level BPE tokenizer."""

from __future__ import annotations

import json

from lowbit.errors import LowbitError


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
    """Everything llama.cpp needs to rebuild a GPT-2 style (byte-level BPE) tokenizer, and warnings.

    The dict has ``model``, ``pre``, ``tokens``, ``token_types``, ``merges``, the ``bos`` / ``eos``
    / ``unk`` / ``pad`` ids (or None), ``add_bos``, ``add_eos`` and ``chat_template``."""
    tok_json = _byte_level_bpe(tokenizer)
    model = tok_json["model"]
    tokens, types = _vocabulary(tok_json, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    warnings: list[str] = []
    if pre == "auto":
        detected = detect_pre_tokenizer(tok_json)
        if detected is None:
            warnings.append(
                "pre-tokenizer not recognised: wrote 'default' (llama.cpp may split text differently); "
                "pass --tokenizer-pre NAME to choose llama.cpp's"
            )
        pre = detected or "default"
    meta = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_types": types, "merges": merges}
    meta.update(_special_tokens(tokenizer, config))
    meta["chat_template"] = getattr(tokenizer, "chat_template", None)
    return meta, warnings


def _byte_level_bpe(tokenizer) -> dict:
    """The tokenizer's ``tokenizer.json``, refused unless it is a GPT-2 style byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizers) tokenizer in the quantized folder")
    tok_json = json.loads(backend.to_str())
    model = tok_json.setdefault("model", {})
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
    return tok_json


def _vocabulary(tok_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and GGUF token types for every embedding row (unused rows padded)."""
    import gguf

    vocab: dict[str, int] = dict(tok_json["model"].get("vocab", {}))
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
    return tokens, types


def _special_tokens(tokenizer, config: dict) -> dict:
    """bos / eos / unk / pad ids, and whether the tokenizer adds bos / eos by itself."""

    def special(name):
        value = getattr(tokenizer, f"{name}_token_id", None)
        return value if value is not None else config.get(f"{name}_token_id")

    probe = "Hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    bos, eos = special("bos"), special("eos")
    return {
        "bos": bos,
        "eos": eos,
        "unk": special("unk"),
        "pad": special("pad"),
        "add_bos": len(with_special) > len(plain) and bos is not None and with_special[0] == bos,
        "add_eos": len(with_special) > len(plain) and eos is not None and with_special[-1] == eos,
    }
