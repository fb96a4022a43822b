"""What this CPU is, as the kernels need to know it: its flag line (the compiled extension's
cache key includes it, since the loops are built with -march=native) and whether it multiplies
bfloat16 in hardware (the bf16 prompt path and a held evaluation weight choose their GEMM by
it). Only the standard library; reads /proc/cpuinfo once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=None)
def cpu_flags() -> str:
    """/proc/cpuinfo's first `flags` line, else the machine type (no flag line there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def fast_bf16_matmul(flags: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16 in its flag line;
    `flags` default: this CPU's). Where it does not, torch converts, and a bf16 GEMM runs
    several times slower than an fp32 one. True where there is no flag line to read."""
    if flags is None:
        return _this_cpu_has_bf16()
    if not flags.startswith("flags"):
        return True
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@functools.lru_cache(maxsize=None)
def _this_cpu_has_bf16() -> bool:
    """fast_bf16_matmul of this CPU's flag line, decided once (every bf16 prompt call asks)."""
    return fast_bf16_matmul(cpu_flags())
