"""Building the kernels' shared library: every C source of this folder compiled together by gcc
into ``$LOWBIT_CACHE/<sha>/liblowbit.so`` (default cache ``~/.cache/lowbit/kernels``).

The hash covers the name and bytes of every ``*.c`` and ``*.h`` here (pyproject.toml ships them as
package data), the compiler and the flags. The library is compiled to a temporary name and renamed
into place (:func:`lowbit.store.fsio.atomic_path`), so concurrent first uses never load a half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from lowbit.store.fsio import atomic_path

_HERE = Path(__file__).parent
SOURCES = tuple(sorted(_HERE.glob("*.c")))  # compiled together into one library
HEADERS = tuple(sorted(_HERE.glob("*.h")))  # included by the sources
BASE_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fvisibility=hidden"]
LIBS = ["-lm"]  # after the sources: expf / sqrtf of the decode-layer kernel

log = logging.getLogger("lowbit.runtime.kernels")


def cache_dir() -> Path:
    """Where compiled kernels live: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit/kernels``."""
    env = os.environ.get("LOWBIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lowbit" / "kernels"


def compiler() -> str | None:
    """``$CC`` (resolved on PATH when it can be), else gcc or cc; None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("gcc") or shutil.which("cc")


def library_path(cc: str, flags: list[str]) -> Path:
    """The cache path for these flags: keyed by the name and bytes of every source and header."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    h.update("\0".join([cc, *flags, *LIBS]).encode())
    return cache_dir() / h.hexdigest()[:16] / "liblowbit.so"


def compile_library(cc: str, flags: list[str]) -> Path:
    """Build (or reuse) the library for these flags; raises CalledProcessError / OSError."""
    path = library_path(cc, flags)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("lowbit: compiling the CPU kernels into %s (once)", path)
    with atomic_path(path) as tmp:
        subprocess.run(
            [cc, *flags, *map(str, SOURCES), "-o", str(tmp), *LIBS], check=True, capture_output=True, text=True
        )
    return path
