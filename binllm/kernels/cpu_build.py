"""Building and loading the compiled CPU kernels: one torch extension, built on first use.

The extension (SOURCES: `cpu_gemv.cpp` the bit-plane GEMV and `cpu_lut.cpp` its row tiles'
lookups, `cpu_sparse.cpp` PB-LLM's salient weights, `cpu_prefill.cpp` the prefill rebuilds,
`cpu_int8.cpp` the int8 prefill's rows, `cpu_uniform8.cpp` the 8-bit codes read in place,
`cpu_decode.cpp` the lean decode loop's fused glue, `cpu_attend.cpp` its attention of a KV
group's heads, `cpu_layers.cpp` its decoder layers in one call, `cpu_dense.cpp` a dense bf16
weight's product with one token (`binllm.kernels.decode_ops`), `cpu_ops.cpp` form_gemv, the
`Decoder` class and the bindings; their shared declarations in `cpu_kernels.h`, the decode
loop's 16-lane helpers in `cpu_vec.h`) is one module, built on first use with
torch.utils.cpp_extension (-O3 -march=native) into torch's extension cache under a name keyed
by every source's bytes, the headers' and this CPU's flags (a changed file builds anew), and
reused afterwards. `extension()` returns an `ExtensionStatus`: the loaded module, or why it
cannot be used (the PyTorch paths then compute the same products). Standard library and torch
only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cpu_features import cpu_flags

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(f"cpu_{name}.cpp") for name in (
    "gemv", "lut", "sparse", "prefill", "int8", "uniform8", "decode", "attend", "layers", "dense",
    "ops"))
# cpu_kernels.h is included by every source, cpu_vec.h by the decode loop's
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_kernels.h", "cpu_vec.h"))


@dataclass(frozen=True)
class ExtensionStatus:
    ok: bool
    reason: str = ""     # why the extension is not usable
    avx512: bool = False  # compiled with AVX-512 (else only the portable loop)
    module: Any = None    # the compiled module (its Python classes: Decoder)


@functools.lru_cache(maxsize=None)
def extension() -> ExtensionStatus:
    """Load the compiled kernels (building them on first use); the status says whether."""
    if os.environ.get("BINLLM_KERNELS", "").lower() == "torch":
        return ExtensionStatus(False, "BINLLM_KERNELS=torch")
    key = build_key()
    if not built(f"binllm_cpu_{key}"):  # the one wait a user sees, so it is named
        log.warning("binllm: compiling the CPU kernels for this machine (once: about a "
                    "minute on 2 cores; cached afterwards)")
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"binllm_cpu_{key}", sources=[str(s) for s in SOURCES],
                      is_python_module=True,
                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
        avx = bool(torch.ops.binllm_cpu.has_avx512())
    except Exception as e:  # no compiler, headers or ninja: the PyTorch path still works
        return ExtensionStatus(False, f"building the CPU kernels failed ({build_failure(e)}); "
                                      f"{cache_advice(f'binllm_cpu_{key}')}")
    return ExtensionStatus(True, avx512=avx, module=module)


def built(name: str) -> bool:
    """Whether torch's extension cache holds the library `name`: under TORCH_EXTENSIONS_DIR,
    else in torch's default root, in its folder per Python and accelerator (the layout
    torch.utils.cpp_extension.load builds into). Only the build message depends on it."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accel = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                 f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{accel}")
    return (Path(root) / name / f"{name}.so").is_file()


def build_failure(e: Exception) -> str:
    """The exception's type and first line, and the compiler's first error line where the
    message holds one (torch's build error starts with the command line, not the cause)."""
    lines = str(e).strip().splitlines()
    out = f"{type(e).__name__}: {(lines or [''])[0][:200]}"
    cause = next((ln.strip() for ln in lines[1:] if "error:" in ln), "")
    return f"{out} … {cause[:300]}" if cause else out


def build_key() -> str:
    """The extension's cache key: a hash of each source's name and bytes, the headers', and this
    CPU's flags (-march=native), so that any changed file is a new build of its own."""
    h = hashlib.sha1()
    for path in (*SOURCES, *HEADERS):
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}:".encode() + data)
    h.update(cpu_flags().encode())
    return h.hexdigest()[:12]


def cache_advice(name: str) -> str:
    """What to do when the extension cache (torch's TORCH_EXTENSIONS_DIR) is the cause."""
    from torch.utils.cpp_extension import get_default_build_root

    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = env or get_default_build_root()
    where = f"TORCH_EXTENSIONS_DIR={root}" if env else root
    return (f"if the kernel cache is damaged or not writable, delete the {name} folder under "
            f"{where} (it is rebuilt on the next run) or set TORCH_EXTENSIONS_DIR to a "
            "writable folder; a missing compiler needs g++ and ninja")
