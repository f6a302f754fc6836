"""The machine a benchmark ran on, as every results file records it: CPU model and the ISA flags that
decide which kernels run (read from /proc/cpuinfo; the platform's name where there is none)."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted) -> list[str]:
    """The flags of ``wanted`` this CPU has, sorted (empty where /proc/cpuinfo is missing)."""
    return sorted(set(wanted) & set((_cpuinfo_field("flags") or "").split()))
