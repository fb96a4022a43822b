"""The int8 prefill of packed layers: a prompt's product in 8-bit integer arithmetic (an option).

`int8_linear(form, x, bias)` approximates F.linear(x, Ŵ, bias) for a prompt x (..., cols) on
the CPU with one int8 GEMM per row chunk (`torch._int_mm`: VNNI, or AMX-int8 where the CPU
has it, several times the fp32 GEMM's rate): Ŵ's rows are rebuilt in bf16 as the bf16 prefill
rebuilds them (`cpu.rows_bf16`), each row is rounded to symmetric int8 with its own scale, x's
tokens likewise (after bf16), and

    y ≈ (x_q W_qᵀ) · s_x s_wᵀ        x_q (N, K) int8, W_q (n, K) int8, s_x (N,), s_w (n,)

with the int32 sums exact. The two roundings are errors the reference forward does not have
(each value moves by at most half a step of its row's largest / 127), so this is a named
option (`binllm.packed.layers.set_int8_prefill`), measured in perplexity, never a default. A
chain's (binary-factor's) stages run in turn, t kept fp32 between them and rounded again for
the next stage. It returns None for what it does not compute: decode-sized batches (at most
`cpu.GEMV_MAX` rows, which the exact GEMV reads from the bits), inputs off the CPU or that want
gradients, and where it cannot run (`unavailable`: torch older than 2.6, a CPU without VNNI or
AMX-INT8, no compiled kernels); the caller's path computes those.

LLM activations have a few channels far larger than the rest, which one scale per token rounds
coarsely. Each prompt is therefore smoothed first (SmoothQuant's migration with α = ½, decided
per call from the prompt itself): with c_j = √(max_t |x_tj|) over the prompt's tokens, x's
column j is divided by c_j and Ŵ's column j multiplied by it, the same product in exact
arithmetic, before either is rounded. c is the call's: a token's rounding depends on the other
tokens of the same call (later ones in a prompt, other sequences in a batch), as any per-tensor
activation statistic does, so a perplexity measured with it is that of a slightly non-causal
rounding. On SmolLM2 with 4-bit GPTQ layers (8 windows of 2048) this takes the int8 prefill's
perplexity cost from +4.7 % / +3.7 % (wikitext2 / c4) to +1.2 % / +0.9 % (docs/results.md).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

from . import cpu
from .cpu_build import extension
from .cpu_features import cpu_flags
from .form import KernelForm
from .form_ref import stages_of

MAX_K = 2**31 // (127 * 127)  # widest rows whose int32 sums cannot overflow


def unavailable(flags: str | None = None, version: str | None = None) -> str | None:
    """Why the int8 prefill cannot run here, or None where it can: torch before 2.6 (no CPU
    `_int_mm` before 2.3, wrong sums without VNNI before 2.6), a CPU with none of AVX512-VNNI,
    AVX-VNNI, AMX-INT8 (a slow loop), or compiled kernels that cannot be built."""
    if TorchVersion(version or torch.__version__) < "2.6":
        return f"torch {version or torch.__version__} is older than 2.6"
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set((flags or cpu_flags()).split()):
        return "this CPU has no VNNI or AMX-INT8 instructions"
    status = extension()
    return None if status.ok else status.reason


def int8_linear(form: KernelForm, x: Tensor, bias: Tensor | None = None) -> Tensor | None:
    """F.linear(x, Ŵ, bias) by the int8 prefill in x's dtype, or None where it does not apply."""
    tokens, stages = x.numel() // max(1, x.shape[-1]), stages_of(form)
    if (x.device.type != "cpu" or tokens <= cpu.GEMV_MAX
            or (x.requires_grad and torch.is_grad_enabled()) or _unavailable_here()
            or any(not _fits(stage) for stage in stages)):
        return None
    t = x.reshape(-1, form.cols)
    for i, stage in enumerate(stages):  # the last stage writes bf16 for bf16 x, else fp32
        t = form_matmul_int8(stage, t, x.dtype if i == len(stages) - 1 else torch.float32)
    y = t.to(x.dtype).reshape(*x.shape[:-1], form.rows)
    return y if bias is None else y + bias.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _unavailable_here() -> str | None:
    return unavailable()


def _fits(form: KernelForm) -> bool:
    """Whether the stage's rows can be rebuilt side by side (a sparse part goes with one BitPart,
    as on the bf16 path) and its int32 sums cannot overflow."""
    K = sum(part.width for part in form.parts)
    return K <= MAX_K and (form.sparse is None or len(form.parts) == 1)


def form_matmul_int8(form: KernelForm, x: Tensor,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """y ≈ x Ŵᵀ (N, rows) for x (N, cols) of one KernelForm (not a chain), in int8: y is bf16
    (rounded once from the fp32 result) for `dtype` bf16, else fp32."""
    xs = cpu.columns_bf16(form, x.to(torch.bfloat16).contiguous())  # (N, K)
    c = smoothing(xs)  # (K,)
    xq, sx = quantize_rows(xs, torch.reciprocal(c))
    y = torch.empty(x.shape[0], form.rows, dtype=torch.bfloat16 if dtype == torch.bfloat16
                    else torch.float32)
    wq = sw = None
    for r0, w in cpu.rows_bf16(form):
        if wq is None:  # one buffer for every chunk's int8 rows
            wq, sw = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
        n = w.shape[0]
        torch.ops.binllm_cpu.rows_int8(w, c, wq[:n], sw[:n])
        acc = torch._int_mm(xq, wq[:n].T)  # (N, n) int32, exact
        torch.ops.binllm_cpu.scale_int32(acc, sx, sw[:n], y[:, r0:r0 + n])  # acc · s_x · s_w
    return y


def smoothing(xs: Tensor) -> Tensor:
    """c (K,) fp32: √(max over the tokens of |x_j|) per column of xs (N, K); 1 for a column of
    zeros (padding), which multiplies nothing (`smoothing_bf16`, one pass over xs bf16)."""
    c = torch.empty(xs.shape[1])
    torch.ops.binllm_cpu.smoothing_bf16(xs, c)
    return c


def quantize_rows(src: Tensor, colscale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(q (n, K) int8, scale (n,) fp32): symmetric int8 rows of v = src · colscale (src (n, K)
    bf16, colscale (K,) fp32 or None), scale = max |row of v| / 127 and q = round(v · (127 /
    max |row of v|)) to nearest even (`rows_int8`)."""
    q = torch.empty(src.shape, dtype=torch.int8)
    scale = torch.empty(src.shape[0])
    none = torch.empty(0)
    torch.ops.binllm_cpu.rows_int8(src, none if colscale is None else colscale, q, scale)
    return q, scale
