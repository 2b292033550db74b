"""Facts about this machine's CPU: model, vector flags, usable cores.

`tlkit.inference` keys its per-machine LiteRT settings on them, and the
benchmarks record them with every result, so two runs on machines of the same
name but different vector units (AVX2 only, or AVX-512 and VNNI) can be told apart.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags that decide which float32 / int8 kernels XNNPACK and oneDNN can use.
VECTOR_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


@functools.cache
def cpu_facts() -> dict:
    """The CPU model, its vector flags, the cores this process may use and the clock.

    Returns:
        A dict with `cpu_model`, `vector_flags` (those of `VECTOR_FLAGS` the CPU
        has), `usable_cores` (the process' CPU affinity), `logical_cpus` and
        `max_mhz` (None when /proc/cpuinfo does not say).
    """
    model, flags, megahertz = platform.processor() or "unknown", set(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz":
                megahertz.append(float(value))
    except (OSError, ValueError):
        pass
    return {
        "cpu_model": model,
        "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
        "usable_cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "max_mhz": max(megahertz) if megahertz else None,
    }


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
