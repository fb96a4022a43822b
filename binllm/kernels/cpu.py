"""CPU forward of the kernel form: compiled kernels that read only the packed bit planes.

`form_matmul(form, x)` computes y = x Ŵᵀ (N, rows) fp32 for x (N, cols):

- N ≤ GEMV_MAX (decode, small batches): `torch.ops.binllm_cpu.bitpart` per BitPart on up
  to SMALL_BATCH inputs per call, a lookup-table GEMV over the bit planes (per x version and
  4 columns, a table of the 16 subset sums in fp32, so the result stays exact to fp32
  round-off; AVX-512: a 16-row tile's bytes of one plane column index two tables by their
  nibbles with `vpermps`, 16 rows × 8 columns per two permutes; elsewhere a portable C++
  loop of the same lookups), plus `sparse` for PB-LLM's salient weights. Nothing is
  dequantized.
- N > GEMV_MAX (prefill): each part's weight is rebuilt ROW_CHUNK rows at a time into one
  reusable buffer (`bitpart_dense`) and multiplied by the dense GEMM; the sparse part is a CSR
  matmul.
- Where the extension cannot run (no compiler, not a CPU tensor, gradients wanted, or
  BINLLM_KERNELS=torch), the pure-PyTorch `form_matmul_torch` computes the same product and a
  one-time warning (logging) says why.

The extension (`cpu_kernels.cpp`) is built on first use with torch.utils.cpp_extension (-O3
-march=native, about 10 s) into torch's extension cache, keyed by the source and this CPU's
flags, and reused afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .form import KernelForm, form_matmul_torch, part_inputs
from .form_ref import stages_of

log = logging.getLogger(__name__)

SMALL_BATCH = 8    # inputs per bit-plane GEMV call (the kernel's widest batch tile)
GEMV_MAX = 32      # largest N computed by GEMV calls (chunks of SMALL_BATCH); beyond: dense GEMM
ROW_CHUNK = 512    # rows rebuilt at a time on the prefill path
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
IMPLS = {"avx512": 0, "portable": 1}


@dataclass(frozen=True)
class ExtensionStatus:
    ok: bool
    reason: str = ""     # why the extension is not usable
    avx512: bool = False  # compiled with AVX-512 (else only the portable loop)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


@functools.lru_cache(maxsize=None)
def extension() -> ExtensionStatus:
    """Load the compiled kernels (building them on first use); the status says whether."""
    if os.environ.get("BINLLM_KERNELS", "").lower() == "torch":
        return ExtensionStatus(False, "BINLLM_KERNELS=torch")
    key = hashlib.sha1(SOURCE.read_bytes() + _cpu_flags().encode()).hexdigest()[:12]
    try:
        from torch.utils.cpp_extension import load

        load(name=f"binllm_cpu_{key}", sources=[str(SOURCE)], is_python_module=False,
             extra_cflags=["-O3", "-march=native", "-fopenmp"],
             extra_ldflags=["-fopenmp"], verbose=False)
        avx = bool(torch.ops.binllm_cpu.has_avx512())
    except Exception as e:  # no compiler, headers or ninja: the PyTorch path still works
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return ExtensionStatus(False, f"building the CPU kernels failed ({type(e).__name__}: "
                                      f"{first}); {cache_advice(f'binllm_cpu_{key}')}")
    return ExtensionStatus(True, avx512=avx)


def cache_advice(name: str) -> str:
    """What to do when the extension cache (torch's TORCH_EXTENSIONS_DIR) is the cause."""
    from torch.utils.cpp_extension import get_default_build_root

    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = env or get_default_build_root()
    where = f"TORCH_EXTENSIONS_DIR={root}" if env else root
    return (f"if the kernel cache is damaged or not writable, delete the {name} folder under "
            f"{where} (it is rebuilt on the next run) or set TORCH_EXTENSIONS_DIR to a "
            "writable folder; a missing compiler needs g++ and ninja")


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("binllm: packed layers use the pure-PyTorch kernel form (slower): %s", reason)


def fast_path_reason(form: KernelForm, x: Tensor) -> str | None:
    """Why the compiled kernels cannot compute this product (None: they can)."""
    if x.device.type != "cpu":
        return f"no compiled kernel for {x.device.type} tensors here"
    if x.requires_grad and torch.is_grad_enabled():
        return "the compiled kernels have no backward (input requires grad)"
    status = extension()
    return None if status.ok else status.reason


def form_matmul(form: KernelForm, x: Tensor, impl: str = "avx512") -> Tensor:
    """y = x Ŵᵀ (N, rows) fp32 for x (N, cols), reading only the form (see module docstring).

    impl "avx512" uses the AVX-512 loop where it was compiled, "portable" the plain C++ loop.
    """
    reason = fast_path_reason(form, x)
    if reason is not None:
        _warn_once(reason)
        return form_matmul_torch(form, x)
    x = x.float().contiguous()
    for stage in stages_of(form):  # a ChainForm's stages in turn (t stays fp32 in between)
        x = _compiled(stage, x, impl)
    return x


def _compiled(form: KernelForm, x: Tensor, impl: str) -> Tensor:
    """y (N, rows) of one KernelForm by the compiled kernels, x (N, cols) fp32 contiguous."""
    if x.shape[0] > GEMV_MAX:
        return _dense_chunks(form, x)
    if x.shape[0] > SMALL_BATCH:
        return torch.cat([_compiled(form, x[i:i + SMALL_BATCH], impl)
                          for i in range(0, x.shape[0], SMALL_BATCH)])
    ops = torch.ops.binllm_cpu
    y = torch.zeros(x.shape[0], form.rows)
    no_scale = torch.empty(0)  # the op's "no column scales"
    for part in form.parts:
        scale = no_scale if part.scale is None else part.scale
        ops.bitpart(x, part.perm, scale, part.planes, part.terms, part.cptr, part.cidx,
                    part.fac, part.coef, part.seg, y, IMPLS[impl])
    if form.sparse is not None:
        sp = form.sparse
        ops.sparse(x, sp.rowptr, sp.col, sp.q, sp.scale, sp.zero, sp.sub, sp.groupsize, y,
                   IMPLS[impl])
    return y


def _dense_chunks(form: KernelForm, x: Tensor) -> Tensor:
    """Prefill: rebuild ROW_CHUNK rows of each part at a time into one buffer, dense GEMM."""
    ops = torch.ops.binllm_cpu
    y = torch.zeros(x.shape[0], form.rows)
    for part in form.parts:
        xv = part_inputs(part, x)  # (N, V, P)
        buf = torch.empty(min(ROW_CHUNK, form.rows), part.width)
        for r0 in range(0, form.rows, ROW_CHUNK):
            n = min(ROW_CHUNK, form.rows - r0)
            for v in range(xv.shape[1]):
                ops.bitpart_dense(part.planes, part.terms, part.cptr, part.cidx, part.fac,
                                  part.coef, part.seg, v, r0, buf[:n])
                y[:, r0:r0 + n].addmm_(xv[:, v], buf[:n].T)
    if form.sparse is not None:
        sp = form.sparse
        with warnings.catch_warnings():  # "sparse CSR support is in beta": ours is tested
            warnings.simplefilter("ignore")
            csr = torch.sparse_csr_tensor(sp.rowptr, sp.col.long(), sp.values(),
                                          (form.rows, form.cols), check_invariants=False)
        y += (csr @ x.T).T
    return y
