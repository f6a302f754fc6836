"""Resident memory of a model, measured in a fresh Python process (``lowbit bench``).

A process that already held a model reuses its freed heap and would under-count, so
:func:`measure_resident` starts a new interpreter, takes its resident set size with everything
but the model loaded, loads the model, decodes a few tokens and reports the growth.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch

from lowbit.errors import LowbitError


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS shows what is live."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file (``/proc/self/status``, ``/proc/meminfo``), kB -> bytes; None
    where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        pass
    return None


def peak_resident_bytes() -> int | None:
    """The most resident memory this process has held so far: ``VmHWM`` on Linux, else ``ru_maxrss``
    (KiB on Linux, bytes on macOS); None where the OS says neither."""
    peak = proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _run_tiny_twin(config, engine: str) -> None:
    """Decode a few tokens with a tiny random model of the same architecture (one layer, width 64),
    so that the baseline holds the code pages of the ops a decode runs (about 6 MB of libtorch
    touched on first use), which any model would cost once per process."""
    import copy

    from transformers import AutoModelForCausalLM

    tiny = copy.deepcopy(config)
    for key, value in (("num_hidden_layers", 1), ("hidden_size", 64), ("intermediate_size", 128),
                       ("num_attention_heads", 4), ("num_key_value_heads", 2), ("head_dim", 16), ("vocab_size", 256)):
        if hasattr(tiny, key):
            setattr(tiny, key, value)
    try:
        model = AutoModelForCausalLM.from_config(tiny).eval()
        ids = torch.arange(16)[None]
        if engine == "lowbit":
            from lowbit.decoder import Decoder

            Decoder(model, max_len=32).generate(ids[0], max_new_tokens=4)
        else:
            from transformers import DynamicCache

            with torch.inference_mode():
                out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
                model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    except Exception:  # an architecture this shrinking does not fit: measure without the warm-up
        pass


def memory_child(kind: str, spec: str, activations: str, threads: int, ternary_layout: str = "u2",
                 engine: str = "transformers") -> dict:
    """Runs in a fresh interpreter (see :func:`measure_resident`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from lowbit import kernels
    from lowbit.models import NAMED_MODELS, cached_model_dir, load_model
    from lowbit.runtime import load_packed, module_bytes

    torch.set_num_threads(threads)
    kernels.load()
    # The baseline includes what any model of this architecture costs once per process (modules
    # imported on first use, about 130 MB for Llama in transformers 5; the code pages of the ops a
    # decode runs) and the tokenizer: an empty (meta) model is built, a tiny random twin decodes a
    # few tokens and a tokenizer is loaded before it is taken.
    if kind == "packed":
        folder = Path(spec)
    elif spec in NAMED_MODELS or not Path(spec).is_dir():
        folder = cached_model_dir(spec)
    else:
        folder = Path(spec)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        AutoModelForCausalLM.from_config(config)
    if (folder / "tokenizer_config.json").exists():
        AutoTokenizer.from_pretrained(folder)
    _run_tiny_twin(config, engine)
    trim_heap()
    baseline = resident_bytes()
    if kind == "packed":
        model, _, _ = load_packed(spec, activations=activations, ternary_layout=ternary_layout)
    else:
        model, _ = load_model(spec)
    trim_heap()
    loaded = resident_bytes()
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab - 1), min(1000, vocab), (1, 16), generator=torch.Generator().manual_seed(0))
    if engine == "lowbit":  # lowbit's decode loop, as `lowbit generate` runs it (KV cache for 2048 tokens)
        from lowbit.decoder import Decoder

        Decoder(model, max_len=2048).generate(ids[0], max_new_tokens=8)
    else:
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
            for _ in range(8):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    trim_heap()
    return {
        "baseline_rss": baseline,
        "resident_bytes": loaded - baseline,
        "resident_bytes_after_decode": resident_bytes() - baseline,
        "peak_rss": peak_resident_bytes(),
        "model_bytes": module_bytes(model),
    }


def measure_resident(kind: str, spec: str, activations: str = "int8", threads: int = 1, ternary_layout: str = "u2",
                     engine: str = "transformers") -> dict:
    """Resident memory of a model in a fresh Python process: RSS after loading it (and after 16 + 8
    decode steps) minus the RSS of the same process just before, with torch, transformers, the
    kernels, an empty model of the same architecture and the tokenizer already loaded. A fresh
    process, because a process that already held a model reuses its freed heap and would under-count. ``kind``: "packed" (a lowbit folder) or "reference"."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from lowbit.resident import memory_child; "
        "print(json.dumps(memory_child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], "
        "sys.argv[6])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, kind, str(spec), activations, str(threads), ternary_layout, engine],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise LowbitError(f"measuring the resident memory of {spec} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

