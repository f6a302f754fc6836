"""Process memory: the resident set now and at its peak, and handing freed heap back to the system."""

from __future__ import annotations

import gc
import os
import sys


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc; falls back to peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim_heap(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS shows what is live;
    ``collect`` runs the garbage collector first (for a measurement; a hot loop that frees its own
    tensors skips it: a full collection costs ~0.4 s in a process holding transformers)."""
    if collect:
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
