"""Resident memory of a model, measured in a fresh Python process (``lowbit bench``).

A process that already held a model reuses its freed heap and would under-count, so
:func:`measure_resident` starts a new interpreter, takes its resident set size with everything
but the model loaded, loads the model, decodes a few tokens and reports the growth.
"""

from __future__ import annotations

import sys

from lowbit.errors import LowbitError


def measure_resident(kind: str, spec: str, activations: str = "int8", threads: int = 1, ternary_layout: str = "u2",
                     engine: str = "transformers") -> dict:
    """Resident memory of a model in a fresh Python process: RSS after loading it (and after 16 + 8
    decode steps) minus the RSS of the same process just before, with torch, transformers, the
    kernels, an empty model of the same architecture and the tokenizer already loaded. A fresh
    process, because a process that already held a model reuses its freed heap and would under-count. ``kind``: "packed" (a lowbit folder) or "reference"."""
    import json
    import subprocess

    code = (
        "import json, sys; from lowbit.runtime.packed import memory_child; "
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
